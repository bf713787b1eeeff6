"""Consumer-group rebalance benchmark over gRPC: join, leave, crash and static restart.

    python bench/groups_bench.py [--quick] [--seed N]

A benchmark, not a test: it prints its settings, the estimate expected before it was run,
each figure next to its estimate, and as its last line one JSON object.

The broker runs as its own process (`python -m stream.cli serve`, defaults but for the data
directory and a free loopback port; its background worker runs `expire()` every second). The
members are simulated in this process, one asyncio loop over one grpc.aio channel: the client
side of the protocol and nothing else. A member heartbeats at the `heartbeat_interval_ms` of
its last answer, adopts each answer at once (it works exactly `assignment`, no records, no
commits) and reports that as `owned` in its next heartbeat. It does not heartbeat early after
giving partitions back: the broker's answer already asks for RECONCILE_HEARTBEAT_INTERVAL_MS
while a hand-over is in progress. One topic of `partitions` partitions; every member
subscribes to it.

Scenarios, each `repeats` times, each event after a pause drawn uniformly from one stable
heartbeat interval (so the event falls at a random phase of the members' heartbeats):

  join      a 4th member joins a stable group of 3
  leave     one of 4 members (chosen at random) sends LeaveGroup
      both with the client default session timeout (45 s, so a stable member heartbeats
      every HEARTBEAT_INTERVAL_MS_MAX = 5 s), alternating join, leave, join, ... on one
      group; and again, as `join_s1000` / `leave_s1000`, with session_timeout_ms 1,000
      (stable interval 333 ms) on a second group.
  crash     one of 4 members (random) stops heartbeating, session_timeout_ms 1,000 (the
      minimum). Two figures: crash to stable (includes the session timeout and its
      detection) and the session expiry deadline (the broker's last_heartbeat_ms of the
      crashed member + session_timeout_ms, read from DescribeGroup) to stable. Each crash
      follows an untimed join that brings the group back to 4.
  static    4 static members (instance ids), default session timeout; one (random) stops
      without leaving, and `restart_gap_ms` later a new incarnation joins with the same
      instance id (member id "", epoch 0, no `owned`). Expected: no partition moves, the
      group never leaves "stable".

What each figure measures:

  rebalance time (headline)
      from the triggering event (just before the join heartbeat or LeaveGroup is sent, or the
      crash) to the latest of the members' "converged" moments: the receipt of the first
      heartbeat answer from which on the member's answers equal its final assignment with no
      `pending`. The final assignment is the one DescribeGroup shows once the group is stable.
      p50 / p99 by nearest rank: with fewer than 100 samples p99 is the maximum.
  heard / after heard / spread (the breakdown)
      event (crash: the session deadline) to the moment every member present before and after
      had the answer to a heartbeat sent since the event: how long the broker waits for the
      members to come and hear of the change. "After heard" is the rest, the hand-over
      itself. "Spread" is first to last of those answers: how far apart the members'
      heartbeats fall.
  describe time (cross-check)
      from the event to the first DescribeGroup answer (polled every `describe_poll_ms`) with
      state "stable", exactly the expected members, no `pending`, and the members'
      assignments covering every partition once. An upper bound: poll period + one RPC later.
  moves
      partitions whose owner (a simulated process: a restarted static member is the same
      owner) differs before and after; printed next to the fewest any balanced assignment
      needs (departed members' partitions + what members over their new quota must give up).
  continuity violations
      partitions a member owned before and after the event that were missing from one of
      its heartbeat answers in between (each missing partition in each answer counts once).
  double-owned
      a member's answer gave it a partition that another live simulated member still worked
      (by the answers each had adopted). Should be 0: hand-over is revoke-then-assign.
  heartbeat RTT (context)
      one Heartbeat call, send to answer, over all heartbeats of the run.
  heartbeat broker CPU (context, the price of heartbeating more often)
      broker process CPU (/proc) over `cost_heartbeats` back-to-back heartbeats of one member
      of the stable static group, per heartbeat.

Run time: quick ~2 min, full ~8 min, almost all of it waiting for 5 s heartbeat intervals.

Noise: two cores shared by this process, the broker and other work (see the load averages).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import grpc.aio
from _common import (
    Child,
    broker_command,
    grpc_versions,
    load_average,
    machine,
    print_estimates,
    print_fields,
    print_load_average_at_start,
    process_cpu_s,
    start_child,
    stop_child,
)

from stream._pb import admin_pb2, admin_pb2_grpc, groups_pb2, groups_pb2_grpc, types_pb2
from stream.groups._coordinator import (
    HEARTBEAT_FRACTION,
    HEARTBEAT_INTERVAL_MS_MAX,
    RECONCILE_HEARTBEAT_INTERVAL_MS,
    SESSION_TIMEOUT_MS_DEFAULT,
    SESSION_TIMEOUT_MS_MIN,
)

TOPIC = "rebalance"
# Members in each group before a join and after a leave or crash.
MEMBERS_BASE = 3
# Every RPC gets a deadline, so no call can hang the bench.
RPC_TIMEOUT_S = 10.0
# A rebalance not stable this long after its event fails the bench (the slowest expected is
# a crash: session timeout + one background period + two heartbeat intervals, ~2.7 s; a
# join or leave at the default session: one 5 s interval + two reconcile intervals).
REBALANCE_SECONDS_MAX = 30.0
# Once DescribeGroup shows the group stable, the members' last answers are at most one
# in-flight RPC behind; they get this long to arrive.
ANSWERS_GRACE_S = 2.0
ANSWERS_POLL_S = 0.001
# A member keeps this many of its latest answers. While reconciling it heartbeats every
# RECONCILE_HEARTBEAT_INTERVAL_MS, so a whole rebalance window fits many times over.
ANSWERS_KEPT_MAX = 4096
assert ANSWERS_KEPT_MAX > 2 * REBALANCE_SECONDS_MAX * 1000 / RECONCILE_HEARTBEAT_INTERVAL_MS
# Bound on one simulated member's heartbeats (a full run sends a few thousand in all).
HEARTBEATS_PER_MEMBER_MAX = 1_000_000
# Heartbeat round trips kept for the RTT figures.
RTTS_KEPT_MAX = 1_000_000
# After a static member's new incarnation has its partitions, DescribeGroup keeps being
# polled this long for any sign of a rebalance.
STATIC_WATCH_AFTER_MS = 500

# Printed column widths: settings labels ('fast_session_timeout_ms'), then figure names
# ('crash_deadline_to_stable_p50_ms') and values (milliseconds, up to a few thousand), the
# estimates lined up above the results.
LABEL_WIDTH = 30
FIGURE_NAME_WIDTH = 34
FIGURE_VALUE_WIDTH = 10


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    partitions: int
    repeats: int  # samples per scenario
    session_timeout_ms: int  # join, leave, static: the client default
    fast_session_timeout_ms: int  # crash, join_s1000, leave_s1000: the minimum
    restart_gap_ms: int  # a static member is down this long
    describe_poll_ms: int
    cost_heartbeats: int  # back-to-back heartbeats of the broker CPU probe


FULL = Settings(
    quick=False,
    partitions=32,
    repeats=30,
    session_timeout_ms=SESSION_TIMEOUT_MS_DEFAULT,
    fast_session_timeout_ms=SESSION_TIMEOUT_MS_MIN,
    restart_gap_ms=1000,
    describe_poll_ms=10,
    cost_heartbeats=3000,
)
QUICK = Settings(
    quick=True,
    partitions=16,
    repeats=8,
    session_timeout_ms=SESSION_TIMEOUT_MS_DEFAULT,
    fast_session_timeout_ms=SESSION_TIMEOUT_MS_MIN,
    restart_gap_ms=500,
    describe_poll_ms=10,
    cost_heartbeats=1000,
)
assert FULL.restart_gap_ms < FULL.session_timeout_ms, "a static restart must beat the session"


def stable_interval_ms(session_timeout_ms: int) -> int:
    """The heartbeat interval the coordinator gives a member with nothing to reconcile."""
    return min(HEARTBEAT_INTERVAL_MS_MAX, session_timeout_ms // HEARTBEAT_FRACTION)


def _estimates() -> dict[str, tuple[float, str]]:
    """What I expected before the first run, from the protocol as written (no run yet).

    Each member whose target changes learns it only at its next regular heartbeat, which
    falls uniformly within one stable interval I after the event; the rebalance waits for the
    last of the k members concerned: the median of the max of k uniforms is I * 0.5**(1/k).
    A join then needs the revoking member's next heartbeat (its ack, one reconcile interval
    R later) and the new member's next poll (up to R more)."""
    slow = stable_interval_ms(SESSION_TIMEOUT_MS_DEFAULT)
    fast = stable_interval_ms(SESSION_TIMEOUT_MS_MIN)
    r = RECONCILE_HEARTBEAT_INTERVAL_MS

    def last_of(k: int, interval: int, q: float) -> float:
        return interval * math.pow(q, 1 / k)

    return {
        "rebalance_join_p50_ms": (
            last_of(3, slow, 0.5) + 1.5 * r,
            f"3 old members each wait up to one {slow} ms interval, then ack + new member poll",
        ),
        "rebalance_join_p99_ms": (last_of(3, slow, 0.99) + 2 * r, "as p50, worst phase"),
        "rebalance_leave_p50_ms": (
            last_of(3, slow, 0.5),
            f"3 members each take their share at their next heartbeat (<= {slow} ms)",
        ),
        "rebalance_leave_p99_ms": (last_of(3, slow, 0.99), "as p50, worst phase"),
        "rebalance_join_s1000_p50_ms": (
            last_of(3, fast, 0.5) + 1.5 * r,
            f"as join with a {fast} ms interval",
        ),
        "rebalance_leave_s1000_p50_ms": (last_of(3, fast, 0.5), f"as leave, {fast} ms interval"),
        "rebalance_crash_p50_ms": (
            SESSION_TIMEOUT_MS_MIN - fast / 2 + last_of(3, fast, 0.5),
            "crash lands mid-interval after its last heartbeat; the session runs out; the first "
            "heartbeat of another member after the deadline expires it",
        ),
        "rebalance_crash_p99_ms": (
            SESSION_TIMEOUT_MS_MIN + last_of(3, fast, 0.99),
            "crash just after a heartbeat, worst phase of the others",
        ),
        "crash_deadline_to_stable_p50_ms": (
            last_of(3, fast, 0.5),
            "each of the 3 survivors needs one heartbeat after the deadline",
        ),
        "static_restart_moves": (0.0, "the new incarnation takes the old one's partitions"),
        "heartbeat_rtt_p50_ms": (1.0, "a unary call on loopback, one lock, a small assignor"),
    }


ESTIMATES = _estimates()
# Afterwards (two full runs, 30 samples each): join p50 3.0-3.1 s, leave p50 2.9 s, under
# the max-of-3 estimate because the members' heartbeats run in lockstep: a member that gains
# partitions starts its stable interval when it gets them, just after the releasing member's
# ack, so after a few rebalances the three fall within ~0.3 s of each other (spread p50 0.3 s)
# and the wait is nearer one uniform interval than the last of three. p99 ~4.9 s as expected:
# at the default session a rebalance waits up to one stable interval (5 s) for the members
# to hear of it; the 100 ms reconcile interval only shortens the rest (~150 ms of a join).
# Session 1,000 ms and the crash came out as estimated.


# ---------------------------------------------------------------------------- helpers
def now_ns() -> int:
    return time.perf_counter_ns()


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def partitions_of(items: Any) -> frozenset[int]:
    """Partition numbers of TOPIC in repeated TopicPartitions."""
    out: set[int] = set()
    for tp in items:
        if tp.topic != TOPIC:
            raise RuntimeError(f"an answer names topic {tp.topic!r}; only {TOPIC!r} exists")
        out.update(tp.partitions)
    return frozenset(out)


def moves_min(before: dict[str, frozenset[int]], after: set[str], partitions: int) -> int:
    """The fewest moves any balanced assignment of `after` needs, starting from `before`:
    members keeping the most get the larger (ceil) quotas."""
    low, extra = divmod(partitions, len(after))
    held = sorted((len(before.get(name, frozenset())) for name in after), reverse=True)
    kept = sum(min(h, low + (1 if i < extra else 0)) for i, h in enumerate(held))
    return partitions - kept


# ---------------------------------------------------------------------------- members
@dataclass(frozen=True, slots=True)
class Answer:
    sent_ns: int  # when the heartbeat went out
    t_ns: int  # when this process had the answer
    assignment: frozenset[int]
    pending: frozenset[int]


class Member:
    """One simulated consumer process: the client side of the heartbeat protocol."""

    def __init__(
        self, group: Group, name: str, session_timeout_ms: int, instance_id: str | None
    ) -> None:
        self.group = group
        self.name = name  # the simulated process; a static member's incarnations share it
        self.session_timeout_ms = session_timeout_ms
        self.instance_id = instance_id
        self.member_id = ""
        self.epoch = 0
        self.owned: frozenset[int] = frozenset()
        self.interval_ms = 0
        self.answers: deque[Answer] = deque(maxlen=ANSWERS_KEPT_MAX)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"member-{self.name}")

    async def stop(self) -> None:
        """Stop heartbeating (no LeaveGroup); a heartbeat in flight completes first."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, RPC_TIMEOUT_S + 1)

    async def _run(self) -> None:
        for _ in range(HEARTBEATS_PER_MEMBER_MAX):
            if self._stop.is_set():
                return
            if not await self.heartbeat():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_ms / 1000)
        self.group.fail(f"{self.name}: {HEARTBEATS_PER_MEMBER_MAX} heartbeats, the bound")

    async def heartbeat(self) -> bool:
        """One heartbeat, its answer adopted; False (and the group told) if it failed."""
        request = groups_pb2.HeartbeatRequest(
            group_id=self.group.group_id,
            member_id=self.member_id,
            member_epoch=self.epoch,
            session_timeout_ms=self.session_timeout_ms,
        )
        if self.instance_id is not None:
            request.instance_id = self.instance_id
        if not self.member_id:
            # Joining: a subscription, and no `owned` (this incarnation was given nothing).
            request.subscription.topics.append(TOPIC)
        else:
            request.owned.topics.append(
                types_pb2.TopicPartitions(topic=TOPIC, partitions=sorted(self.owned))
            )
        sent = now_ns()
        try:
            answer = await self.group.stub.Heartbeat(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            self.group.fail(
                f"{self.name} (member {self.member_id or '-'} epoch {self.epoch}): heartbeat "
                f"failed: {e.code().name} {e.details()}"
            )
            return False
        received = now_ns()
        self.group.rtts_ns.append(received - sent)
        self._adopt(answer, sent, received)
        return True

    def _adopt(self, answer: groups_pb2.HeartbeatResponse, sent_ns: int, t_ns: int) -> None:
        assignment = partitions_of(answer.assignment)
        pending = partitions_of(answer.pending)
        owner = self.group.owner
        for p in sorted(assignment - self.owned):
            other = owner.get(p)
            if other is not None and other != self.name:
                self.group.double_owned.append(
                    f"{self.name} was given partition {p} while {other} still worked it"
                )
        for p in self.owned - assignment:
            if owner.get(p) == self.name:
                del owner[p]
        for p in assignment:
            owner[p] = self.name
        self.member_id = answer.member_id
        self.epoch = answer.member_epoch
        self.interval_ms = answer.heartbeat_interval_ms
        self.owned = assignment
        self.answers.append(Answer(sent_ns, t_ns, assignment, pending))

    def converged_ns(
        self, final: frozenset[int], t0_ns: int, before: frozenset[int] | None
    ) -> int | None:
        """When this member's answers settled on `final` (no pending) after the event at
        t0_ns; None if its latest answer does not show that yet."""
        since = [a for a in self.answers if a.t_ns >= t0_ns]
        settled = t0_ns if before == final else None
        for a in since:
            if a.assignment == final and not a.pending:
                if settled is None:
                    settled = a.t_ns
            else:
                settled = None
        return settled

    def first_answer_ns(self, t_ns: int) -> int | None:
        """When the answer to the first heartbeat sent at or after t_ns arrived (None: none
        yet). A heartbeat in flight at t_ns may have been handled before the event."""
        return next((a.t_ns for a in self.answers if a.sent_ns >= t_ns), None)

    def missing_kept(self, kept: frozenset[int], t0_ns: int) -> int:
        """Partitions of `kept` absent from any answer since t0_ns (each answer counts)."""
        return sum(len(kept - a.assignment) for a in self.answers if a.t_ns >= t0_ns)


# ---------------------------------------------------------------------------- one group
@dataclass(frozen=True, slots=True)
class Rebalance:
    scenario: str
    answers_ms: float  # event -> every member's answers settled on the final assignment
    describe_ms: float  # event -> first stable DescribeGroup
    moves: int
    moves_min: int
    continuity_violations: int
    # Event (crash: the session deadline) -> every member present before and after has had
    # the answer to a heartbeat sent since: the wait for members to learn of the change; the
    # rest is the hand-over.
    heard_ms: float | None = None
    # First to last of those members' first answers: how far apart their heartbeats fall.
    heard_spread_ms: float | None = None
    deadline_to_stable_ms: float | None = None  # crash only
    unstable_polls: int = 0  # static only: DescribeGroup answers not "stable" with 4 members


@dataclass
class Group:
    stub: groups_pb2_grpc.GroupsAsyncStub
    group_id: str
    partitions: int
    describe_poll_ms: int
    rtts_ns: deque[int]
    members: dict[str, Member] = field(default_factory=dict)  # live simulated members
    owner: dict[int, str] = field(default_factory=dict)  # partition -> member working it
    errors: list[str] = field(default_factory=list)
    double_owned: list[str] = field(default_factory=list)
    _names: int = 0

    def fail(self, message: str) -> None:
        self.errors.append(message)

    def check(self) -> None:
        if self.errors:
            raise RuntimeError(f"group {self.group_id}: {self.errors[0]}")

    def new_name(self) -> str:
        self._names += 1
        return f"m{self._names}"

    def snapshot(self) -> dict[str, frozenset[int]]:
        """What each live member works (the group is stable, so this is the broker's view)."""
        out = {name: m.owned for name, m in self.members.items()}
        covered = [p for ps in out.values() for p in ps]
        if sorted(covered) != list(range(self.partitions)):
            raise RuntimeError(f"group {self.group_id} not stable before an event: {out}")
        return out

    def _forget(self, name: str) -> Member:
        """The simulated process is gone: it works nothing any more."""
        member = self.members.pop(name)
        for p in member.owned:
            if self.owner.get(p) == name:
                del self.owner[p]
        return member

    async def describe(self) -> groups_pb2.DescribeGroupResponse:
        return await self.stub.DescribeGroup(
            groups_pb2.DescribeGroupRequest(group_id=self.group_id), timeout=RPC_TIMEOUT_S
        )

    def stable_view(
        self, d: groups_pb2.DescribeGroupResponse, expected: set[str]
    ) -> dict[str, frozenset[int]] | None:
        """Name -> assignment if `d` shows the group stable with exactly `expected`."""
        if d.state != "stable" or len(d.members) != len(expected):
            return None
        by_id = {m.member_id: name for name, m in self.members.items()}
        view: dict[str, frozenset[int]] = {}
        for m in d.members:
            name = by_id.get(m.member_id)
            if name is None or name not in expected or partitions_of(m.pending):
                return None
            view[name] = partitions_of(m.assignment)
        covered = sorted(p for ps in view.values() for p in ps)
        if covered != list(range(self.partitions)) or set(view) != expected:
            return None
        return view

    async def wait_stable(self, t0_ns: int) -> tuple[int, dict[str, frozenset[int]]]:
        """Poll DescribeGroup until the live members are the whole, stable group."""
        expected = set(self.members)
        polls = int(REBALANCE_SECONDS_MAX * 1000 / self.describe_poll_ms) + 1
        d = groups_pb2.DescribeGroupResponse()
        for _ in range(polls):
            self.check()
            try:
                d = await self.describe()
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:  # no member has joined yet
                    raise
                d = groups_pb2.DescribeGroupResponse(state="unknown group")
            t = now_ns()
            view = self.stable_view(d, expected)
            if view is not None:
                return t, view
            if t - t0_ns > REBALANCE_SECONDS_MAX * 1e9:
                break
            await asyncio.sleep(self.describe_poll_ms / 1000)
        raise RuntimeError(
            f"group {self.group_id} not stable {REBALANCE_SECONDS_MAX:g} s after the event: "
            f"state {d.state!r}, members "
            f"{[(m.member_id[:8], sorted(partitions_of(m.assignment))) for m in d.members]}, "
            f"expected {sorted(expected)}"
        )

    async def measure(
        self,
        scenario: str,
        t0_ns: int,
        before: dict[str, frozenset[int]],
        heard_from_ns: int | None = None,
    ) -> tuple[Rebalance, int]:
        """Wait for the rebalance the event at t0_ns started; (figures, settled time).

        `heard_from_ns`: since when members count as told of the change (default t0_ns)."""
        t_describe, final = await self.wait_stable(t0_ns)
        settled: dict[str, int | None] = {}
        for _ in range(int(ANSWERS_GRACE_S / ANSWERS_POLL_S) + 1):
            settled = {
                name: self.members[name].converged_ns(final[name], t0_ns, before.get(name))
                for name in final
            }
            if all(t is not None for t in settled.values()):
                break
            await asyncio.sleep(ANSWERS_POLL_S)
        late = sorted(name for name, t in settled.items() if t is None)
        if late:
            raise RuntimeError(
                f"group {self.group_id}: stable, but after {ANSWERS_GRACE_S} s the answers of "
                f"{late} still differ from their final assignment"
            )
        t_settled = max(t for t in settled.values() if t is not None)
        owner_before = {p: name for name, ps in before.items() for p in ps}
        owner_after = {p: name for name, ps in final.items() for p in ps}
        moves = sum(1 for p in range(self.partitions) if owner_before[p] != owner_after[p])
        violations = sum(
            self.members[name].missing_kept(before[name] & final[name], t0_ns)
            for name in final
            if name in before
        )
        heard_ref = t0_ns if heard_from_ns is None else heard_from_ns
        firsts = [self.members[n].first_answer_ns(heard_ref) for n in final if n in before]
        heard = [x for x in firsts if x is not None]
        complete = bool(heard) and len(heard) == len(firsts)
        result = Rebalance(
            scenario,
            (t_settled - t0_ns) / 1e6,
            (t_describe - t0_ns) / 1e6,
            moves,
            moves_min(before, set(final), self.partitions),
            violations,
            (max(heard) - heard_ref) / 1e6 if complete else None,
            (max(heard) - min(heard)) / 1e6 if complete else None,
        )
        return result, t_settled

    # ------------------------------------------------------------------ events
    async def form(self, count: int, session_timeout_ms: int, static: bool = False) -> None:
        """Start `count` members at once and wait until the group is stable (untimed)."""
        for _ in range(count):
            name = self.new_name()
            member = Member(self, name, session_timeout_ms, f"static-{name}" if static else None)
            self.members[name] = member
            member.start()
        await self.wait_stable(now_ns())

    async def join(self, scenario: str, session_timeout_ms: int) -> Rebalance:
        before = self.snapshot()
        name = self.new_name()
        member = Member(self, name, session_timeout_ms, None)
        t0 = now_ns()
        self.members[name] = member
        member.start()
        result, _ = await self.measure(scenario, t0, before)
        return result

    async def leave(self, scenario: str, rng: random.Random) -> Rebalance:
        before = self.snapshot()
        name = rng.choice(sorted(self.members))
        member = self.members[name]
        await member.stop()
        t0 = now_ns()
        self._forget(name)
        await self.stub.LeaveGroup(
            groups_pb2.LeaveGroupRequest(
                group_id=self.group_id, member_id=member.member_id, member_epoch=member.epoch
            ),
            timeout=RPC_TIMEOUT_S,
        )
        result, _ = await self.measure(scenario, t0, before)
        return result

    async def crash(self, scenario: str, rng: random.Random, session_timeout_ms: int) -> Rebalance:
        before = self.snapshot()
        name = rng.choice(sorted(self.members))
        member = self.members[name]
        await member.stop()
        t0 = now_ns()
        self._forget(name)
        # The broker's own record of the crashed member's last heartbeat (wall-clock ms,
        # same machine), moved onto this process's monotonic clock.
        d = await self.describe()
        wall_minus_mono_ns = time.time_ns() - now_ns()
        last = [m.last_heartbeat_ms for m in d.members if m.member_id == member.member_id]
        if not last:
            raise RuntimeError(
                f"group {self.group_id}: crashed member {member.member_id} already gone "
                f"{(now_ns() - t0) / 1e6:.1f} ms after its crash"
            )
        deadline_ns = (last[0] + session_timeout_ms) * 1_000_000 - wall_minus_mono_ns
        result, t_settled = await self.measure(scenario, t0, before, deadline_ns)
        return Rebalance(
            **{
                **asdict(result),
                "deadline_to_stable_ms": (t_settled - deadline_ns) / 1e6,
            }
        )

    async def restart_static(
        self, scenario: str, rng: random.Random, session_timeout_ms: int, gap_ms: int
    ) -> tuple[Rebalance, float]:
        """Stop a static member, start its next incarnation after gap_ms; (figures, time
        from the rejoin to its first answer in ms)."""
        before = self.snapshot()
        name = rng.choice(sorted(self.members))
        old = self.members[name]
        await old.stop()
        self._forget(name)
        unstable = await self.watch(gap_ms, len(before))
        new = Member(self, name, session_timeout_ms, old.instance_id)
        t0 = now_ns()
        self.members[name] = new
        new.start()
        polls = int(RPC_TIMEOUT_S / ANSWERS_POLL_S) + 1
        for _ in range(polls):
            self.check()
            if new.answers:
                break
            await asyncio.sleep(ANSWERS_POLL_S)
        else:
            raise RuntimeError(f"{name}: no answer to its rejoin in {RPC_TIMEOUT_S} s")
        first = new.answers[0]
        result, _ = await self.measure(scenario, t0, before)
        unstable += await self.watch(STATIC_WATCH_AFTER_MS, len(before))
        return (
            Rebalance(**{**asdict(result), "unstable_polls": unstable}),
            (first.t_ns - t0) / 1e6,
        )

    async def heartbeat_cost(self, broker_pid: int, count: int) -> tuple[float | None, float]:
        """`count` heartbeats back to back from one member of this stable group: (broker CPU
        microseconds per heartbeat, heartbeats per second)."""
        member = self.members[sorted(self.members)[0]]
        await member.stop()
        cpu0 = process_cpu_s(broker_pid)
        t0 = now_ns()
        for _ in range(count):
            if not await member.heartbeat():
                self.check()
        seconds = (now_ns() - t0) / 1e9
        cpu1 = process_cpu_s(broker_pid)
        member.start()
        cpu_us = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / count * 1e6
        return cpu_us, count / seconds

    async def watch(self, ms: int, members: int) -> int:
        """Poll DescribeGroup for `ms`; the answers not "stable" with `members` members."""
        unstable = 0
        end = now_ns() + ms * 1_000_000
        for _ in range(ms // self.describe_poll_ms + 1):
            if now_ns() >= end:
                break
            d = await self.describe()
            if d.state != "stable" or len(d.members) != members:
                unstable += 1
            await asyncio.sleep(self.describe_poll_ms / 1000)
        return unstable

    async def close(self) -> None:
        """Stop every member and leave, so the broker forgets the group."""
        for name in sorted(self.members):
            member = self.members[name]
            await member.stop()
            self._forget(name)
            if member.member_id:
                await self.stub.LeaveGroup(
                    groups_pb2.LeaveGroupRequest(
                        group_id=self.group_id,
                        member_id=member.member_id,
                        member_epoch=member.epoch,
                    ),
                    timeout=RPC_TIMEOUT_S,
                )


# ---------------------------------------------------------------------------- runs
@dataclass
class Outcome:
    results: dict[str, list[Rebalance]]
    first_answer_ms: list[float]  # static: rejoin to the new incarnation's first answer
    rtts_ms: list[float]
    double_owned: list[str]
    heartbeat_cpu_us: float | None  # broker CPU per heartbeat, back to back, stable group
    heartbeats_per_s: float


def show(r: Rebalance, rep: int, extra: str = "") -> None:
    heard = (
        ""
        if r.heard_ms is None or r.heard_spread_ms is None
        else f"  heard {r.heard_ms:7.1f} ms (spread {r.heard_spread_ms:6.1f})"
    )
    deadline = (
        ""
        if r.deadline_to_stable_ms is None
        else f"  deadline->stable {r.deadline_to_stable_ms:6.1f} ms"
    )
    print(
        f"  {r.scenario:12s} r{rep:02d} {r.answers_ms:7.1f} ms (describe {r.describe_ms:7.1f})"
        f"{heard}  moves {r.moves:2d} (min {r.moves_min:2d})  continuity "
        f"{r.continuity_violations}{deadline}{extra}",
        flush=True,
    )


async def pause(rng: random.Random, interval_ms: int) -> None:
    """Uniform over one stable heartbeat interval: the event lands at a random phase."""
    await asyncio.sleep(rng.uniform(0, interval_ms) / 1000)


async def run_scenarios(broker: Child, s: Settings, rng: random.Random) -> Outcome:
    """Every scenario, one after the other, on one broker."""
    results: dict[str, list[Rebalance]] = {
        k: [] for k in ("join", "leave", "join_s1000", "leave_s1000", "crash", "static")
    }
    first_answer_ms: list[float] = []
    rtts_ns: deque[int] = deque(maxlen=RTTS_KEPT_MAX)
    groups: list[Group] = []
    async with grpc.aio.insecure_channel(broker.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        await admin.CreateTopic(
            admin_pb2.CreateTopicRequest(name=TOPIC, partitions=s.partitions),
            timeout=RPC_TIMEOUT_S,
        )
        stub = groups_pb2_grpc.GroupsStub(channel)

        def group(group_id: str) -> Group:
            g = Group(stub, group_id, s.partitions, s.describe_poll_ms, rtts_ns)
            groups.append(g)
            return g

        slow, fast = s.session_timeout_ms, s.fast_session_timeout_ms
        slow_ms, fast_ms = stable_interval_ms(slow), stable_interval_ms(fast)

        print(
            f"1. join / leave, session_timeout_ms {slow:,} (stable heartbeat every "
            f"{slow_ms:,} ms), one group, alternating",
            flush=True,
        )
        g = group("bench-default")
        await g.form(MEMBERS_BASE, slow)
        for rep in range(s.repeats):
            await pause(rng, slow_ms)
            r = await g.join("join", slow)
            results["join"].append(r)
            show(r, rep)
            await pause(rng, slow_ms)
            r = await g.leave("leave", rng)
            results["leave"].append(r)
            show(r, rep)
        await g.close()

        print(
            f"2. join / leave / crash, session_timeout_ms {fast:,} (stable heartbeat every "
            f"{fast_ms} ms); an untimed join before each crash; crash 'heard' counts from "
            "the session deadline",
            flush=True,
        )
        g = group("bench-s1000")
        await g.form(MEMBERS_BASE, fast)
        for rep in range(s.repeats):
            await pause(rng, fast_ms)
            r = await g.join("join_s1000", fast)
            results["join_s1000"].append(r)
            show(r, rep)
            await pause(rng, fast_ms)
            r = await g.leave("leave_s1000", rng)
            results["leave_s1000"].append(r)
            show(r, rep)
            await pause(rng, fast_ms)
            await g.join("restore", fast)
            await pause(rng, fast_ms)
            r = await g.crash("crash", rng, fast)
            results["crash"].append(r)
            show(r, rep)
        await g.close()

        print(
            f"3. static member restart, session_timeout_ms {slow:,}, down {s.restart_gap_ms} ms",
            flush=True,
        )
        g = group("bench-static")
        await g.form(MEMBERS_BASE + 1, slow, static=True)
        for rep in range(s.repeats):
            await pause(rng, 2 * s.describe_poll_ms)
            r, first_ms = await g.restart_static("static", rng, slow, s.restart_gap_ms)
            results["static"].append(r)
            first_answer_ms.append(first_ms)
            show(r, rep, f"  first answer {first_ms:5.1f} ms  unstable polls {r.unstable_polls}")

        print(
            f"4. broker CPU per heartbeat: {s.cost_heartbeats:,} back to back from one member "
            f"of the stable group of {MEMBERS_BASE + 1}",
            flush=True,
        )
        cpu_us, per_s = await g.heartbeat_cost(broker.proc.pid, s.cost_heartbeats)
        await g.close()
    return Outcome(
        results,
        first_answer_ms,
        [x / 1e6 for x in rtts_ns],
        [msg for g in groups for msg in g.double_owned],
        cpu_us,
        per_s,
    )


# ---------------------------------------------------------------------------- report
def line(name: str, value: float, unit: str, extra: str = "") -> None:
    est = ESTIMATES.get(name)
    est_text = f"  (estimate {est[0]:,.4g})" if est else ""
    print(
        f"  {name:{FIGURE_NAME_WIDTH}s} {value:{FIGURE_VALUE_WIDTH},.1f} {unit:3s}{est_text}{extra}"
    )


def summarize(s: Settings, o: Outcome, load: list[float | None]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    print(f"results ({s.repeats} samples each; load average {load[0]} at start, {load[1]} at end):")
    for scenario, runs in o.results.items():
        answers = [r.answers_ms for r in runs]
        described = [r.describe_ms for r in runs]
        key = f"rebalance_{scenario}"
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            figures[f"{key}_{label}_ms"] = round(percentile(answers, q), 1)
        figures[f"{key}_max_ms"] = round(max(answers), 1)
        figures[f"{key}_describe_p50_ms"] = round(percentile(described, 0.5), 1)
        for label in ("p50", "p99", "max"):
            line(f"{key}_{label}_ms", figures[f"{key}_{label}_ms"], "ms")
        print(
            f"    describe p50 {percentile(described, 0.5):,.1f} / p99 "
            f"{percentile(described, 0.99):,.1f} ms; mean {statistics.fmean(answers):,.1f} ms"
        )
        heard = [r.heard_ms for r in runs if r.heard_ms is not None]
        if scenario == "crash":
            to_stable = [
                r.deadline_to_stable_ms for r in runs if r.deadline_to_stable_ms is not None
            ]
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                figures[f"crash_deadline_to_stable_{label}_ms"] = round(percentile(to_stable, q), 1)
            figures["crash_deadline_to_stable_max_ms"] = round(max(to_stable), 1)
            for label in ("p50", "p99", "max"):
                name = f"crash_deadline_to_stable_{label}_ms"
                line(name, figures[name], "ms")
            rest = [
                r.deadline_to_stable_ms - r.heard_ms
                for r in runs
                if r.deadline_to_stable_ms is not None and r.heard_ms is not None
            ]
        else:
            rest = [r.answers_ms - r.heard_ms for r in runs if r.heard_ms is not None]
        spread = [r.heard_spread_ms for r in runs if r.heard_spread_ms is not None]
        if heard and rest and spread:
            figures[f"{scenario}_heard_p50_ms"] = round(percentile(heard, 0.5), 1)
            figures[f"{scenario}_after_heard_p50_ms"] = round(percentile(rest, 0.5), 1)
            figures[f"{scenario}_heard_spread_p50_ms"] = round(percentile(spread, 0.5), 1)
            print(
                f"    until every member had heard: p50 {percentile(heard, 0.5):,.1f} ms, max "
                f"{max(heard):,.1f}; from then to stable: p50 {percentile(rest, 0.5):,.1f} ms, "
                f"max {max(rest):,.1f}; first to last member heard: p50 "
                f"{percentile(spread, 0.5):,.1f} ms, max {max(spread):,.1f}"
            )
        moves = sorted({r.moves for r in runs})
        minimum = sorted({r.moves_min for r in runs})
        figures[f"{scenario}_moves"] = {
            "observed": moves,
            "minimum": minimum,
            "above_minimum": sum(1 for r in runs if r.moves > r.moves_min),
        }
        continuity = sum(r.continuity_violations for r in runs)
        figures[f"{scenario}_continuity_violations"] = continuity
        print(f"    moves {moves} (minimum {minimum}); continuity violations {continuity}")
    static = o.results["static"]
    figures["static_restart_moves"] = sum(r.moves for r in static)
    figures["static_unstable_polls"] = sum(r.unstable_polls for r in static)
    figures["static_first_answer_p50_ms"] = round(percentile(o.first_answer_ms, 0.5), 2)
    line("static_restart_moves", figures["static_restart_moves"], "", f"  over {len(static)}")
    print(
        f"    DescribeGroup answers not stable during restarts: "
        f"{figures['static_unstable_polls']}; rejoin to first answer p50 "
        f"{figures['static_first_answer_p50_ms']} ms"
    )
    figures["double_owned"] = len(o.double_owned)
    print(f"    double-owned partitions (client view): {len(o.double_owned)} {o.double_owned[:3]}")
    figures["heartbeat_rtt_p50_ms"] = round(percentile(o.rtts_ms, 0.5), 3)
    figures["heartbeat_rtt_p99_ms"] = round(percentile(o.rtts_ms, 0.99), 3)
    figures["heartbeats"] = len(o.rtts_ms)
    line("heartbeat_rtt_p50_ms", figures["heartbeat_rtt_p50_ms"], "ms")
    print(f"    heartbeat RTT p99 {figures['heartbeat_rtt_p99_ms']} ms over {len(o.rtts_ms):,}")
    figures["heartbeat_broker_cpu_us"] = (
        None if o.heartbeat_cpu_us is None else round(o.heartbeat_cpu_us, 1)
    )
    figures["heartbeats_per_s_one_client"] = round(o.heartbeats_per_s)
    cpu = "?" if o.heartbeat_cpu_us is None else f"{o.heartbeat_cpu_us:,.0f}"
    print(
        f"  heartbeat_broker_cpu_us            {cpu:>10} us  back to back: "
        f"{o.heartbeats_per_s:,.0f} heartbeats/s from one client"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="16 partitions, 8 samples each")
    parser.add_argument("--seed", type=int, default=20240601, help="member choice and pauses")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    rng = random.Random(args.seed)

    print("# consumer-group rebalance benchmark" + (" (quick)" if s.quick else ""))
    print("settings:")
    print_fields(machine(grpc_versions()), LABEL_WIDTH)
    print_fields(asdict(s), LABEL_WIDTH)
    print(f"  {'seed':{LABEL_WIDTH}s} {args.seed}")
    print(
        f"  {'broker constants':{LABEL_WIDTH}s} stable heartbeat = "
        f"min({HEARTBEAT_INTERVAL_MS_MAX}, session/{HEARTBEAT_FRACTION}) ms; reconciling "
        f"{RECONCILE_HEARTBEAT_INTERVAL_MS} ms; expire() every <= 1 s"
    )
    load_start = print_load_average_at_start(LABEL_WIDTH)
    print_estimates(ESTIMATES, FIGURE_NAME_WIDTH, FIGURE_VALUE_WIDTH)
    sys.stdout.flush()

    root = tempfile.mkdtemp(prefix="groups-bench-")
    broker: Child | None = None
    try:
        broker = start_child("broker", broker_command(os.path.join(root, "data")), root)
        print(f"  broker pid {broker.proc.pid} on {broker.address}", flush=True)
        started = time.perf_counter()
        outcome = asyncio.run(run_scenarios(broker, s, rng))
        seconds = time.perf_counter() - started
        if broker.proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {broker.proc.returncode}")
    finally:
        if broker is not None:
            stop_child(broker)
        shutil.rmtree(root, ignore_errors=True)
    load_end = load_average()
    figures = summarize(s, outcome, [load_start, load_end])
    print(f"  ran {seconds:.0f} s")
    summary = {
        **figures,
        "quick": s.quick,
        "machine": {**machine(grpc_versions()), "load_average_1m": [load_start, load_end]},
        "settings": {**asdict(s), "seed": args.seed, "members_base": MEMBERS_BASE},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
