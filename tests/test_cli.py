"""The README's first command: `riverlog demo` appends and reads back on the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.cli import main


def test_demo_appends_and_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--data-dir", str(tmp_path), "--records", "2500"]) == 0
    out = capsys.readouterr().out
    assert "appended 2500 records at offsets [0, 2500)" in out
    assert "read back 2500 records" in out
    # A second run continues the same log after the clean close.
    assert main(["demo", "--data-dir", str(tmp_path), "--records", "10"]) == 0
    out = capsys.readouterr().out
    assert "offsets [0, 2510)" in out
    assert "last value 'event 9'" in out


def test_demo_refuses_bad_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--data-dir", str(tmp_path), "--records", "0"]) == 2
    assert "--records must be in [1," in capsys.readouterr().err


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
