"""The README's Python examples run as written against a live broker (its address swapped in)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream._serve import RunningBroker, load_config

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, running_broker: RunningBroker, tmp_path: Path) -> None:
    code = BLOCKS[index].replace("127.0.0.1:7171", running_broker.address)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_readme_config_file_loads(tmp_path: Path) -> None:
    """The README's TOML example is a valid config file, every key of it."""
    (block,) = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    path = tmp_path / "riverlog.toml"
    path.write_text(block)
    config = load_config(str(path), {}, {})
    assert config.broker.subscribers_max == 48
    assert config.workers == 64
