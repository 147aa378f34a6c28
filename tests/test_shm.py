"""eplbd.shm: round trips, layout errors, names, permissions, stale segments, doorbell.

Real segments in /dev/shm and real processes; every test uses a unique name and
unlinks what it created.
"""

from __future__ import annotations

import contextlib
import grp
import os
import stat
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator

import numpy as np
import posix_ipc
import pytest

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, log2phy_compact, replica_count
from eplbd.plan import COPY, OP_DTYPE, RECV, SEND, Plan, plan_hash
from eplbd.shm import (
    DEFAULT_PREFIX,
    PLAN_COMMITTED,
    PLAN_NONE,
    DaemonInfo,
    Domain,
    DomainExistsError,
    DomainNameError,
    DomainNotFoundError,
    LayoutError,
    PlanStatus,
    ShmError,
    TornReadError,
    list_domains,
    remove_prefix,
    validate_name,
)
from eplbd.shm import layout as lay
from eplbd.shm.names import MAX_NAME_LEN, doorbell_path, segment_path

G = Geometry(num_layers=3, num_experts=8, num_ranks=4, slots_per_rank=3, num_nodes=2, num_groups=2)


def _cleanup(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory("/" + name)
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_semaphore("/" + name + ".bell")


@pytest.fixture
def name() -> Iterator[str]:
    n = f"eplbd.test.{os.getpid()}.{uuid.uuid4().hex[:10]}"
    yield n
    _cleanup(n)


@pytest.fixture
def owner(name: str) -> Iterator[Domain]:
    d = Domain.create(name, G, ring_capacity=4)
    yield d
    d.close()


def _run(code: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def make_plan(plan_id: int, g: Geometry = G) -> Plan:
    """A real-looking plan: rotate layer 0's placement by one rank; ops are SEND/RECV/COPY."""
    old = default_phy2log(g)
    new = old.copy()
    new[0] = np.roll(old[0], g.slots_per_rank)
    ops = np.zeros(5, dtype=OP_DTYPE)
    ops["round"] = [0, 1, 1, 0, 2]
    ops["kind"] = [COPY, SEND, RECV, SEND, RECV]
    ops["peer"] = [0, 1, 1, 2, 3]
    ops["src_slot"] = [0, 1, 2, 0, 1]
    ops["dst_slot"] = [2, 0, 1, 2, 0]
    ops["expert"] = [1, 2, 3, 4, 5]
    indptr = np.zeros(g.num_layers * g.num_ranks + 1, dtype=np.int64)
    indptr[1:] = 5
    indptr[1:3] = [1, 3]
    return Plan(plan_id, plan_id - 1, new, log2phy_compact(new), replica_count(new, g), indptr, ops)


def _plans_equal(a: Plan, b: Plan) -> bool:
    return (a.plan_id == b.plan_id and a.base_epoch == b.base_epoch
            and all(np.array_equal(getattr(a, f), getattr(b, f))
                    and getattr(a, f).dtype == getattr(b, f).dtype
                    for f in ("phy2log", "log2phy", "replica_count", "op_indptr", "ops")))


# ---------------------------------------------------------------- round trips


def test_fresh_domain_reads_empty(owner: Domain, name: str) -> None:
    r = Domain.attach(name, geometry=G)
    try:
        assert (r.geometry, r.ring_capacity, r.writable) == (G, 4, False)
        assert r.owner_pid == os.getpid() and r.owner_alive()
        assert r.layout_version == lay.LAYOUT_VERSION
        assert abs(r.created_ns - time.time_ns()) < 60e9
        assert r.latest_plan_id() == -1 and r.read_plan() is None
        assert r.latest_window_id() == -1 and r.read_windows(10) == [] and r.read_window(0) is None
        epoch, p = r.read_placement()
        assert epoch == 0 and np.array_equal(p, default_phy2log(G)) and p.dtype == np.int32
        assert r.read_plan_status() == PlanStatus(-1, PLAN_NONE, 0, 0, 0)
        assert r.read_daemon_info() is None
        assert r.rank_pids() == []
    finally:
        r.close()


def test_round_trip_every_region(owner: Domain, name: str) -> None:
    r = Domain.attach(name, geometry=G)
    try:
        rng = np.random.default_rng(0)
        loads = rng.integers(0, 10**12, size=(G.num_layers, G.num_experts))
        owner.write_window(7, loads, epoch=3, step_begin=100, step_end=132)
        w = r.read_window(7)
        assert w is not None and w[:4] == (7, 100, 132, 3)
        assert abs(w.timestamp_ns - time.time_ns()) < 60e9
        assert np.array_equal(w.loads, loads) and w.loads.dtype == np.int64
        assert r.latest_window_id() == 7

        p2l = default_phy2log(G)
        p2l[1] = np.roll(p2l[1], G.slots_per_rank)
        owner.write_placement(5, p2l)
        epoch, got = r.read_placement()
        assert epoch == 5 and np.array_equal(got, p2l)

        plan = make_plan(9)
        owner.publish_plan(plan)
        assert r.latest_plan_id() == 9
        got_plan = r.read_plan()
        assert got_plan is not None and _plans_equal(got_plan, plan)
        assert plan_hash(got_plan) == plan_hash(plan)

        st = PlanStatus(9, PLAN_COMMITTED, G.num_layers, 0, time.time_ns())
        owner.write_plan_status(st)
        assert r.read_plan_status() == st

        info = DaemonInfo(os.getpid(), 1, 2, 3, 4, 5, 6, "kept plan 9: β 0.71→0.93", 0.71, 0.93,
                          10, 2, 3, 12.5)
        owner.write_daemon_info(info)
        assert r.read_daemon_info() == info

        owner.set_rank_pids([os.getpid(), 1, 12345])
        assert r.rank_pids() == [os.getpid(), 1, 12345]
    finally:
        r.close()


def test_daemon_info_decision_cut_at_96_bytes_on_a_char_boundary(owner: Domain) -> None:
    info = DaemonInfo(1, 0, 0, 0, 0, 0, -1, "é" * 60, 0.0, 0.0, 0, 0, 0, 0.0)  # 120 bytes utf-8
    owner.write_daemon_info(info)
    got = owner.read_daemon_info()
    assert got is not None and got.last_decision == "é" * 48


def test_plans_double_buffer_and_ids_increase(owner: Domain, name: str) -> None:
    r = Domain.attach(name)
    try:
        for k in (1, 2, 5):
            owner.publish_plan(make_plan(k))
            got = r.read_plan()
            assert got is not None and got.plan_id == k and plan_hash(got) == plan_hash(make_plan(k))
        # the slots alternate: 1 -> slot 0, 2 -> slot 1, 5 -> slot 0; the word names (id, slot)
        assert lay.decode_word(int(r._words[lay.WORD_CURRENT_PLAN])) == (5, 0)
        assert [int(s._fields[0]) for s in r._plan_slots] == [5, 2]
        with pytest.raises(ValueError, match="plan id 5 must be greater than the latest plan id 5"):
            owner.publish_plan(make_plan(5))
        assert r.read_plan().plan_id == 5  # type: ignore[union-attr]
    finally:
        r.close()


def test_empty_and_full_plans_round_trip(name: str) -> None:
    g = Geometry(num_layers=2, num_experts=4, num_ranks=2, slots_per_rank=3)
    d = Domain.create(name, g)
    try:
        p2l = default_phy2log(g)
        empty = Plan(1, 0, p2l, log2phy_compact(p2l), replica_count(p2l, g),
                     np.zeros(g.num_layers * g.num_ranks + 1, np.int64), np.zeros(0, OP_DTYPE))
        d.publish_plan(empty)
        assert _plans_equal(d.read_plan(), empty)  # type: ignore[arg-type]
        K = d.layout.ops_capacity
        assert g.num_layers * 2 * g.num_slots == K
        ops = np.zeros(K, OP_DTYPE)
        ops["expert"] = np.arange(K) % g.num_experts
        full = Plan(2, 1, p2l, log2phy_compact(p2l), replica_count(p2l, g),
                    np.linspace(0, K, g.num_layers * g.num_ranks + 1).astype(np.int64), ops)
        d.publish_plan(full)
        assert _plans_equal(d.read_plan(), full)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ops > capacity"):
            d.publish_plan(Plan(3, 2, p2l, full.log2phy, full.replica_count, full.op_indptr,
                                np.zeros(K + 1, OP_DTYPE)))
    finally:
        d.close()
        d.unlink()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("phy2log", np.zeros((3, 12), np.int64), "plan.phy2log: dtype int64 != int32"),
        ("log2phy", np.zeros((3, 11), np.int32), r"plan.log2phy: shape \(3, 11\) != \(3, 12\)"),
        ("replica_count", np.full((3, 8), 9, np.int32), r"replica_count values outside \[0, 5\)"),
        ("op_indptr", np.arange(13, dtype=np.int64), r"op_indptr\[-1\] = 12 != n_ops = 5"),
        ("ops", np.zeros(5, np.int64), "plan.ops must be a 1-D array of OP_DTYPE"),
    ],
)
def test_publish_rejects_malformed_plans(owner: Domain, field: str, value: np.ndarray, message: str) -> None:
    plan = make_plan(1)
    bad = Plan(**{**{f: getattr(plan, f) for f in ("plan_id", "base_epoch", "phy2log", "log2phy",
                                                  "replica_count", "op_indptr", "ops")}, field: value})
    with pytest.raises(ValueError, match=message):
        owner.publish_plan(bad)
    assert owner.read_plan() is None  # nothing was published


def test_publish_rejects_out_of_range_ops(owner: Domain) -> None:
    plan = make_plan(1)
    plan.ops["peer"][2] = G.num_ranks
    with pytest.raises(ValueError, match=r"ops.peer values outside \[0, 4\)"):
        owner.publish_plan(plan)
    plan = make_plan(1)
    plan.op_indptr[1:3] = [3, 1]
    with pytest.raises(ValueError, match="op_indptr is not monotonic"):
        owner.publish_plan(plan)


def test_ring_wraps_and_read_windows_is_oldest_first(owner: Domain) -> None:
    for k in range(10):
        owner.write_window(k, np.full((G.num_layers, G.num_experts), k), epoch=0, step_begin=k * 8,
                           step_end=k * 8 + 8)
    assert owner.read_window(5) is None  # overwritten by 9 (capacity 4)
    assert owner.read_window(11) is None
    assert owner.read_window(-1) is None
    ws = owner.read_windows(10)
    assert [w.window_id for w in ws] == [6, 7, 8, 9]
    assert all((w.loads == w.window_id).all() for w in ws)
    assert [w.window_id for w in owner.read_windows(2)] == [8, 9]
    # ids may skip; a skipped id is simply absent
    owner.write_window(12, np.zeros((G.num_layers, G.num_experts)), epoch=1, step_begin=0, step_end=1)
    assert [w.window_id for w in owner.read_windows(4)] == [9, 12]


@pytest.mark.parametrize(
    ("loads", "message"),
    [
        (np.zeros((3, 7)), r"loads: shape \(3, 7\) != \(layers, experts\) = \(3, 8\)"),
        (np.full((3, 8), np.nan), "loads: non-finite count nan at layer 0, expert 0"),
        (np.full((3, 8), np.inf), "loads: non-finite count inf at layer 0, expert 0"),
        (np.where(np.arange(24).reshape(3, 8) == 13, -1, 0), "loads: negative count -1 at layer 1, expert 5"),
        (np.full((3, 8), 0.5), "is not an int64 count"),
        (np.full((3, 8), "x"), "not an integer or float count type"),
    ],
)
def test_write_window_validates(owner: Domain, loads: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        owner.write_window(1, loads, epoch=0, step_begin=0, step_end=1)
    assert owner.latest_window_id() == -1 and owner.read_window(1) is None


def test_window_ids_strictly_increase(owner: Domain) -> None:
    z = np.zeros((G.num_layers, G.num_experts), np.int32)
    owner.write_window(3, z, epoch=0, step_begin=0, step_end=1)
    with pytest.raises(ValueError, match="window_id 3 must be greater than the latest window id 3"):
        owner.write_window(3, z, epoch=0, step_begin=0, step_end=1)
    with pytest.raises(ValueError, match="window_id must be in"):
        owner.write_window(-4, z, epoch=0, step_begin=0, step_end=1)


def test_write_placement_validates(owner: Domain) -> None:
    bad = default_phy2log(G)
    bad[2, :] = 0
    with pytest.raises(ValueError, match="layer 2 has no replica of expert 1"):
        owner.write_placement(1, bad)
    assert owner.read_placement()[0] == 0


def test_create_with_initial_placement_and_epoch(name: str) -> None:
    p2l = default_phy2log(G)
    p2l[0] = np.roll(p2l[0], G.slots_per_rank)
    with Domain.create(name, G, phy2log=p2l, epoch=42) as d:
        epoch, got = d.read_placement()
        assert epoch == 42 and np.array_equal(got, p2l)
        d.unlink()


# ---------------------------------------------------------------- layout errors


def test_attach_geometry_mismatch_names_the_field(owner: Domain, name: str) -> None:
    other = Geometry(num_layers=3, num_experts=8, num_ranks=4, slots_per_rank=4, num_nodes=2, num_groups=2)
    msg = "geometry mismatch: slots_per_rank is 3 in the segment, 4 expected"
    with pytest.raises(LayoutError, match=msg):
        Domain.attach(name, geometry=other)


def _patch(name: str, offset: int, data: bytes, fix_crc: bool = False) -> None:
    """Overwrite header bytes of a segment through a separate writable mapping."""
    d = Domain.attach(name, writable=True)
    try:
        mm = d._mm
        assert mm is not None
        mm[offset : offset + len(data)] = data
        if fix_crc:
            crc = zlib.crc32(mm[8 : lay.HEADER_CRC_OFF])
            mm[lay.HEADER_CRC_OFF : lay.HEADER_CRC_OFF + 4] = struct.pack("<I", crc)
    finally:
        d.close()


def test_attach_unknown_layout_version(owner: Domain, name: str) -> None:
    _patch(name, 8, struct.pack("<I", 99))
    with pytest.raises(LayoutError, match=r"unknown layout version 99 \(this build reads version 1\)"):
        Domain.attach(name)


def test_attach_wrong_magic(owner: Domain, name: str) -> None:
    owner._mm[0:8] = b"NOTEPLBD"  # type: ignore[index]
    with pytest.raises(LayoutError, match="wrong magic b'NOTEPLBD'.*not an eplbd segment"):
        Domain.attach(name)


def test_attach_corrupt_header(owner: Domain, name: str) -> None:
    off = lay.HEADER_PREFIX.size  # first geometry field
    owner._mm[off : off + 8] = struct.pack("<q", 1000)  # type: ignore[index]
    with pytest.raises(LayoutError, match="header CRC32 mismatch"):
        Domain.attach(name)


def test_attach_offset_field_disagreeing_with_layout(owner: Domain, name: str) -> None:
    idx = lay.HEADER_FIELDS.index("ring_off")
    off = lay.HEADER.size - 8 * (len(lay.HEADER_FIELDS) - idx)
    owner._mm[off : off + 8] = struct.pack("<q", owner.layout.ring_off + 64)  # type: ignore[index]
    crc = zlib.crc32(owner._mm[8 : lay.HEADER_CRC_OFF])  # type: ignore[index]
    owner._mm[lay.HEADER_CRC_OFF : lay.HEADER_CRC_OFF + 4] = struct.pack("<I", crc)  # type: ignore[index]
    ring_off = owner.layout.ring_off
    msg = f"header field ring_off = {ring_off + 64} but layout.py computes {ring_off}"
    with pytest.raises(LayoutError, match=msg):
        Domain.attach(name)


def test_attach_invalid_geometry_in_header(owner: Domain, name: str) -> None:
    off = lay.HEADER_PREFIX.size + 8 * lay.GEOMETRY_FIELDS.index("num_experts")
    _patch(name, off, struct.pack("<q", 0), fix_crc=True)
    with pytest.raises(LayoutError, match="invalid geometry: geometry.num_experts: must be >= 1"):
        Domain.attach(name)


def test_attach_truncated_segment(owner: Domain, name: str) -> None:
    shm = posix_ipc.SharedMemory("/" + name)
    try:
        os.ftruncate(shm.fd, owner.layout.total_size - 4096)
        with pytest.raises(LayoutError, match=f"truncated segment: {owner.layout.total_size - 4096} bytes, "
                                              f"header says {owner.layout.total_size}"):
            Domain.attach(name)
        os.ftruncate(shm.fd, 100)
        with pytest.raises(LayoutError, match="truncated or incomplete segment: 100 bytes"):
            Domain.attach(name)
    finally:
        shm.close_fd()


def test_attach_missing(name: str) -> None:
    with pytest.raises(DomainNotFoundError, match=f"no domain '{name}'"):
        Domain.attach(name)


def test_attach_incomplete_segment_and_create_replaces_it(name: str) -> None:
    """A creator that died after writing its pid but before the header: 'incomplete';
    create() sees the dead creator and replaces the segment."""
    layout = lay.compute_layout(G, 4)
    dead = _dead_pid()
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=layout.total_size)
    os.pwrite(shm.fd, lay.HEADER_PREFIX.pack(b"\0" * 8, 0, 0, dead, 0.0, time.time_ns()), 0)
    shm.close_fd()
    msg = f"incomplete segment: header not written yet .creator pid {dead}, dead"
    with pytest.raises(LayoutError, match=msg):
        Domain.attach(name)
    with Domain.create(name, G, ring_capacity=4) as d:
        assert d.owner_pid == os.getpid()
        assert Domain.attach(name).owner_pid == os.getpid()
        d.unlink()


def test_create_refuses_incomplete_segment_of_live_creator(name: str) -> None:
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=4096)
    os.pwrite(shm.fd, lay.HEADER_PREFIX.pack(b"\0" * 8, 0, 0, os.getpid(), 0.0, 0), 0)
    shm.close_fd()
    with pytest.raises(DomainExistsError, match=f"owned by live pid {os.getpid()} .still being created"):
        Domain.create(name, G)
    with pytest.raises(LayoutError, match="alive"):
        Domain.attach(name)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "domain name is empty"),
        ("/eplbd.x", "must start with a letter or digit, not '/'"),
        ("-x", "must start with a letter or digit, not '-'"),
        ("eplbd.a b", r"contains ' '; allowed are letters, digits"),
        ("eplbd/x", r"contains '/'"),
        ("x" * (MAX_NAME_LEN + 1), f"at most {MAX_NAME_LEN} so that 'sem.<name>.bell' fits NAME_MAX=255"),
        ("sem.x", "must not start with 'sem.'"),
        (7, "domain name must be a str, got int"),
    ],
)
def test_bad_names(bad: object, message: str) -> None:
    with pytest.raises(DomainNameError, match=message):
        validate_name(bad)  # type: ignore[arg-type]
    with pytest.raises(DomainNameError, match=message):
        Domain.create(bad, G)  # type: ignore[arg-type]
    with pytest.raises(DomainNameError, match=message):
        Domain.attach(bad)  # type: ignore[arg-type]


def test_longest_name_works() -> None:
    n = f"eplbd.{os.getpid()}." + "x" * MAX_NAME_LEN
    n = n[:MAX_NAME_LEN]
    try:
        with Domain.create(n, G, ring_capacity=1) as d:
            d.ring_doorbell()
            assert d.wait_doorbell(0)
            assert os.path.exists(doorbell_path(n))
    finally:
        _cleanup(n)


def test_list_domains(name: str) -> None:
    other = f"other.{uuid.uuid4().hex[:8]}"
    try:
        with Domain.create(name, G, ring_capacity=1), Domain.create(other, G, ring_capacity=1):
            assert name in list_domains()
            assert other not in list_domains()
            assert name in list_domains(DEFAULT_PREFIX)
            assert list_domains(other) == [other]
            assert not any(n.startswith("sem.") for n in list_domains(""))
            assert list_domains() == sorted(list_domains())
    finally:
        _cleanup(other)


def test_remove_prefix_unlinks_segments_and_doorbells_under_it_only(name: str) -> None:
    prefix = name + ".job."
    other = f"other.{uuid.uuid4().hex[:8]}"
    try:
        for n in (prefix + "a", prefix + "b", other):
            Domain.create(n, G, ring_capacity=1).close()
        removed = remove_prefix(prefix)
        assert removed == sorted(
            [prefix + "a", prefix + "b", "sem." + prefix + "a.bell", "sem." + prefix + "b.bell"]
        )
        assert list_domains(prefix) == [] and list_domains(other) == [other]
        assert os.path.exists(doorbell_path(other))
        assert remove_prefix(prefix) == []
        with pytest.raises(DomainNameError, match="empty prefix"):
            remove_prefix("")
    finally:
        _cleanup(other)
        remove_prefix(prefix)


# ---------------------------------------------------------------- access control

READ_ONLY_CHILD = r"""
import sys
import numpy as np
from eplbd.shm import Domain
d = Domain.attach(sys.argv[1])
out = []
for call in (lambda: d.write_window(1, np.zeros((3, 8)), epoch=0, step_begin=0, step_end=1),
             lambda: d.write_placement(1, d.read_placement()[1]),
             lambda: d.publish_plan(None),
             lambda: d.set_rank_pids([1])):
    try:
        call()
        out.append("wrote")
    except PermissionError as e:
        out.append("PermissionError: " + str(e))
try:
    d._mm[0:1] = b"X"
    out.append("raw write succeeded")
except TypeError as e:
    out.append("raw: " + str(e))
try:
    d._buf[100] = 1
    out.append("view write succeeded")
except ValueError as e:
    out.append("view: " + str(e))
print("\n".join(out))
"""


def test_read_only_non_owner_cannot_write(owner: Domain, name: str) -> None:
    res = _run(READ_ONLY_CHILD, name)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 6
    for line, what in zip(lines[:4], ("write_window", "write_placement", "publish_plan", "set_rank_pids"),
                          strict=True):
        assert line == f"PermissionError: domain {name!r} is attached read-only: {what} needs writable=True"
    assert lines[4] == "raw: mmap can't modify a readonly memory map."
    assert lines[5].startswith("view: assignment destination is read-only")
    assert owner.read_placement()[0] == 0 and owner.latest_window_id() == -1


def test_writable_non_owner_can_publish(owner: Domain, name: str) -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_shm import make_plan; "
            "from eplbd.shm import Domain; d = Domain.attach(sys.argv[1], writable=True); "
            "d.publish_plan(make_plan(4))")
    res = _run(code, name, os.path.dirname(__file__))
    assert res.returncode == 0, res.stderr
    assert owner.read_plan().plan_id == 4  # type: ignore[union-attr]


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_default_permissions_are_0600(name: str) -> None:
    old = os.umask(0o077)
    try:
        with Domain.create(name, G, ring_capacity=1):
            assert _mode(segment_path(name)) == 0o600
            assert _mode(doorbell_path(name)) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("group_kind", ["gid", "name"])
def test_group_permissions(name: str, group_kind: str) -> None:
    gid = os.getgid()
    group: int | str = gid if group_kind == "gid" else grp.getgrgid(gid).gr_name
    old = os.umask(0o077)  # the configured mode wins over the umask
    try:
        with Domain.create(name, G, ring_capacity=1, mode=0o600, group=group):
            st = os.stat(segment_path(name))
            assert st.st_gid == gid
            assert stat.S_IMODE(st.st_mode) == 0o640  # the group gets read
            assert _mode(doorbell_path(name)) == 0o660  # sem_open needs rw to wait
        _cleanup(name)
        with Domain.create(name, G, ring_capacity=1, mode=0o660, group=group):
            assert _mode(segment_path(name)) == 0o660
    finally:
        os.umask(old)


def test_bad_group_and_mode(name: str) -> None:
    with pytest.raises(ValueError, match="group: no such group 'no-such-group-eplbd'"):
        Domain.create(name, G, group="no-such-group-eplbd")
    with pytest.raises(ValueError, match="mode must be in"):
        Domain.create(name, G, mode=0o1777)
    assert not os.path.exists(segment_path(name))


# ---------------------------------------------------------------- stale segments

ABANDON = r"""
import os, sys
from eplbd.geometry import Geometry
from eplbd.shm import Domain
Domain.create(sys.argv[1], Geometry(3, 8, 4, 3, num_nodes=2, num_groups=2), ring_capacity=4)
print(os.getpid(), flush=True)
if sys.argv[2] == "wait":
    sys.stdin.read()
os._exit(0)  # no close, no unlink: the segment is left behind
"""


def test_create_replaces_segment_of_dead_owner(name: str) -> None:
    res = _run(ABANDON, name, "exit")
    assert res.returncode == 0, res.stderr
    dead = int(res.stdout)
    old = Domain.attach(name)
    assert old.owner_pid == dead and not old.owner_alive()
    with Domain.create(name, G, ring_capacity=4) as d:
        assert d.owner_pid == os.getpid() and d.owner_alive()
        again = Domain.attach(name)
        assert again.owner_pid == os.getpid()
        again.close()
    # the old mapping still sees the old (dead) segment, untouched
    assert old.owner_pid == dead
    old.close()


def test_create_refuses_live_owner(name: str) -> None:
    p = subprocess.Popen([sys.executable, "-c", ABANDON, name, "wait"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        pid = int(p.stdout.readline())
        with pytest.raises(DomainExistsError, match=f"domain '{name}' exists, owned by live pid {pid}"):
            Domain.create(name, G)
        with Domain.attach(name) as d:
            assert d.owner_pid == pid and d.owner_alive()
    finally:
        p.communicate("", timeout=30)
    with Domain.attach(name) as d:
        assert not d.owner_alive()


# ---------------------------------------------------------------- doorbell, lifecycle


def test_doorbell(owner: Domain, name: str) -> None:
    r = Domain.attach(name, writable=True)
    try:
        t0 = time.monotonic()
        assert r.wait_doorbell(0.05) is False
        assert time.monotonic() - t0 >= 0.04
        for _ in range(5):
            owner.ring_doorbell()
        assert r.wait_doorbell(1.0) is True
        assert r.wait_doorbell(0) is False  # rings coalesce
        res = _run(f"from eplbd.shm import Domain; Domain.attach({name!r}).ring_doorbell()")
        assert res.returncode == 0, res.stderr
        assert r.wait_doorbell(5.0) is True
    finally:
        r.close()


def test_unlink_removes_segment_and_doorbell(name: str) -> None:
    d = Domain.create(name, G, ring_capacity=1)
    assert os.path.exists(segment_path(name)) and os.path.exists(doorbell_path(name))
    d.unlink()
    assert not os.path.exists(segment_path(name)) and not os.path.exists(doorbell_path(name))
    assert d.read_placement()[0] == 0  # the mapping outlives the name
    d.close()
    d.close()
    assert d.closed
    for call in (d.read_plan, d.latest_plan_id, d.latest_window_id, d.read_placement, d.ring_doorbell,
                 lambda: d.write_window(1, np.zeros((3, 8)), epoch=0, step_begin=0, step_end=1)):
        with pytest.raises(ShmError, match="is closed"):
            call()


def test_interrupted_writer_leaves_region_unreadable_until_next_write(owner: Domain, name: str) -> None:
    """A writer killed mid-write leaves an odd sequence: readers reject the region
    (TornReadError after the budget) and the next write repairs it."""
    z = np.zeros((G.num_layers, G.num_experts), np.int64)
    owner.write_window(0, z, epoch=0, step_begin=0, step_end=1)
    slot = owner._ring[0]
    slot._seq[0] = slot.seq + 1  # what a SIGKILL between "seq odd" and "seq even" leaves
    slot.payload[:8] = 0xFF  # ... with half-written data
    r = Domain.attach(name)
    r.read_budget_s = 0.02
    try:
        with pytest.raises(TornReadError, match="ring slot 0: no consistent read .*sequence odd"):
            r.read_window(0)
        owner.write_window(4, z + 4, epoch=0, step_begin=0, step_end=1)  # slot 0 again
        w = r.read_window(4)
        assert w is not None and (w.loads == 4).all() and slot.seq % 2 == 0
    finally:
        r.close()


def test_corrupt_region_fails_fast_with_torn_read_error(owner: Domain, name: str) -> None:
    owner.write_window(1, np.ones((G.num_layers, G.num_experts)), epoch=0, step_begin=0, step_end=1)
    owner._ring_v[1][0, 0] = 2  # flip payload bytes behind the seqlock's back
    t0 = time.monotonic()
    with pytest.raises(TornReadError, match="ring slot 1: content fails its CRC32/bounds at stable sequence"):
        owner.read_window(1)
    assert time.monotonic() - t0 < owner.read_budget_s  # corruption is recognised, not waited out


def test_corrupt_current_plan_slot_is_torn_not_accepted(owner: Domain, name: str) -> None:
    owner.publish_plan(make_plan(1))
    owner.publish_plan(make_plan(2))  # slot 1 current, slot 0 holds plan 1
    cur = lay.decode_word(int(owner._words[lay.WORD_CURRENT_PLAN]))
    assert cur == (2, 1)
    slot = owner._slots[1]
    slot._dst[4][0]["expert"] = 3  # bytes change, sequence does not: corruption
    r = Domain.attach(name)
    try:
        with pytest.raises(TornReadError, match="plan slot 1: content fails its CRC32/bounds"):
            r.read_plan()
        assert r.latest_plan_id() == 2
        # the other slot (plan 1) is never served in its place; the next publish goes to slot 0
        owner.publish_plan(make_plan(3))
        got = r.read_plan()
        assert got is not None and _plans_equal(got, make_plan(3))
    finally:
        r.close()


def test_publish_after_writer_killed_mid_slot_write(owner: Domain, name: str) -> None:
    owner.publish_plan(make_plan(1))  # slot 0 current
    slot = owner._slots[1].region
    slot._seq[0] = slot.seq + 1  # a publisher died inside its write of slot 1
    slot.payload[:16] = 0xAB
    r = Domain.attach(name)
    try:
        assert r.read_plan().plan_id == 1  # type: ignore[union-attr]  # the current slot is intact
        owner.publish_plan(make_plan(2))  # a restarted publisher just writes on
        assert slot.seq % 2 == 0
        got = r.read_plan()
        assert got is not None and _plans_equal(got, make_plan(2))
    finally:
        r.close()
