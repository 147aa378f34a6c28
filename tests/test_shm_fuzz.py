"""Fuzz: random bytes written over the header or any region never crash a reader (only
ShmError subclasses come out) and never make it accept a value that was not written."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, log2phy_compact, replica_count
from eplbd.plan import OP_DTYPE, Plan
from eplbd.shm import PLAN_STARTED, DaemonInfo, Domain, PlanStatus, ShmError
from eplbd.shm import layout as lay

G = Geometry(num_layers=2, num_experts=4, num_ranks=2, slots_per_rank=3)
RING = 3


def _plan(k: int) -> Plan:
    p2l = default_phy2log(G)
    p2l[1] = np.roll(p2l[1], G.slots_per_rank)
    ops = np.zeros(4, OP_DTYPE)
    ops["round"], ops["kind"], ops["peer"] = [0, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 0]
    ops["src_slot"], ops["dst_slot"], ops["expert"] = [0, 1, 2, 0], [1, 2, 0, 1], [0, 1, 2, 3]
    ptr = np.array([0, 0, 0, 2, 4], np.int64)
    return Plan(k, k - 1, p2l, log2phy_compact(p2l), replica_count(p2l, G), ptr, ops)


class World:
    """A populated domain, its pristine bytes and what every reader must return."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.owner = Domain.create(name, G, ring_capacity=RING)
        o = self.owner
        self.windows = {}
        for k in range(5):  # wraps: ids 2, 3, 4 remain
            loads = np.arange(G.num_layers * G.num_experts).reshape(G.num_layers, G.num_experts) * (k + 1)
            o.write_window(k, loads, epoch=k, step_begin=10 * k, step_end=10 * k + 10)
            self.windows[k] = o.read_window(k)
        p2l = default_phy2log(G)
        p2l[1] = np.roll(p2l[1], G.slots_per_rank)
        o.write_placement(6, p2l)
        o.publish_plan(_plan(5))
        o.publish_plan(_plan(6))  # both slots hold a plan; slot 1 is current
        o.write_plan_status(PlanStatus(6, PLAN_STARTED, 1, 0, 123))
        o.write_daemon_info(DaemonInfo(1, 2, 3, 4, 5, 6, 7, "fuzz", 0.5, 0.75, 1, 0, 2, 3.5))
        o.set_rank_pids([101, 102])
        self.expected: dict[str, Any] = {
            "latest_plan_id": 6,
            "read_plan": _plan(6),
            "latest_window_id": 4,
            "read_placement": (6, p2l),
            "read_plan_status": PlanStatus(6, PLAN_STARTED, 1, 0, 123),
            "read_daemon_info": DaemonInfo(1, 2, 3, 4, 5, 6, 7, "fuzz", 0.5, 0.75, 1, 0, 2, 3.5),
            "rank_pids": [101, 102],
        }
        assert o._mm is not None
        self.pristine = o._buf.copy()

    def restore(self) -> None:
        self.owner._buf[:] = self.pristine

    def patch(self, offset: int, data: bytes) -> None:
        end = min(offset + len(data), self.pristine.size)
        self.owner._buf[offset:end] = np.frombuffer(data[: end - offset], np.uint8)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Plan):
        return isinstance(b, Plan) and a.plan_id == b.plan_id and a.base_epoch == b.base_epoch and all(
            np.array_equal(getattr(a, f), getattr(b, f))
            for f in ("phy2log", "log2phy", "replica_count", "op_indptr", "ops"))
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], np.ndarray):
        return a[0] == b[0] and np.array_equal(a[1], b[1])
    if hasattr(a, "loads"):
        return a[:5] == b[:5] and np.array_equal(a.loads, b.loads)
    return bool(a == b)


def check_readers(w: World, d: Domain) -> int:
    """Run every reader; each must return the written value or raise ShmError.
    Returns how many raised (so a test can tell corruption was noticed)."""
    calls: dict[str, Callable[[], Any]] = {
        "latest_plan_id": d.latest_plan_id,
        "read_plan": d.read_plan,
        "latest_window_id": d.latest_window_id,
        "read_placement": d.read_placement,
        "read_plan_status": d.read_plan_status,
        "read_daemon_info": d.read_daemon_info,
        "rank_pids": d.rank_pids,
    }
    errors = 0
    for key, call in calls.items():
        try:
            got = call()
        except ShmError:
            errors += 1
            continue
        assert _same(w.expected[key], got), f"{key} accepted a wrong value: {got!r}"
    for k in range(6):
        try:
            got = d.read_window(k)
        except ShmError:
            errors += 1
            continue
        want = w.windows.get(k) if k >= 5 - RING else None
        assert (got is None) == (want is None) and (got is None or _same(want, got)), f"window {k}: {got!r}"
    try:
        ws = d.read_windows(RING)
    except ShmError:
        errors += 1
    else:
        # a window that fails its check is skipped only by raising, never silently
        assert [x.window_id for x in ws] == [2, 3, 4] and all(_same(w.windows[x.window_id], x) for x in ws)
    return errors


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    name = f"eplbd.fuzz.{os.getpid()}.{uuid.uuid4().hex[:10]}"
    w = World(name)
    yield w
    w.owner.close()
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory("/" + name)
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore("/" + name + ".bell")


def _attach_and_check(w: World) -> None:
    try:
        d = Domain.attach(w.name)
    except ShmError:
        return
    d.read_budget_s = 0.002  # a fuzzed odd sequence would otherwise be waited out for 0.5 s
    try:
        check_readers(w, d)
    finally:
        d.close()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_pristine_world_reads_back(world: World) -> None:
    world.restore()
    d = Domain.attach(world.name)
    try:
        assert check_readers(world, d) == 0
    finally:
        d.close()


@FUZZ
@given(offset=st.integers(0, lay.HEADER_SIZE + lay.WORDS_SIZE - 1), data=st.binary(min_size=1, max_size=16))
def test_fuzz_header_and_words(world: World, offset: int, data: bytes) -> None:
    world.restore()
    world.patch(offset, data)
    _attach_and_check(world)


@FUZZ
@given(where=st.floats(0, 1, exclude_max=True), data=st.binary(min_size=1, max_size=64))
def test_fuzz_regions(world: World, where: float, data: bytes) -> None:
    world.restore()
    start = lay.HEADER_SIZE
    offset = start + int(where * (world.pristine.size - start))
    world.patch(offset, data)
    _attach_and_check(world)


@FUZZ
@given(region=st.sampled_from(["placement", "plan1", "status", "info", "pids", "ring"]),
       rel=st.integers(0, 127), data=st.binary(min_size=1, max_size=8))
def test_fuzz_region_headers(world: World, region: str, rel: int, data: bytes) -> None:
    """Aim at the seq/CRC/fields of each region (and the start of its payload)."""
    lo = world.owner.layout
    base = {"placement": lo.placement_off, "plan1": lo.plan_slot1_off, "status": lo.plan_status_off,
            "info": lo.daemon_info_off, "pids": lo.rank_pids_off, "ring": lo.ring_slot_off(4 % RING)}[region]
    world.restore()
    world.patch(base + rel, data)
    _attach_and_check(world)


def test_fuzz_is_noticed(world: World) -> None:
    """The checks above can fail: flipping one payload byte makes the reader raise."""
    lo = world.owner.layout
    world.restore()
    world.patch(lo.plan_slot1_off + lay.REGION_HEADER_SIZE + 3, b"\x7f")
    d = Domain.attach(world.name)
    try:
        assert check_readers(world, d) == 1
    finally:
        d.close()
        world.restore()
