"""riverlog side by side with Redis Streams and NATS JetStream, on this machine, in one run.

    python bench/compare.py [--quick] [--systems riverlog,redis,nats] [--out-dir DIR]

Starts each system's server on loopback with its data in a temporary directory (riverlog's
broker as bench/_common.py starts it; redis-server with `appendonly yes`, `appendfsync
everysec`; nats-server with JetStream file storage), runs the same workloads through each
system's usual Python client (bench/compare_<system>.py says which calls), then stops what
it started, also on errors and Ctrl-C. A peer whose server or Python client is missing is
reported and skipped; nothing is installed. To install them (Debian):

    apt-get install redis-server nats-server && pip install -e '.[bench]'

Workloads, each with 100-byte and 1 KiB values (--quick: 100 bytes only), medians of the
repetitions: produce throughput (until every record is acknowledged); consume from the
beginning; consume in a consumer group with commits or acks; end-to-end latency at 1,000
records/s (p50, p99, max; the send time travels in the value and the consumer is another
process); throughput of 1, 2 and 4 consumer processes in one group. Throughput is records/s
over the whole workload, from the first call to the last acknowledgement, commit or record.

Every process of the run (this one and the consumer processes) sets the garbage collector's
thresholds to GC_THRESHOLD, for all systems alike (--default-gc keeps Python's).

Writes compare.md (tables with riverlog/peer ratios), compare.json (every sample) and
compare.png (matplotlib) to the output directory (bench/results/; --quick writes
compare-quick.*). The last line of stdout is one JSON object: headline figures (100-byte
values), the issue's target ratios with PASS/MISS, the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from _common import REPO_ROOT, load_average, machine, process_cpu_s
from compare_common import LatencyPlan, Peer, make_values, percentile

WORKER = str(Path(__file__).with_name("compare_worker.py"))
DEFAULT_OUT_DIR = Path(__file__).with_name("results")
SYSTEMS = ("riverlog", "redis", "nats")
MODULES = {"riverlog": "compare_riverlog", "redis": "compare_redis", "nats": "compare_nats"}
CLASSES = {"riverlog": "Riverlog", "redis": "RedisStreams", "nats": "NatsJetStream"}
# What each peer needs on this machine: its server program and its Python client.
NEEDS = {
    "redis": ("redis-server", ("redis", "hiredis")),
    "nats": ("nats-server", ("nats",)),
}
INSTALL_HINT = (
    "install with: apt-get install redis-server nats-server  (Debian packages), "
    "then pip install -e '.[bench]'  (redis[hiredis], nats-py, matplotlib)"
)
LABELS = {"riverlog": "riverlog", "redis": "Redis Streams", "nats": "NATS JetStream"}
# No workload may run longer than this, whatever the machine does; a consumer process not
# ready or not finished by then fails the run.
PHASE_SECONDS_MAX = 180.0
WORKER_READY_S = 60.0
# Seconds between a worker's last line and its exit before it is killed.
WORKER_EXIT_S = 15.0
LOG_TAIL_CHARS = 3000
SEED = 20240601
WORKLOADS = ("throughput", "latency", "groups")
# The garbage collector's thresholds in every process of the run (the orchestrator and the
# consumer processes), for every system alike: a first threshold of 100,000 instead of 700,
# as stream/client/_producer.py advises a process that moves millions of records.
# --default-gc keeps Python's (700, 10, 10).
GC_THRESHOLD = (100_000, 50, 100)
# Bounds of the command-line overrides: every run stays finite.
RECORDS_MAX = 5_000_000
REPETITIONS_MAX = 9
# The targets, for 100-byte values, as riverlog / peer in the same run. Throughput
# must reach at least the factor; latency p99 must be at most the peer's (factor 1.0).
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("produce_vs_redis", "produce", "redis", 4.0),
    ("produce_vs_nats", "produce", "nats", 10.0),
    ("consume_vs_redis", "consume", "redis", 2.0),
    ("group_vs_redis", "group", "redis", 4.0),
    ("latency_p99_vs_nats", "latency_p99", "nats", 1.0),
)
# Expected before the first run (records/s, ms), for 100-byte values: DESIGN.md's probe of
# Redis and NATS on this machine, and bench/client_bench.py's figures for riverlog.
ESTIMATES = {
    "riverlog": "produce ~500,000/s, consume ~1,000,000/s, group ~800,000/s, p99 ~4 ms",
    "redis": "produce ~120,000/s, consume ~550,000/s, group ~250,000/s, p99 ~0.4 ms",
    "nats": "produce ~36,000/s, consume ~130,000/s, group ~60,000/s, p99 ~0.8 ms",
}


@dataclass(frozen=True, slots=True)
class Settings:
    records: int
    repetitions: int
    value_bytes: tuple[int, ...]
    latency_seconds: float
    latency_warmup_seconds: float
    consumers: tuple[int, ...]
    latency_rate_per_s: int = 1000
    gc_threshold: tuple[int, int, int] = GC_THRESHOLD
    workloads: tuple[str, ...] = WORKLOADS
    quick: bool = False


FULL = Settings(
    records=200_000,
    repetitions=3,
    value_bytes=(100, 1024),
    latency_seconds=10.0,
    latency_warmup_seconds=1.0,
    consumers=(1, 2, 4),
)
QUICK = Settings(
    records=20_000,
    repetitions=1,
    value_bytes=(100,),
    latency_seconds=3.0,
    latency_warmup_seconds=0.5,
    consumers=(1, 2, 4),
    quick=True,
)


# ---------------------------------------------------------------------------- results
@dataclass
class Results:
    """Every sample, by system, value size and figure (records/s, or ms for latency)."""

    samples: dict[str, dict[int, dict[str, list[float]]]] = field(default_factory=dict)

    def add(self, system: str, value_bytes: int, figure: str, value: float) -> None:
        by_size = self.samples.setdefault(system, {}).setdefault(value_bytes, {})
        by_size.setdefault(figure, []).append(value)

    def median(self, system: str, value_bytes: int, figure: str) -> float | None:
        values = self.samples.get(system, {}).get(value_bytes, {}).get(figure)
        return statistics.median(values) if values else None


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- workers
class Worker:
    """A consumer process (bench/compare_worker.py) and the JSON lines it prints."""

    def __init__(self, job: dict[str, Any], log_path: str) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, json.dumps(job)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"worker silent for {timeout_s:.0f} s: {self.tail()}") from None
        if line is None:
            self.proc.wait(timeout=WORKER_EXIT_S)
            raise RuntimeError(f"worker exited ({self.proc.returncode}): {self.tail()}")
        message: dict[str, Any] = json.loads(line)
        return message

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def tail(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=WORKER_EXIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=WORKER_EXIT_S)
        self._log.close()


@contextlib.contextmanager
def workers(jobs: list[dict[str, Any]], log_dir: str) -> Iterator[list[Worker]]:
    """Start one worker per job; stop them all however the block ends."""
    started: list[Worker] = []
    try:
        for i, job in enumerate(jobs):
            started.append(Worker(job, os.path.join(log_dir, f"worker-{job['stream']}-{i}.log")))
        yield started
    finally:
        for w in started:
            w.stop()


# ---------------------------------------------------------------------------- workloads
class Bench:
    def __init__(self, s: Settings, peers: list[Peer], work: str) -> None:
        self.s = s
        self.peers = peers
        self.work = work
        self.results = Results()

    def deadline(self) -> float:
        return time.monotonic() + PHASE_SECONDS_MAX

    def check(self, peer: Peer, what: str, got: int, wanted: int) -> None:
        if got != wanted:
            raise RuntimeError(f"{peer.name} {what}: {got:,} records, expected {wanted:,}")

    def throughput(self, peer: Peer, size: int, values: list[bytes], rep: int) -> None:
        """Produce, consume from the beginning, consume in a group: one stream."""
        n = self.s.records
        stream = f"cmp-{size}-r{rep}"
        peer.create(stream)
        gc.collect()
        seconds = peer.produce(stream, values, n)
        self.check(peer, "produce", peer.length(stream), n)
        self.results.add(peer.name, size, "produce", n / seconds)

        gc.collect()
        got, seconds = peer.consume(stream, n, self.deadline())
        self.check(peer, "consume", got, n)
        self.results.add(peer.name, size, "consume", n / seconds)

        group = f"g-{size}-r{rep}"
        peer.group_create(stream, group, 1)
        end = peer.group_end(stream)
        member = member_class(peer.name)(peer.address, stream, group, "m0")
        try:
            gc.collect()
            started_ns = time.monotonic_ns()
            got, last_ns = member.drain(end, self.deadline())
        finally:
            member.close()
        self.check(peer, "group consume", got, n)
        self.results.add(peer.name, size, "group", n / ((last_ns - started_ns) / 1e9))
        peer.delete(stream)
        log(
            f"  {peer.label:15s} {size:5d} B  rep {rep}: produce {self.last(peer, size, 'produce')}"
            f"  consume {self.last(peer, size, 'consume')}  group {self.last(peer, size, 'group')}"
        )

    def last(self, peer: Peer, size: int, figure: str) -> str:
        return f"{self.results.samples[peer.name][size][figure][-1]:>11,.0f}/s"

    def latency(self, peer: Peer, size: int, rep: int) -> None:
        s = self.s
        plan = LatencyPlan(
            records=round(s.latency_seconds * s.latency_rate_per_s),
            warmup=round(s.latency_warmup_seconds * s.latency_rate_per_s),
            rate_per_s=s.latency_rate_per_s,
            value_bytes=size,
        )
        stream = f"cmp-{size}-l{rep}"
        peer.create(stream)
        job = {
            "system": peer.name,
            "role": "latency",
            "address": peer.address,
            "stream": stream,
            "plan": asdict(plan),
            "seconds_max": PHASE_SECONDS_MAX,
            "gc_threshold": s.gc_threshold,
        }
        with workers([job], self.work) as (w,):
            w.expect(WORKER_READY_S)
            server_cpu_s, producer_cpu_s = process_cpu_s(peer.server_pid), time.process_time()
            sent = peer.send_latency(stream, plan, self.deadline())
            answer = w.expect(PHASE_SECONDS_MAX)
            server_cpu_end_s = process_cpu_s(peer.server_pid)
            producer_cpu_s = time.process_time() - producer_cpu_s
        peer.delete(stream)
        latencies = sorted(answer["latencies_us"])
        if sent != plan.total or answer["seen"] != plan.total:
            raise RuntimeError(
                f"{peer.name} latency: sent {sent:,}, received {answer['seen']:,} of {plan.total:,}"
            )
        for q, figure in ((0.5, "latency_p50"), (0.99, "latency_p99"), (1.0, "latency_max")):
            self.results.add(peer.name, size, figure, percentile(latencies, q) / 1000)
        # CPU time per record of the whole latency run (warm-up included): what the three
        # processes spend to move one record at a time.
        cpu_us = {
            "server": None
            if server_cpu_s is None or server_cpu_end_s is None
            else server_cpu_end_s - server_cpu_s,
            "producer": producer_cpu_s,
            "consumer": float(answer["cpu_s"]),
        }
        for part, spent_s in cpu_us.items():
            if spent_s is not None:
                self.results.add(peer.name, size, f"cpu_{part}_us", spent_s / plan.total * 1e6)
        got = self.results.samples[peer.name][size]
        cpu_text = ", ".join(
            f"{part} {got[f'cpu_{part}_us'][-1]:.0f}" for part in cpu_us if f"cpu_{part}_us" in got
        )
        log(
            f"  {peer.label:15s} {size:5d} B  rep {rep}: latency p50 {got['latency_p50'][-1]:.3f}"
            f" ms  p99 {got['latency_p99'][-1]:.3f} ms  max {got['latency_max'][-1]:.3f} ms"
            f"  ({len(latencies):,} records); CPU us/record: {cpu_text}"
        )

    def group_of(
        self, peer: Peer, size: int, values: list[bytes], members: int, rep: int, shared: str
    ) -> None:
        """`members` consumer processes in one group drain a stream of s.records records.

        riverlog's group forms on an empty topic (its members pause their partitions), the
        topic is then filled, and the clock starts when the members are told to go. Redis
        and NATS members read a stream filled beforehand (`shared`) through a new group:
        they take nothing before they are told to go either."""
        n = self.s.records
        fills_after_join = peer.fills_after_join
        stream = f"cmp-{size}-m{members}-{rep}" if fills_after_join else shared
        group = f"g-{size}-m{members}-{rep}"
        if fills_after_join:
            peer.create(stream)
        peer.group_create(stream, group, members)
        jobs = [
            {
                "system": peer.name,
                "role": "group",
                "address": peer.address,
                "stream": stream,
                "group": group,
                "name": f"c{i}",
                "members": members,
                "seconds_max": PHASE_SECONDS_MAX,
                "gc_threshold": self.s.gc_threshold,
            }
            for i in range(members)
        ]
        with workers(jobs, self.work) as started:
            for w in started:
                w.expect(WORKER_READY_S)
            if fills_after_join:
                peer.produce(stream, values, n, spread=True)
                self.check(peer, "fill", peer.length(stream), n)
            end = peer.group_end(stream)
            go_ns = time.monotonic_ns()
            for w in started:
                w.send({"end": end})
            answers = [w.expect(PHASE_SECONDS_MAX) for w in started]
        if fills_after_join:
            peer.delete(stream)
        got = sum(int(a["records"]) for a in answers)
        self.check(peer, f"group of {members}", got, n)
        seconds = (max(int(a["last_ns"]) for a in answers) - go_ns) / 1e9
        self.results.add(peer.name, size, f"group_{members}", n / seconds)
        log(
            f"  {peer.label:15s} {size:5d} B  rep {rep}: {members} consumer processes "
            f"{n / seconds:>11,.0f}/s  (per member: {[a['records'] for a in answers]})"
        )

    def run(self) -> None:
        s = self.s
        for size in s.value_bytes:
            values = make_values(size, SEED + size)
            if "throughput" in s.workloads:
                log(f"throughput, {size}-byte values, {s.records:,} records:")
                for rep in range(s.repetitions):
                    for peer in self.peers:
                        self.throughput(peer, size, values, rep)
            if "latency" in s.workloads:
                self.run_latency(size)
            if "groups" in s.workloads:
                self.run_groups(size, values)

    def run_latency(self, size: int) -> None:
        s = self.s
        log(
            f"latency, {size}-byte values, {s.latency_rate_per_s:,} records/s for "
            f"{s.latency_seconds:g} s after {s.latency_warmup_seconds:g} s of warm-up:"
        )
        for rep in range(s.repetitions):
            for peer in self.peers:
                self.latency(peer, size, rep)

    def run_groups(self, size: int, values: list[bytes]) -> None:
        s = self.s
        log(f"consumer processes in one group, {size}-byte values, {s.records:,} records:")
        shared = f"cmp-{size}-m"
        for peer in self.peers:
            if not peer.fills_after_join:
                peer.create(shared)
                peer.produce(shared, values, s.records)
                self.check(peer, "fill", peer.length(shared), s.records)
        for members in s.consumers:
            for rep in range(s.repetitions):
                for peer in self.peers:
                    self.group_of(peer, size, values, members, rep, shared)
        for peer in self.peers:
            if not peer.fills_after_join:
                peer.delete(shared)


def member_class(system: str) -> Callable[[str, str, str, str], Any]:
    cls: Callable[[str, str, str, str], Any] = importlib.import_module(MODULES[system]).Member
    return cls


# ---------------------------------------------------------------------------- peers
def find_peers(wanted: list[str]) -> tuple[list[Peer], dict[str, str]]:
    """The systems that can run here, and why each other one cannot."""
    peers: list[Peer] = []
    missing: dict[str, str] = {}
    for system in wanted:
        program, modules = NEEDS.get(system, ("", ()))
        lacking = [m for m in modules if importlib.util.find_spec(m) is None]
        if program and shutil.which(program) is None:
            missing[system] = f"`{program}` is not on PATH"
        elif lacking:
            missing[system] = f"Python package(s) {', '.join(lacking)} not installed"
        else:
            module = importlib.import_module(MODULES[system])
            peers.append(getattr(module, CLASSES[system])())
    return peers, missing


# ---------------------------------------------------------------------------- report
def size_label(value_bytes: int) -> str:
    return f"{value_bytes // 1024} KiB" if value_bytes % 1024 == 0 else f"{value_bytes} B"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or "?"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


ROWS: tuple[tuple[str, str, bool], ...] = (
    ("produce", "produce (records/s)", False),
    ("consume", "consume from the beginning (records/s)", False),
    ("group", "group consume, commits / acks (records/s)", False),
    ("latency_p50", "latency p50 (ms) at 1,000 records/s", True),
    ("latency_p99", "latency p99 (ms)", True),
    ("latency_max", "latency max (ms)", True),
    ("cpu_server_us", "CPU µs per record at 1,000/s: server", False),
    ("cpu_producer_us", "CPU µs per record at 1,000/s: producer process", False),
    ("cpu_consumer_us", "CPU µs per record at 1,000/s: consumer process", False),
)


def figure_rows(s: Settings) -> list[tuple[str, str, bool]]:
    rows = list(ROWS)
    rows += [
        (f"group_{k}", f"group of {k} consumer process{'es' if k > 1 else ''} (records/s)", False)
        for k in s.consumers
    ]
    return rows


def targets(r: Results, systems: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, figure, peer, needed in TARGETS:
        mine, theirs = r.median("riverlog", 100, figure), r.median(peer, 100, figure)
        value = ratio(mine, theirs)
        if peer not in systems or value is None:
            result = "SKIPPED"
        elif figure.startswith("latency"):
            result = "PASS" if value <= needed else "MISS"
        else:
            result = "PASS" if value >= needed else "MISS"
        out[name] = {
            "ratio": None if value is None else round(value, 3),
            "target": f"<= {needed:g}x" if figure.startswith("latency") else f">= {needed:g}x",
            "result": result,
        }
    return out


def markdown(
    s: Settings,
    r: Results,
    systems: list[str],
    header: dict[str, Any],
    hits: dict[str, dict[str, Any]],
) -> str:
    peers = [p for p in systems if p != "riverlog"]
    head = ["workload", "values", *(LABELS[p] for p in systems)]
    head += [f"riverlog / {LABELS[p].split()[0]}" for p in peers]
    lines = [
        f"Machine: {header['machine_line']}. Date: {header['date']}. Load average (1 min): "
        f"{header['load_start']} at start, {header['load_end']} at end.",
        "",
        f"{s.records:,} records per run, median of {s.repetitions} run(s); ratios are "
        "riverlog / peer (throughput: higher is better for riverlog; latency and CPU: lower is).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for figure, label, is_ms in figure_rows(s):
        for size in s.value_bytes:
            mine = r.median("riverlog", size, figure)
            if mine is None:
                continue  # a workload left out (--workloads)
            fmt = fmt_ms if is_ms else fmt_rate
            cells = [label, size_label(size)]
            cells += [fmt(r.median(p, size, figure)) for p in systems]
            cells += [fmt_ratio(ratio(mine, r.median(p, size, figure))) for p in peers]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| target (100-byte values) | riverlog / peer | needed | result |",
        "|---|---|---|---|",
    ]
    for name, hit in hits.items():
        lines.append(f"| {name} | {fmt_ratio(hit['ratio'])} | {hit['target']} | {hit['result']} |")
    lines += ["", "Settings per system:", ""]
    for system, described in header["systems"].items():
        lines.append(f"- {LABELS[system]}: " + "; ".join(f"{k}: {v}" for k, v in described.items()))
    for system, why in header["skipped"].items():
        lines.append(f"- {LABELS[system]}: SKIPPED ({why})")
    return "\n".join(lines) + "\n"


def chart(s: Settings, r: Results, systems: list[str], path: Path, title: str) -> bool:
    """The figures as a PNG; False when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    colors = {"riverlog": "#1f77b4", "redis": "#d62728", "nats": "#2ca02c"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    width = 0.8 / max(1, len(systems))
    groups = [(f, size) for f in ("produce", "consume", "group") for size in s.value_bytes]
    ax = axes[0]
    for i, system in enumerate(systems):
        heights = [r.median(system, size, f) or 0 for f, size in groups]
        xs = [x + i * width for x in range(len(groups))]
        ax.bar(xs, heights, width, label=LABELS[system], color=colors[system])
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{f}\n{size} B" for f, size in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("records/s (log scale)")
    ax.set_title("throughput")
    ax.legend(fontsize=8)
    ax = axes[1]
    lat = [(f, size) for f in ("latency_p50", "latency_p99") for size in s.value_bytes]
    for i, system in enumerate(systems):
        heights = [r.median(system, size, f) or 0 for f, size in lat]
        xs = [x + i * width for x in range(len(lat))]
        ax.bar(xs, heights, width, label=LABELS[system], color=colors[system])
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(lat))])
    ax.set_xticklabels([f"{f.split('_')[1]}\n{size} B" for f, size in lat], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title(f"end-to-end latency at {s.latency_rate_per_s:,} records/s")
    ax = axes[2]
    for system in systems:
        for size, style in zip(s.value_bytes, ("-o", "--s"), strict=False):
            ys = [r.median(system, size, f"group_{k}") or 0 for k in s.consumers]
            ax.plot(
                s.consumers, ys, style, color=colors[system], label=f"{LABELS[system]} {size} B"
            )
    ax.set_xticks(list(s.consumers))
    ax.set_xlabel("consumer processes in one group")
    ax.set_ylabel("records/s")
    ax.set_title("group consume, several processes")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def headline(r: Results, systems: list[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for figure, key, digits in (
        ("produce", "produce_records_per_s", 0),
        ("consume", "consume_records_per_s", 0),
        ("group", "group_records_per_s", 0),
        ("latency_p50", "latency_p50_ms", 3),
        ("latency_p99", "latency_p99_ms", 3),
        ("latency_max", "latency_max_ms", 3),
    ):
        out[key] = {}
        for system in systems:
            value = r.median(system, 100, figure)
            out[key][system] = None if value is None else round(value, digits)
    return out


# ---------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20,000 records, 1 run, 100-byte values only, 3 s of latency",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of " + ",".join(SYSTEMS),
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--records", type=int, help="records per run (overrides the preset)")
    parser.add_argument("--repetitions", type=int, help="runs per figure (overrides the preset)")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated subset of " + ",".join(WORKLOADS),
    )
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help=f"keep Python's garbage-collector thresholds (default: {GC_THRESHOLD})",
    )
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    if args.default_gc:
        s = replace(s, gc_threshold=gc.get_threshold())
    if args.records is not None:
        s = replace(s, records=max(1, min(args.records, RECORDS_MAX)))
    if args.repetitions is not None:
        s = replace(s, repetitions=max(1, min(args.repetitions, REPETITIONS_MAX)))
    chosen = tuple(w for w in WORKLOADS if w in args.workloads.split(","))
    s = replace(s, workloads=chosen)
    wanted = [x for x in args.systems.split(",") if x]
    unknown = set(wanted) - set(SYSTEMS)
    if unknown or "riverlog" not in wanted:
        parser.error(f"--systems: riverlog and any of redis, nats (got {args.systems!r})")

    gc.set_threshold(*s.gc_threshold)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops servers
    info = machine({"cpu": cpu_model()})
    load_start = load_average()
    log("# riverlog vs Redis Streams vs NATS JetStream" + (" (quick)" if s.quick else ""))
    log("settings: " + json.dumps(asdict(s)))
    log("machine: " + json.dumps(info))
    log(f"load average (1 min) at start: {load_start}  (other processes share the CPUs)")
    log("estimates before the first run (100-byte values):")
    for system in wanted:
        log(f"  {LABELS[system]:15s} {ESTIMATES[system]}")
    peers, skipped = find_peers(wanted)
    for system, why in skipped.items():
        log(f"SKIPPED {LABELS[system]}: {why}; {INSTALL_HINT}")

    work = tempfile.mkdtemp(prefix="riverlog-compare-")
    bench = Bench(s, peers, work)
    started: list[Peer] = []
    described: dict[str, dict[str, str]] = {}
    began = time.monotonic()
    try:
        for peer in peers:
            peer.start(work)
            started.append(peer)
        described = {p.name: p.describe() for p in peers}
        for system, d in described.items():
            log(f"{LABELS[system]}: " + "; ".join(f"{k}: {v}" for k, v in d.items()))
        bench.run()
    finally:
        for peer in reversed(started):
            try:
                peer.stop()
            except Exception as e:  # the others must still be stopped
                log(f"stopping {peer.name} failed: {e!r}")
        shutil.rmtree(work, ignore_errors=True)
    load_end = load_average()
    seconds = time.monotonic() - began
    systems = [p.name for p in peers]
    r = bench.results
    hits = targets(r, systems)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine_line = (
        f"{info['cpu_count']} x {info['cpu']}, {info['platform']}, Python {info['python']}"
    )
    header = {
        "machine_line": machine_line,
        "date": date,
        "load_start": load_start,
        "load_end": load_end,
        "systems": described,
        "skipped": skipped,
    }
    table = markdown(s, r, systems, header, hits)
    log("")
    log(table)
    stem = "compare-quick" if s.quick else "compare"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.md").write_text(table)
    summary = {
        **headline(r, systems),
        "targets": hits,
        "skipped": skipped,
        "quick": s.quick,
        "seconds": round(seconds),
        "load_average_1m": [load_start, load_end],
        "date": date,
    }
    full = {
        **summary,
        "machine": info,
        "settings": asdict(s),
        "systems": described,
        "samples": {
            system: {str(size): figures for size, figures in by_size.items()}
            for system, by_size in r.samples.items()
        },
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(full, indent=1) + "\n")
    png = args.out_dir / f"{stem}.png"
    if chart(s, r, systems, png, f"{machine_line}; {date}; load {load_start}->{load_end}"):
        log(f"wrote {args.out_dir / stem}.md, .json, .png in {seconds:.0f} s")
    else:
        log(f"wrote {args.out_dir / stem}.md, .json (no chart: matplotlib is not installed)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
