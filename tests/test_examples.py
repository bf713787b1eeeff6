"""Every script in examples/ runs to completion against a live broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream._serve import RunningBroker

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
RUN_TIMEOUT_S = 120


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {"task_queue", "fan_out", "replay", "live_analytics"}


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script: Path, running_broker: RunningBroker, tmp_path: Path) -> None:
    env = {**os.environ, "RIVERLOG_SERVER": running_broker.address}
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
