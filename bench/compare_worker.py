"""A consumer process of bench/compare.py (not run by hand): one group member, or the
latency consumer, of one system, so that every consumer has its own interpreter and GIL.

    python bench/compare_worker.py '{"system": "redis", "role": "group", ...}'

It talks to the orchestrator in JSON lines: stdout carries {"ready": true} once it is
connected (a group member: once the group is formed), then its result; a group member
waits for one line on stdin, {"end": {...}}, as the signal to start draining. Errors go
to stderr (the orchestrator's log of this worker) with a non-zero exit.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
import time
from typing import Any

from compare_common import GroupMember, LatencyLog, LatencyPlan

MODULES = {"riverlog": "compare_riverlog", "redis": "compare_redis", "nats": "compare_nats"}


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def main() -> int:
    (job_text,) = sys.argv[1:]
    job = json.loads(job_text)
    gc.set_threshold(*job["gc_threshold"])
    module = importlib.import_module(MODULES[job["system"]])
    deadline_s = time.monotonic() + float(job["seconds_max"])
    if job["role"] == "group":
        member: GroupMember = module.Member(
            job["address"], job["stream"], job["group"], job["name"]
        )
        try:
            member.join(int(job["members"]), deadline_s)
            say({"ready": True})
            go = json.loads(sys.stdin.readline() or "null")
            if go is None:
                return 1  # the orchestrator went away
            records, last_ns = member.drain(go["end"], deadline_s)
        finally:
            member.close()
        say({"records": records, "last_ns": last_ns})
    elif job["role"] == "latency":
        plan = LatencyPlan(**job["plan"])
        cpu_at_ready_s = 0.0

        def ready() -> None:
            nonlocal cpu_at_ready_s
            cpu_at_ready_s = time.process_time()
            say({"ready": True})

        log: LatencyLog = module.receive_latency(
            job["address"], job["stream"], plan, ready, deadline_s
        )
        cpu_s = time.process_time() - cpu_at_ready_s
        say({"seen": log.seen, "latencies_us": log.latencies_us, "cpu_s": cpu_s})
    else:
        raise ValueError(f"unknown role {job['role']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
