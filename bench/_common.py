"""Helpers shared by the benchmarks in bench/: machine report, record batches, server children.

Not a benchmark itself. The scripts are run as `python bench/x.py`, so bench/ is the first
entry of sys.path and they import this module as `_common`.
"""

from __future__ import annotations

import os
import platform
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google.protobuf
import grpc

import storage
from storage import NewRecord

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000  # throughput unit: MB/s figures are 10**6 bytes a second

REPO_ROOT = Path(__file__).resolve().parents[1]
# Server children listen on loopback only: the benchmarks never leave the machine.
LOOPBACK = "127.0.0.1"

# One record: a 10-byte key and a 90-byte value, 100 bytes of payload (the record size of
# Kafka's often-quoted producer benchmarks).
RECORD_KEY_BYTES = 10
RECORD_VALUE_BYTES = 90
# encode_batches steps the record count down from its estimate at most this often: varint
# widths make a batch's size slightly non-linear in its record count, by a few records only.
BATCH_FIT_STEPS_MAX = 64

# Start-up of a server child: the interpreter imports grpc and numpy and binds the port.
START_TIMEOUT_S = 30.0
# A free port is picked by binding port 0 and closing it; another process may take it first.
START_ATTEMPTS_MAX = 5
# How often a starting child is checked for having exited while its port is awaited.
READY_POLL_S = 0.25
# A SIGKILLed child is reaped within this long, or the bench fails rather than hangs.
STOP_WAIT_S = 10.0
# Server children print this when their port is taken: start_child then tries another.
CANNOT_LISTEN = "cannot listen"
# Tail of a failed child's log quoted in the error.
LOG_TAIL_CHARS = 3000


# ---------------------------------------------------------------------------- machine
def machine(versions: Mapping[str, str]) -> dict[str, Any]:
    """Platform, Python and CPU count, then `versions` (library name -> version)."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        **versions,
    }


def grpc_versions() -> dict[str, str]:
    """The versions that matter to a benchmark over gRPC, for `machine`."""
    return {"grpcio": grpc.__version__, "protobuf": google.protobuf.__version__}


def load_average() -> float | None:
    """The 1-minute load average: above ~0 means other work shared the CPUs during the run."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------- header
def print_fields(fields: Mapping[str, object], width: int) -> None:
    """One indented `key value` line per field, keys padded to `width`, ints with
    thousands separators (settings are mostly byte counts)."""
    for key, value in fields.items():
        text = f"{value:,}" if type(value) is int else str(value)
        print(f"  {key:{width}s} {text}")


def print_load_average_at_start(width: int) -> float | None:
    """Print the load average as a settings line (label padded to `width`); return it."""
    load = load_average()
    print(f"  {'load average (1 min)':{width}s} {load} at start (other processes share the CPUs)")
    return load


def print_estimates(
    estimates: Mapping[str, tuple[float, str]], name_width: int, value_width: int
) -> None:
    """The estimates section: each figure's expected value and why, as written before the
    first run."""
    print("estimates (written before the first run):")
    for name, (value, why) in estimates.items():
        print(f"  {name:{name_width}s} {value:{value_width},.4g}   {why}")


# ---------------------------------------------------------------------------- batches
def encode_batches(
    now_ms: int, seed: int, batch_bytes_max: int, distinct: int, probe_records: int
) -> tuple[list[bytes], int]:
    """`distinct` encoded batches of equal record count, each at most `batch_bytes_max`
    bytes, and that count. Records are RECORD_KEY_BYTES + RECORD_VALUE_BYTES, values random
    from `seed`. The count is estimated from a probe batch of `probe_records` records (which
    draws from the same random stream, so it is part of what the seed yields)."""
    rng = random.Random(seed)

    def batch(n: int, salt: int) -> bytes:
        records = [
            NewRecord(
                f"k{salt:02d}-{i:06d}".encode()[:RECORD_KEY_BYTES].ljust(RECORD_KEY_BYTES, b"-"),
                rng.randbytes(RECORD_VALUE_BYTES),
                now_ms,
            )
            for i in range(n)
        ]
        return storage.encode_batch(records)

    per_record = (len(batch(probe_records, 0)) - storage.HEADER_BYTES) / probe_records
    count = int((batch_bytes_max - storage.HEADER_BYTES) // per_record) + 1
    for _ in range(BATCH_FIT_STEPS_MAX):
        if len(batch(count, 0)) <= batch_bytes_max:
            break
        count -= 1
    else:
        raise AssertionError(f"no record count near {count} fits {batch_bytes_max} bytes")
    batches = [batch(count, salt) for salt in range(distinct)]
    assert all(len(b) <= batch_bytes_max for b in batches)
    return batches, count


# ---------------------------------------------------------------------------- children
def free_port() -> int:
    """A loopback TCP port free at the time of the call (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    """A server child process listening on `address`, its output in `log_path`."""

    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log_path: str


def broker_command(data_dir: str) -> Callable[[str], list[str]]:
    """The command line of a broker (`stream.cli serve`, defaults but for the data directory)
    listening on a given address, for `start_child`."""

    def command(address: str) -> list[str]:
        return [
            *(sys.executable, "-m", "stream.cli", "serve"),
            *("--data-dir", data_dir, "--listen", address),
        ]

    return command


def start_child(
    name: str,
    command: Callable[[str], list[str]],
    log_dir: str,
    credentials: grpc.ChannelCredentials | None = None,
) -> Child:
    """Start a server child on a free loopback port and wait until it accepts connections
    (over TLS with `credentials`, when the child serves TLS).

    `command(address)` is its command line; its output goes to `log_dir`/`name`-attempt.log.
    A child that exits saying CANNOT_LISTEN lost its port to another process and is started
    again on another, up to START_ATTEMPTS_MAX times; any other failure raises at once."""
    for attempt in range(START_ATTEMPTS_MAX):
        address = f"{LOOPBACK}:{free_port()}"
        log_path = os.path.join(log_dir, f"{name}-{attempt}.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                command(address),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        child = Child(name, proc, address, log_path)
        if wait_ready(child, START_TIMEOUT_S, credentials):
            return child
        stop_child(child)
        text = Path(log_path).read_text(errors="replace")
        if CANNOT_LISTEN not in text:
            raise RuntimeError(
                f"{name} did not start (exit {proc.returncode}):\n{text[-LOG_TAIL_CHARS:]}"
            )
    raise RuntimeError(f"{name}: no free port after {START_ATTEMPTS_MAX} attempts")


def wait_ready(
    child: Child, timeout_s: float, credentials: grpc.ChannelCredentials | None = None
) -> bool:
    """True once the child accepts gRPC connections (a TLS handshake with `credentials`);
    False if it exits or `timeout_s` passes."""
    with (
        grpc.insecure_channel(child.address)
        if credentials is None
        else grpc.secure_channel(child.address, credentials)
    ) as channel:
        ready = grpc.channel_ready_future(channel)
        for _ in range(int(timeout_s / READY_POLL_S) + 1):
            if child.proc.poll() is not None:
                return False
            try:
                ready.result(timeout=READY_POLL_S)
            except grpc.FutureTimeoutError:
                continue
            return True
    return False


def stop_child(child: Child) -> None:
    """SIGKILL: the data directory is thrown away, so no clean shutdown is needed."""
    if child.proc.poll() is None:
        child.proc.send_signal(signal.SIGKILL)
    child.proc.wait(timeout=STOP_WAIT_S)
