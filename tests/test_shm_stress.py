"""Torn-read stress and kill -9 tests for eplbd.shm, with real processes (no OS mocks).

A writer process rewrites a region as fast as it can while a reader process
reads it 200,000 times. Every payload is self-checking (every element is a
function of the id written with it), so an accepted torn read is detected.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import numpy as np
import posix_ipc
import pytest

from eplbd.geometry import Geometry
from eplbd.shm import Domain

READS = 200_000
# The reader goes on past READS until it has accepted MIN_ACCEPTED reads of at least
# MIN_DISTINCT versions (or DEADLINE_S passed): the share of reads that find their
# window already overwritten, and the versions the writer makes meanwhile, depend on
# how the two processes are scheduled (a starved writer: few versions; a fast one:
# 93% of the reads overwritten, seen once), and the race must still be exercised.
MIN_ACCEPTED = READS // 10
MIN_DISTINCT = 2_000
DEADLINE_S = 120.0
# 2 KiB of loads per window and ~4 KiB per plan: big enough that a copy can be
# caught half-way, small enough that 200k reads stay within seconds.
G = Geometry(num_layers=4, num_experts=64, num_ranks=8, slots_per_rank=8)

# Self-checking plan for id k (shared by writer and reader code below).
PLAN_CODE = r"""
import numpy as np
from eplbd.plan import OP_DTYPE, Plan

def make_plan(k, g):
    L, E, R, S, P = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank, g.num_slots
    n = (k * 7) % (2 * P + 1)          # the used part of the slot varies with k
    row = k % (L * R)
    indptr = np.zeros(L * R + 1, dtype=np.int64)
    indptr[row + 1:] = n
    ops = np.zeros(n, dtype=OP_DTYPE)
    for f, hi in (("round", 2 * P), ("kind", 3), ("peer", R), ("src_slot", S), ("dst_slot", S),
                  ("expert", E)):
        ops[f] = k % hi
    return Plan(k, k - 1, np.full((L, P), k % E, np.int32), np.full((L, P), k % P, np.int32),
                np.full((L, E), k % (R + 1), np.int32), indptr, ops)

def plan_ok(p, g):
    # Cheap exact check (the reader must do 200k of these): every element of
    # every array is the function of p.plan_id that make_plan wrote.
    k = p.plan_id
    L, E, R, S, P = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank, g.num_slots
    n = (k * 7) % (2 * P + 1)
    if p.base_epoch != k - 1 or p.ops.shape[0] != n:
        return False
    row = k % (L * R)
    ptr = p.op_indptr
    if ptr[row] != 0 or ptr[row + 1] != n or ptr[0] != 0 or ptr[-1] != n:
        return False
    want = np.array([k % (2 * P), k % 3, k % R, k % S, k % S, k % E], np.int32)
    return bool((p.phy2log == k % E).all() and (p.log2phy == k % P).all()
                and (p.replica_count == k % (R + 1)).all()
                and (p.ops.view(np.int32).reshape(n, 6) == want).all())
"""

WRITER = PLAN_CODE + r"""
import sys, time
from eplbd.shm import Domain
name, what, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
d = Domain.attach(name, writable=True)
g = d.geometry
L, E = g.num_layers, g.num_experts
start = max(d.latest_plan_id(), d.latest_window_id()) + 1
k = start
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(64):
        if what == "ring":
            d.write_window(k, np.full((L, E), k, np.int64), epoch=k, step_begin=k, step_end=k + 1)
        else:
            d.publish_plan(make_plan(k, g))
        k += 1
print(k - start, flush=True)
"""

READER = PLAN_CODE + r"""
import itertools, json, sys, time
from eplbd.shm import Domain, TornReadError
name, what, reads = sys.argv[1], sys.argv[2], int(sys.argv[3])
min_accepted, min_distinct, deadline = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
d = Domain.attach(name)
g = d.geometry
accepted = bad = none = torn = raw_torn = 0
seen = set()
view = d._ring_v[0]
t0 = time.monotonic()
for i in itertools.count():
    enough = accepted >= min_accepted and len(seen) >= min_distinct
    if i >= reads and (enough or time.monotonic() - t0 > deadline):
        break
    try:
        if what == "ring":
            w = d.read_window(d.latest_window_id())
            if w is None:
                none += 1
                continue
            k = w.window_id
            ok = (w.epoch == k and w.step_begin == k and w.step_end == k + 1
                  and bool((w.loads == k).all()))
        else:
            p = d.read_plan()
            if p is None:
                none += 1
                continue
            k = p.plan_id
            ok = plan_ok(p, g)
    except TornReadError:
        torn += 1
        continue
    accepted += 1
    bad += not ok
    seen.add(k)
    if what == "ring" and i % 16 == 0:
        # The same copy without the seqlock, to show the race is real.
        raw = view.copy()
        raw_torn += not bool((raw == raw.flat[0]).all())
print(json.dumps(dict(reads=i, accepted=accepted, bad=bad, none=none, torn=torn,
                      raw_torn=raw_torn, distinct=len(seen), seconds=time.monotonic() - t0)))
"""


def _py(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def domain_name() -> Iterator[str]:
    name = f"eplbd.test.{os.getpid()}.{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory("/" + name)
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore("/" + name + ".bell")


def _stress(name: str, what: str) -> dict[str, int]:
    owner = Domain.create(name, G, ring_capacity=1)  # one slot: every write overwrites what is read
    procs: list[subprocess.Popen[str]] = []
    try:
        writer = _py(WRITER, name, what, 600)  # killed when the reader is done
        procs.append(writer)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read() if writer.stderr else ""
        reader = _py(READER, name, what, READS, MIN_ACCEPTED, MIN_DISTINCT, DEADLINE_S)
        procs.append(reader)
        out, err = reader.communicate(timeout=DEADLINE_S + 150)
        assert reader.returncode == 0, err
        return json.loads(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        owner.close()


@pytest.mark.timeout(300)
def test_ring_torn_read_stress(domain_name: str) -> None:
    r = _stress(domain_name, "ring")
    print(r)
    assert r["bad"] == 0, f"accepted torn windows: {r}"
    assert r["accepted"] >= MIN_ACCEPTED, r
    assert r["distinct"] >= 1000, f"reads made no progress: {r}"


@pytest.mark.timeout(300)
def test_plan_torn_read_stress(domain_name: str) -> None:
    r = _stress(domain_name, "plan")
    print(r)
    assert r["bad"] == 0, f"accepted torn plans: {r}"
    assert r["accepted"] >= MIN_ACCEPTED, r
    assert r["distinct"] >= 1000, f"reads made no progress: {r}"


KILLED_PUBLISHER = r"""
import dataclasses, sys
import numpy as np
from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, log2phy_compact, replica_count
from eplbd.plan import OP_DTYPE, Plan
from eplbd.shm import Domain
d = Domain.attach(sys.argv[1], writable=True)
g = d.geometry
L, E, R, S, P = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank, g.num_slots
n = d.layout.ops_capacity            # worst-case plan: the write takes longest
indptr = np.linspace(0, n, L * R + 1).astype(np.int64)
variants = []                        # built up front, so the loop is mostly the slot write
for v in (0, 1):                     # self-checking: plan k is variant k % 2 throughout
    ops = np.zeros(n, dtype=OP_DTYPE)
    ops["expert"] = v
    p2l = np.roll(default_phy2log(g), v * S, axis=1)
    variants.append(Plan(0, 0, p2l, log2phy_compact(p2l), replica_count(p2l, g), indptr, ops))
k = d.latest_plan_id() + 1
print("ready", flush=True)
while True:
    d.publish_plan(dataclasses.replace(variants[k % 2], plan_id=k, base_epoch=k - 1))
    k += 1
"""


@pytest.mark.timeout(120)
def test_kill9_mid_publish_never_exposes_half_plan(domain_name: str) -> None:
    """SIGKILL the publisher at random instants; readers only ever see whole plans, and a
    restarted publisher's next plan is read back whole."""
    from eplbd.placement import default_phy2log

    g = Geometry(num_layers=16, num_experts=64, num_ranks=16, slots_per_rank=8)  # ~0.6 MB plan slot
    owner = Domain.create(domain_name, g)
    reader = Domain.attach(domain_name)
    rng = np.random.default_rng(0)
    mid_write = 0
    p: subprocess.Popen[str] | None = None
    try:
        for attempt in range(40):
            p = _py(KILLED_PUBLISHER, domain_name)
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
            time.sleep(float(rng.uniform(0.005, 0.05)))
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            assert p.returncode == -signal.SIGKILL
            # Did the kill land inside a slot write (odd sequence left behind)?
            mid_write += any(s.seq % 2 for s in reader._plan_slots)
            plan = reader.read_plan()
            if plan is None:
                assert reader.latest_plan_id() == -1
                continue
            k = plan.plan_id
            assert plan.base_epoch == k - 1
            assert (plan.ops["expert"] == k % 2).all(), f"half-written plan {k} accepted"
            want = np.roll(default_phy2log(g), (k % 2) * g.slots_per_rank, axis=1)
            assert np.array_equal(plan.phy2log, want), f"half-written plan {k} accepted"
            assert plan.op_indptr[-1] == plan.num_ops == owner.layout.ops_capacity
            assert reader.latest_plan_id() >= k
            if mid_write >= 3 and attempt >= 5:
                break
        print(f"{attempt + 1} kills, {mid_write} inside a slot write")
        assert mid_write >= 1, "no kill landed inside a write; the test proved nothing"
        # The next publisher works despite an odd sequence left behind.
        p = _py(KILLED_PUBLISHER, domain_name)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        before = reader.latest_plan_id()
        deadline = time.monotonic() + 20
        while reader.latest_plan_id() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        plan = reader.read_plan()
        assert plan is not None and plan.plan_id >= before + 2
        assert (plan.ops["expert"] == plan.plan_id % 2).all()
    finally:
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            p.wait()
        reader.close()
        owner.close()
