"""Every script in examples/ runs to completion against a live broker, and prints what it
shows (each script also checks its own results and exits 1 when they are wrong)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stream._serve import RunningBroker

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
RUN_TIMEOUT_S = 120
# Lines (regular expressions) an example's output must hold.
EXPECTED_OUTPUT: dict[str, list[str]] = {
    "share_task_queue": [
        r"64 of 64 tasks done",
        r"worker-7: \d+ tasks \(from partitions",
        r"8 of 8 workers were busy",
    ],
    "share_retries": [
        r"poison +2 +\d+ ms \(100 ms\) +released",
        r"poison +4 +\d+ ms \(400 ms\) +released .*the last attempt, dead-lettered",
        r"flaky +3 +\d+ ms \(200 ms\) +done",
        r"riverlog-dlq-reason: max-delivery-attempts",
        r"riverlog-dlq-delivery-count: 4",
        r"riverlog-dlq-reason: rejected",
        r"riverlog-dlq-error: permanent: not valid JSON",
    ],
    "delayed_reminder": [
        r"'coffee is ready': due .*\n'stand-up in 10 minutes': due .* \(\d+ ms after due\)",
    ],
    "request_reply": [
        r"AAPL 10 +-> 10 x AAPL = 2,341.20 USD",
        r"ACME 1 +-> no quote: unknown symbol ACME",
        r"the service answered 4 requests",
    ],
}


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {
        "task_queue",
        "fan_out",
        "replay",
        "live_analytics",
        "share_task_queue",
        "share_retries",
        "delayed_reminder",
        "request_reply",
    }
    assert set(EXPECTED_OUTPUT) <= {p.stem for p in EXAMPLES}


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
    for pattern in EXPECTED_OUTPUT.get(script.stem, []):
        assert re.search(pattern, result.stdout), f"{pattern!r} not in:\n{result.stdout}"
