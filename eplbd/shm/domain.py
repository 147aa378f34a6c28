"""A domain: one shared-memory segment (+ doorbell) per (job, model) on a node.

Writers, one per region: the node leader (creator/owner) writes the ring, the
placement in force, the plan status and the rank pids; the daemon (attached
with ``writable=True``) publishes plans and its own info. Every other
attachment is read-only: the mapping is PROT_READ, so even a raw write faults.
The binary layout is defined in :mod:`eplbd.shm.layout`.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import mmap
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import posix_ipc
import psutil

from eplbd.geometry import Geometry, GeometryError
from eplbd.placement import default_phy2log, validate_phy2log
from eplbd.plan import OP_DTYPE, Plan, plan_hash
from eplbd.shm import layout as lay
from eplbd.shm.doorbell import Doorbell, doorbell_mode
from eplbd.shm.errors import (
    DomainExistsError,
    DomainNotFoundError,
    LayoutError,
    ShmError,
    TornReadError,
)
from eplbd.shm.names import segment_name, validate_name
from eplbd.shm.seqlock import DEFAULT_READ_BUDGET_S, SeqRegion

__all__ = [
    "Domain",
    "Window",
    "PlanStatus",
    "DaemonInfo",
    "PLAN_NONE",
    "PLAN_STARTED",
    "PLAN_COMMITTED",
    "PLAN_ABORTED",
    "PLAN_REJECTED",
]

PLAN_NONE, PLAN_STARTED, PLAN_COMMITTED, PLAN_ABORTED, PLAN_REJECTED = 0, 1, 2, 3, 4
_PLAN_STATES = 5
SLOT_EMPTY, SLOT_VALID = 0, 1
INCOMPLETE_GRACE_S = 5.0  # a half-made segment with no owner pid yet is left alone this long
_I64 = (-(1 << 63), (1 << 63) - 1)


class Window(NamedTuple):
    """One window of the stats ring; ``loads`` is [L, E] int64 (a private copy)."""

    window_id: int
    step_begin: int
    step_end: int
    epoch: int
    timestamp_ns: int
    loads: np.ndarray


class PlanStatus(NamedTuple):
    """Execution state of the latest plan, written by the node leader."""

    plan_id: int
    state: int
    layers_committed: int
    error: int
    updated_ns: int


class DaemonInfo(NamedTuple):
    """What the daemon reports about itself (for eplbd-ctl status)."""

    pid: int
    started_ns: int
    heartbeat_ns: int
    windows_seen: int
    plans_published: int
    errors: int
    last_window: int
    last_decision: str
    beta_now: float
    beta_pred: float
    moves_remote: int
    moves_cross_node: int
    moves_local: int
    compute_ms: float


_OP_FIELDS = ("round", "kind", "peer", "src_slot", "dst_slot", "expert")
assert OP_DTYPE.names == _OP_FIELDS and OP_DTYPE.itemsize == 4 * len(_OP_FIELDS)
_INFO_INTS = ("pid", "started_ns", "heartbeat_ns", "windows_seen", "plans_published", "errors", "last_window")
_INFO_MOVES = ("moves_remote", "moves_cross_node", "moves_local")


# ---------------------------------------------------------------- process liveness


def _process_start(pid: int) -> float:
    """psutil create_time of ``pid`` (0.0 if unknown)."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


def _pid_alive(pid: int, start: float) -> bool:
    """True if ``pid`` runs and (when ``start`` is known) is the same process, not a reuse."""
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return not (start and abs(p.create_time() - start) > 0.5)
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):
        return True  # exists but hidden from us: assume alive, never steal a live segment


def _resolve_group(group: int | str | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, bool):
        raise ValueError(f"group must be a gid or group name, got {group!r}")
    if isinstance(group, int):
        if group < 0:
            raise ValueError(f"group: gid must be >= 0, got {group}")
        return group
    if isinstance(group, str):
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"group: no such group {group!r}") from None
    raise ValueError(f"group must be a gid or group name, got {type(group).__name__}")


def _as_int(v: object, what: str, lo: int = _I64[0], hi: int = _I64[1]) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise ValueError(f"{what} must be an int, got {type(v).__name__} {v!r}")
    i = int(v)
    if not lo <= i <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {i}")
    return i


def _exact(a: object, dtype: np.dtype | str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The array as C-contiguous, requiring exactly ``dtype`` and ``shape`` (no silent casts:
    a cast would change the bytes and so the plan hash)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{what}: dtype {a.dtype} != {np.dtype(dtype)}")
    if a.shape != shape:
        raise ValueError(f"{what}: shape {a.shape} != {shape}")
    return np.ascontiguousarray(a)


@functools.lru_cache(maxsize=16)
def _op_limits(K: int, R: int, S: int, E: int) -> np.ndarray:
    """Exclusive upper bounds of the OP_DTYPE columns, in field order."""
    return np.array([K, 3, R, S, S, E], dtype=np.uint32)


def _plan_bounds_problem(
    g: Geometry,
    K: int,
    phy2log: np.ndarray,
    log2phy: np.ndarray,
    rc: np.ndarray,
    indptr: np.ndarray,
    ops: np.ndarray,
) -> str | None:
    """First bound a plan's arrays break, or None. Vectorised (no per-element loops)."""
    E, P, R, S = g.num_experts, g.num_slots, g.num_ranks, g.slots_per_rank
    n = ops.shape[0]
    if n > K:
        return f"{n} ops > capacity {K}"
    # Viewed as unsigned, a negative value is huge: one max() checks both ends.
    # (np.maximum.reduce directly: these run on every plan read; skip the wrappers.)
    umax = np.maximum.reduce
    for arr, hi, what in ((phy2log, E, "phy2log"), (log2phy, P, "log2phy"), (rc, R + 1, "replica_count")):
        if arr.size and int(umax(arr.view(np.uint32), axis=None)) >= hi:
            return f"{what} values outside [0, {hi})"
    if int(indptr[0]) != 0:
        return f"op_indptr[0] = {int(indptr[0])} != 0"
    if int(indptr[-1]) != n:
        return f"op_indptr[-1] = {int(indptr[-1])} != n_ops = {n}"
    if indptr.size > 1 and int(np.minimum.reduce(np.diff(indptr))) < 0:
        return "op_indptr is not monotonic"
    if n:
        # OP_DTYPE is six packed <i4 columns: check all of them with one reduction.
        bad = umax(ops.view("<u4").reshape(n, len(_OP_FIELDS)), axis=0) >= _op_limits(K, R, S, E)
        if bad.any():
            i = int(np.argmax(bad))
            return f"ops.{_OP_FIELDS[i]} values outside [0, {int(_op_limits(K, R, S, E)[i])})"
    return None


# ---------------------------------------------------------------- header


def _read_prefix(fd: int) -> tuple[bytes, int, float, int]:
    """(magic, owner pid, owner start, created_ns) from the version-independent prefix."""
    head = os.pread(fd, lay.HEADER_PREFIX.size, 0)
    if len(head) < lay.HEADER_PREFIX.size:
        return b"", 0, 0.0, 0
    magic, _ver, _hsz, pid, start, created = lay.HEADER_PREFIX.unpack(head)
    return magic, pid, start, created


def _parse_header(name: str, head: bytes) -> dict[str, Any]:
    vals = lay.HEADER.unpack_from(head, 0)
    h = dict(zip(lay.HEADER_FIELDS, vals, strict=True))
    magic = h["magic"]
    if magic == b"\0" * 8:
        pid, start = int(h["owner_pid"]), float(h["owner_start"])
        state = "alive" if _pid_alive(pid, start) else "dead"
        raise LayoutError(
            f"domain {name!r}: incomplete segment: header not written yet "
            f"(creator pid {pid or 'unknown'}, {state})"
        )
    if magic != lay.MAGIC:
        raise LayoutError(
            f"domain {name!r}: wrong magic {magic!r} (expected {lay.MAGIC!r}): not an eplbd segment"
        )
    if h["layout_version"] != lay.LAYOUT_VERSION:
        raise LayoutError(
            f"domain {name!r}: unknown layout version {h['layout_version']} "
            f"(this build reads version {lay.LAYOUT_VERSION})"
        )
    if h["header_size"] != lay.HEADER_SIZE:
        raise LayoutError(f"domain {name!r}: header_size {h['header_size']} != {lay.HEADER_SIZE}")
    (stored,) = lay.HEADER_CRC.unpack_from(head, lay.HEADER_CRC_OFF)
    if zlib.crc32(head[8 : lay.HEADER_CRC_OFF]) != stored:
        raise LayoutError(f"domain {name!r}: header CRC32 mismatch: corrupt header")
    return h


def _geometry_from_header(name: str, h: dict[str, Any]) -> Geometry:
    try:
        return Geometry(**{f: h[f] for f in lay.GEOMETRY_FIELDS})
    except GeometryError as e:
        raise LayoutError(f"domain {name!r}: header holds an invalid geometry: {e}") from None


# ---------------------------------------------------------------- domain


class _PlanSlot:
    """One plan slot: its region and how its payload is carved up.

    The payload is phy2log | log2phy | replica_count | op_indptr | ops, each
    part starting on a 64-byte boundary (zero padding between). The CRC covers
    the contiguous span from phy2log to the last used op, padding included, so
    a reader makes one copy and one CRC pass and slices the arrays out of it.
    """

    __slots__ = ("region", "_dst", "_pads", "_span", "_spec", "_ops_off", "_cap")

    def __init__(self, region: SeqRegion, lo: lay.Layout) -> None:
        g = lo.geometry
        L, E, R, P = g.num_layers, g.num_experts, g.num_ranks, g.num_slots
        pl = region.payload
        self.region = region
        # (start, end, dtype, shape) of the four fixed parts inside the payload
        self._spec = [
            (o, o + int(np.prod(shp)) * np.dtype(dt).itemsize, np.dtype(dt), shp)
            for o, shp, dt in (
                (lo.slot_phy2log, (L, P), "<i4"),
                (lo.slot_log2phy, (L, P), "<i4"),
                (lo.slot_replica_count, (L, E), "<i4"),
                (lo.slot_op_indptr, (L * R + 1,), "<i8"),
            )
        ]
        self._ops_off, self._cap = lo.slot_ops, lo.ops_capacity
        self._dst = [pl[a:b].view(dt).reshape(shp) for a, b, dt, shp in self._spec]
        self._dst.append(pl[lo.slot_ops : lo.slot_ops + lo.ops_capacity * OP_DTYPE.itemsize].view(OP_DTYPE))
        # (padding view, zeros) after each of the four fixed parts
        starts = [sp[0] for sp in self._spec[1:]] + [lo.slot_ops]
        self._pads = [
            (pl[sp[1] : nxt], np.zeros(nxt - sp[1], np.uint8))
            for sp, nxt in zip(self._spec, starts, strict=True)
        ]
        self._span = pl

    def write_parts(self, arrays: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(4):
            parts.append((self._dst[i], arrays[i]))
            parts.append(self._pads[i])  # rewritten too: a stray byte there must not stick
        n = arrays[4].shape[0]
        parts.append((self._dst[4][:n], arrays[4]))
        return parts

    def read_parts(self, f: np.ndarray) -> list[np.ndarray] | None:
        if f[3] == SLOT_EMPTY:
            return []  # never published: the CRC covers the fields only
        n = int(f[4])
        if not 0 <= n <= self._cap:
            return None  # torn or corrupt n_ops: retry
        return [self._span[: self._ops_off + n * OP_DTYPE.itemsize]]

    def split(self, span: np.ndarray, n: int) -> list[np.ndarray]:
        """Arrays (views of the private copy ``span``) in Plan order."""
        out = [span[a:b].view(dt).reshape(shp) for a, b, dt, shp in self._spec]
        out.append(span[self._ops_off : self._ops_off + n * OP_DTYPE.itemsize].view(OP_DTYPE))
        return out


class Domain:
    """A mapped domain segment. See the module docstring for who writes what.

    ``read_budget_s``: how long a reader retries a region that is being written
    before raising TornReadError (instance attribute; tests lower it).
    """

    name: str
    geometry: Geometry
    ring_capacity: int
    writable: bool
    owner_pid: int
    owner_start: float
    created_ns: int
    layout_version: int
    layout: lay.Layout
    read_budget_s: float

    def __init__(
        self,
        name: str,
        mm: mmap.mmap,
        layout: lay.Layout,
        writable: bool,
        owner_pid: int,
        owner_start: float,
        created_ns: int,
    ) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self.name = name
        self.geometry = layout.geometry
        self.ring_capacity = layout.ring_capacity
        self.writable = writable
        self.owner_pid = owner_pid
        self.owner_start = owner_start
        self.created_ns = created_ns
        self.layout_version = lay.LAYOUT_VERSION
        self.layout = layout
        self.read_budget_s = DEFAULT_READ_BUDGET_S
        self._mm: mmap.mmap | None = mm
        self._bell: Doorbell | None = None
        self._map_views(mm, layout)

    def _map_views(self, mm: mmap.mmap, lo: lay.Layout) -> None:
        g = lo.geometry
        L, E, R, P = g.num_layers, g.num_experts, g.num_ranks, g.num_slots
        buf = np.frombuffer(mm, dtype=np.uint8)
        self._buf = buf
        self._words = buf[lo.words_off : lo.words_off + 16].view("<u8")
        self._placement = SeqRegion(buf, lo.placement_off, L * P * 4, f"domain {self.name!r} placement")
        self._placement_v = self._placement.payload.view("<i4").reshape(L, P)
        self._plan_slots: list[SeqRegion] = []
        self._slots: list[_PlanSlot] = []
        for i, off in enumerate((lo.plan_slot0_off, lo.plan_slot1_off)):
            r = SeqRegion(
                buf, off, lo.plan_slot_size - lay.REGION_HEADER_SIZE, f"domain {self.name!r} plan slot {i}"
            )
            self._plan_slots.append(r)
            self._slots.append(_PlanSlot(r, lo))
        self._plan_status = SeqRegion(buf, lo.plan_status_off, 0, f"domain {self.name!r} plan status")
        self._daemon_info = SeqRegion(
            buf, lo.daemon_info_off, lay.DAEMON_INFO_SIZE, f"domain {self.name!r} daemon info"
        )
        self._daemon_info_v = self._daemon_info.payload[: lay.DAEMON_INFO.size]
        self._rank_pids = SeqRegion(buf, lo.rank_pids_off, R * 8, f"domain {self.name!r} rank pids")
        self._rank_pids_v = self._rank_pids.payload.view("<i8")
        self._ring: list[SeqRegion] = []
        self._ring_v: list[np.ndarray] = []
        for i in range(lo.ring_capacity):
            r = SeqRegion(buf, lo.ring_slot_off(i), L * E * 8, f"domain {self.name!r} ring slot {i}")
            self._ring.append(r)
            self._ring_v.append(r.payload.view("<i8").reshape(L, E))

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"Domain({self.name!r}, {self.geometry}, ring_capacity={self.ring_capacity}, {mode})"

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ create / attach

    @classmethod
    def create(
        cls,
        name: str,
        geometry: Geometry,
        *,
        ring_capacity: int = 64,
        mode: int = 0o600,
        group: int | str | None = None,
        phy2log: np.ndarray | None = None,
        epoch: int = 0,
    ) -> Domain:
        """Create the segment (O_CREAT|O_EXCL) and its doorbell; the caller becomes the owner.

        A segment whose owner is dead (or a half-made one whose creator is dead)
        is replaced; one with a live owner raises DomainExistsError naming the pid.
        ``mode`` is applied exactly (umask does not trim it); ``group`` (gid or
        name) becomes the segment's group and gets read access. The initial
        placement is ``phy2log`` (validated) or ``default_phy2log(geometry)``.
        The header is written last, its magic after everything else.
        """
        validate_name(name)
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
        layout = lay.compute_layout(geometry, ring_capacity)
        p2l = validate_phy2log(default_phy2log(geometry) if phy2log is None else phy2log, geometry)
        epoch = _as_int(epoch, "epoch")
        mode = _as_int(mode, "mode", 0, 0o777)
        gid = _resolve_group(group)
        if gid is not None:
            mode |= 0o040
        shm = _create_segment(name, layout.total_size, mode)
        created = False
        try:
            os.fchmod(shm.fd, mode)
            if gid is not None:
                os.fchown(shm.fd, -1, gid)
            pid, start, now = os.getpid(), _process_start(os.getpid()), time.time_ns()
            # Owner first, so a creator killed from here on leaves a segment that
            # says whose it was (and that it is incomplete: magic still zero).
            os.pwrite(shm.fd, lay.HEADER_PREFIX.pack(b"\0" * 8, 0, 0, pid, start, now), 0)
            mm = mmap.mmap(
                shm.fd, layout.total_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
            shm.close_fd()
            dom = cls(name, mm, layout, True, pid, start, now)
            dom._init_regions(p2l, epoch)
            dom._bell = Doorbell.create(name, doorbell_mode(mode), gid)
            dom._write_header()
            created = True
            return dom
        finally:
            if not created:
                with contextlib.suppress(posix_ipc.Error, OSError):
                    shm.close_fd()
                with contextlib.suppress(posix_ipc.ExistentialError):
                    posix_ipc.unlink_shared_memory(segment_name(name))
                Doorbell.unlink(name)

    def _init_regions(self, p2l: np.ndarray, epoch: int) -> None:
        # Every region starts valid (right CRC), so all-zero memory never is.
        self._words[lay.WORD_CURRENT_PLAN] = lay.encode_word(-1)
        self._words[lay.WORD_LATEST_WINDOW] = lay.encode_word(-1)
        self._placement.write([epoch], [(self._placement_v, p2l)])
        for r in self._plan_slots:
            r.write([-1, 0, 0, SLOT_EMPTY, 0])
        self._plan_status.write([-1, PLAN_NONE, 0, 0, 0])
        self._daemon_info.write([0])
        self._rank_pids.write([0])
        for r in self._ring:
            r.write([-1, 0, 0, 0, 0])

    def _write_header(self) -> None:
        h = {
            "magic": lay.MAGIC,
            "layout_version": lay.LAYOUT_VERSION,
            "header_size": lay.HEADER_SIZE,
            "owner_pid": self.owner_pid,
            "owner_start": self.owner_start,
            "created_ns": self.created_ns,
            "ring_capacity": self.ring_capacity,
        }
        h.update(self.geometry.to_dict())
        h.update(self.layout.offsets())
        raw = bytearray(lay.HEADER_SIZE)
        lay.HEADER.pack_into(raw, 0, *(h[f] for f in lay.HEADER_FIELDS))
        lay.HEADER_CRC.pack_into(raw, lay.HEADER_CRC_OFF, zlib.crc32(raw[8 : lay.HEADER_CRC_OFF]))
        assert self._mm is not None
        self._mm[8 : lay.HEADER_SIZE] = bytes(raw[8:])
        self._mm[0:8] = bytes(raw[0:8])  # last: from here on the segment is valid

    @classmethod
    def attach(cls, name: str, *, geometry: Geometry | None = None, writable: bool = False) -> Domain:
        """Map an existing domain; read-only (PROT_READ) unless ``writable``.

        Raises DomainNotFoundError, PermissionError (no access), or LayoutError
        (incomplete, wrong magic, unknown layout version, header CRC, truncated,
        an offset that disagrees with layout.py, or ``geometry`` given and
        different: the message names the field).
        """
        validate_name(name)
        try:
            shm = posix_ipc.SharedMemory(segment_name(name), read_only=not writable)
        except posix_ipc.ExistentialError:
            raise DomainNotFoundError(f"no domain {name!r} (no segment /dev/shm/{name})") from None
        except posix_ipc.PermissionsError as e:
            access = "read-write" if writable else "read-only"
            raise PermissionError(f"domain {name!r}: cannot open {access}: {e}") from None
        try:
            size = os.fstat(shm.fd).st_size
            if size < lay.HEADER_SIZE:
                _magic, pid, start, _c = _read_prefix(shm.fd)
                raise LayoutError(
                    f"domain {name!r}: truncated or incomplete segment: {size} bytes, less than the "
                    f"{lay.HEADER_SIZE}-byte header (creator pid {pid or 'unknown'}, "
                    f"{'alive' if _pid_alive(pid, start) else 'dead'})"
                )
            head = os.pread(shm.fd, lay.HEADER_SIZE, 0)
            h = _parse_header(name, head)
            g = _geometry_from_header(name, h)
            try:
                lo = lay.compute_layout(g, int(h["ring_capacity"]))
            except ValueError as e:
                raise LayoutError(f"domain {name!r}: header field ring_capacity: {e}") from None
            for field, want in lo.offsets().items():
                if h[field] != want:
                    raise LayoutError(
                        f"domain {name!r}: header field {field} = {h[field]} but layout.py computes {want} "
                        f"for this geometry"
                    )
            if size != lo.total_size:
                what = "truncated" if size < lo.total_size else "oversized"
                raise LayoutError(
                    f"domain {name!r}: {what} segment: {size} bytes, header says {lo.total_size}"
                )
            if geometry is not None and geometry != g:
                for f in lay.GEOMETRY_FIELDS:
                    if getattr(geometry, f) != getattr(g, f):
                        raise LayoutError(
                            f"domain {name!r}: geometry mismatch: {f} is {getattr(g, f)} in the segment, "
                            f"{getattr(geometry, f)} expected"
                        )
            if writable:
                mm = mmap.mmap(
                    shm.fd, lo.total_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            else:
                mm = mmap.mmap(shm.fd, lo.total_size, access=mmap.ACCESS_READ)  # PROT_READ
        finally:
            shm.close_fd()
        return cls(
            name,
            mm,
            lo,
            writable,
            int(h["owner_pid"]),
            float(h["owner_start"]),
            int(h["created_ns"]),
        )

    def close(self) -> None:
        """Unmap (idempotent). Arrays returned earlier are copies and stay valid."""
        mm, self._mm = self._mm, None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        if mm is None:
            return
        # Drop every view first: an mmap with exported buffers cannot be closed.
        for attr in [a for a in vars(self) if a.startswith("_") and a not in ("_mm", "_bell")]:
            delattr(self, attr)
        # The lock-free pollers skip _check_open for speed: give them words that
        # fail their check, so they take the slow path, which reports "closed".
        self._words = np.zeros(2, dtype="<u8")
        with contextlib.suppress(BufferError):
            mm.close()

    @property
    def closed(self) -> bool:
        return self._mm is None

    def unlink(self) -> None:
        """Remove the segment and the doorbell names (mappings stay valid until closed)."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(segment_name(self.name))
        Doorbell.unlink(self.name)

    def owner_alive(self) -> bool:
        return _pid_alive(self.owner_pid, self.owner_start)

    # ------------------------------------------------------------ helpers

    def _check_writable(self, what: str) -> None:
        if self._mm is None:
            raise ShmError(f"domain {self.name!r} is closed")
        if not self.writable:
            raise PermissionError(f"domain {self.name!r} is attached read-only: {what} needs writable=True")

    def _check_open(self) -> None:
        if self._mm is None:
            raise ShmError(f"domain {self.name!r} is closed")

    # ------------------------------------------------------------ rank pids

    def set_rank_pids(self, pids: Sequence[int]) -> None:
        """Store the pids of the node's ranks (at most R, each > 0)."""
        self._check_writable("set_rank_pids")
        a = np.asarray(list(pids), dtype=np.int64)
        if a.ndim != 1 or a.size > self.geometry.num_ranks:
            raise ValueError(f"rank pids: {a.size} pids, at most num_ranks = {self.geometry.num_ranks}")
        if a.size and int(a.min()) <= 0:
            raise ValueError(f"rank pids must be > 0, got {a.tolist()}")
        a = np.ascontiguousarray(a, dtype="<i8")
        self._rank_pids.write([a.size], [(self._rank_pids_v[: a.size], a)])

    def rank_pids(self) -> list[int]:
        self._check_open()
        R, v = self.geometry.num_ranks, self._rank_pids_v
        _, (a,) = self._rank_pids.read(
            lambda f: [v[: int(f[0])]] if 0 <= f[0] <= R else None, self.read_budget_s
        )
        return [int(x) for x in a]

    # ------------------------------------------------------------ ring

    def _validate_loads(self, loads: object) -> np.ndarray:
        g = self.geometry
        a = np.asarray(loads)
        shape = (g.num_layers, g.num_experts)
        if a.shape != shape:
            raise ValueError(f"loads: shape {a.shape} != (layers, experts) = {shape}")
        kind = a.dtype.kind
        if kind not in "iuf":
            raise ValueError(f"loads: dtype {a.dtype} is not an integer or float count type")
        if kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                l, e = np.argwhere(bad)[0]
                raise ValueError(f"loads: non-finite count {a[l, e]} at layer {l}, expert {e}")
        if kind != "u" and (a < 0).any():
            l, e = np.argwhere(a < 0)[0]
            raise ValueError(f"loads: negative count {a[l, e]} at layer {l}, expert {e}")
        if kind == "f":
            bad = (a != np.floor(a)) | (a >= 2.0**63)
            if bad.any():
                l, e = np.argwhere(bad)[0]
                raise ValueError(f"loads: count {a[l, e]} at layer {l}, expert {e} is not an int64 count")
        elif kind == "u" and a.dtype.itemsize == 8 and a.size and int(a.max()) > _I64[1]:
            raise ValueError("loads: count above int64 range")
        return np.ascontiguousarray(a, dtype="<i8")

    def _word(self, index: int, what: str) -> tuple[int, int]:
        self._check_open()
        w = lay.decode_word(int(self._words[index]))
        if w is None:
            raise TornReadError(f"domain {self.name!r}: {what} word fails its check: corrupt")
        return w

    def write_window(
        self, window_id: int, loads: np.ndarray, *, epoch: int, step_begin: int, step_end: int
    ) -> None:
        """Store window ``window_id`` (ids strictly increase) in ring slot ``window_id % capacity``.

        ``loads`` [L, E]: finite counts >= 0 (integer dtype, or float holding integers);
        stored as int64.
        """
        self._check_writable("write_window")
        wid = _as_int(window_id, "window_id", 0, lay.ID_LIMIT - 1)
        arr = self._validate_loads(loads)
        fields = [
            wid,
            _as_int(step_begin, "step_begin"),
            _as_int(step_end, "step_end"),
            _as_int(epoch, "epoch"),
            time.time_ns(),
        ]
        latest = self._word(lay.WORD_LATEST_WINDOW, "latest window")[0]
        if wid <= latest:
            raise ValueError(f"window_id {wid} must be greater than the latest window id {latest}")
        slot = wid % self.ring_capacity
        self._ring[slot].write(fields, [(self._ring_v[slot], arr)])
        self._words[lay.WORD_LATEST_WINDOW] = lay.encode_word(wid)

    def latest_window_id(self) -> int:
        """Newest window id, -1 if none. One aligned word, no lock; TornReadError if its
        check fails (corrupt)."""
        w = lay.decode_word(int(self._words[lay.WORD_LATEST_WINDOW]))
        return w[0] if w is not None else self._word(lay.WORD_LATEST_WINDOW, "latest window")[0]

    def read_window(self, window_id: int) -> Window | None:
        """Window ``window_id``, or None if it was never written or has been overwritten."""
        self._check_open()
        if isinstance(window_id, bool) or not isinstance(window_id, int | np.integer) or window_id < 0:
            return None
        slot = int(window_id) % self.ring_capacity
        view = [self._ring_v[slot]]
        # An empty slot (id -1) holds no loads: its CRC covers the fields only.
        f, parts = self._ring[slot].read(lambda f: view if f[0] != -1 else [], self.read_budget_s)
        if int(f[0]) != window_id:
            return None
        (loads,) = parts
        if loads.size and int(loads.min()) < 0:
            raise LayoutError(f"domain {self.name!r} ring slot {slot}: negative count in window {window_id}")
        return Window(int(f[0]), int(f[1]), int(f[2]), int(f[3]), int(f[4]), loads)

    def read_windows(self, count: int) -> list[Window]:
        """The newest ``count`` windows still in the ring, oldest first.

        Looks at ids latest, latest-1, ... down to latest-capacity+1 (ids are
        consecutive in practice; a skipped id is simply absent).
        """
        self._check_open()
        latest = self._word(lay.WORD_LATEST_WINDOW, "latest window")[0]
        out: list[Window] = []
        wid = latest
        while wid >= 0 and wid > latest - self.ring_capacity and len(out) < count:
            w = self.read_window(wid)
            if w is not None:
                out.append(w)
            wid -= 1
        out.reverse()
        return out

    # ------------------------------------------------------------ placement in force

    def write_placement(self, epoch: int, phy2log: np.ndarray) -> None:
        """Record the placement in force (validated with placement.validate_phy2log)."""
        self._check_writable("write_placement")
        ep = _as_int(epoch, "epoch")
        p = validate_phy2log(phy2log, self.geometry)
        self._placement.write([ep], [(self._placement_v, p)])

    def read_placement(self) -> tuple[int, np.ndarray]:
        """(epoch, phy2log [L, P] int32) of the placement in force."""
        self._check_open()
        view = [self._placement_v]
        f, (p,) = self._placement.read(lambda _f: view, self.read_budget_s)
        if p.size and (int(p.min()) < 0 or int(p.max()) >= self.geometry.num_experts):
            raise LayoutError(
                f"domain {self.name!r} placement: expert ids outside [0, {self.geometry.num_experts})"
            )
        return int(f[0]), p

    # ------------------------------------------------------------ plans

    def publish_plan(self, plan: Plan) -> None:
        """Write ``plan`` into the inactive plan slot, then flip the current-plan word.

        The word holds (latest plan id, current slot) and is one aligned 8-byte
        store, so ``current`` and the latest id flip together, atomically.

        Plan ids must increase. Arrays must have exactly the dtypes and shapes of
        :class:`eplbd.plan.Plan` for this geometry and respect the bounds
        read_plan checks (ValueError naming the problem otherwise).
        """
        self._check_writable("publish_plan")
        if not isinstance(plan, Plan):
            raise TypeError(f"publish_plan needs an eplbd.plan.Plan, got {type(plan).__name__}")
        g, lo = self.geometry, self.layout
        L, E, R, P = g.num_layers, g.num_experts, g.num_ranks, g.num_slots
        pid = _as_int(plan.plan_id, "plan.plan_id", 0, lay.ID_LIMIT - 1)
        base = _as_int(plan.base_epoch, "plan.base_epoch")
        a_p2l = _exact(plan.phy2log, "<i4", (L, P), "plan.phy2log")
        a_l2p = _exact(plan.log2phy, "<i4", (L, P), "plan.log2phy")
        a_rc = _exact(plan.replica_count, "<i4", (L, E), "plan.replica_count")
        a_ptr = _exact(plan.op_indptr, "<i8", (L * R + 1,), "plan.op_indptr")
        ops = plan.ops
        if not isinstance(ops, np.ndarray) or ops.dtype != OP_DTYPE or ops.ndim != 1:
            got = getattr(ops, "dtype", type(ops))
            raise ValueError(f"plan.ops must be a 1-D array of OP_DTYPE, got {got}")
        a_ops = np.ascontiguousarray(ops)
        n = a_ops.shape[0]
        problem = _plan_bounds_problem(g, lo.ops_capacity, a_p2l, a_l2p, a_rc, a_ptr, a_ops)
        if problem:
            raise ValueError(f"plan {pid}: {problem}")
        latest, current = self._word(lay.WORD_CURRENT_PLAN, "current plan")
        if pid <= latest:
            raise ValueError(f"plan id {pid} must be greater than the latest plan id {latest}")
        h = plan_hash(Plan(pid, base, a_p2l, a_l2p, a_rc, a_ptr, a_ops))
        target = 1 - current if latest >= 0 else 0
        slot = self._slots[target]
        slot.region.write([pid, base, h, SLOT_VALID, n], slot.write_parts((a_p2l, a_l2p, a_rc, a_ptr, a_ops)))
        self._words[lay.WORD_CURRENT_PLAN] = lay.encode_word(pid, target)

    def latest_plan_id(self) -> int:
        """Newest published plan id, -1 if none. One aligned word, no lock; TornReadError if
        its check fails (corrupt)."""
        w = lay.decode_word(int(self._words[lay.WORD_CURRENT_PLAN]))
        return w[0] if w is not None else self._word(lay.WORD_CURRENT_PLAN, "current plan")[0]

    def read_plan(self) -> Plan | None:
        """The current plan (None if none was published): seqlock + CRC consistent, every index
        bounds-checked (LayoutError if a consistent slot breaks a bound); TornReadError when
        no consistent copy is seen within the budget."""
        self._check_open()
        g, K = self.geometry, self.layout.ops_capacity
        for _ in range(8):
            plan_id, current = self._word(lay.WORD_CURRENT_PLAN, "current plan")
            if plan_id == -1:
                return None
            slot = self._slots[current]
            f, copies = slot.region.read(slot.read_parts, self.read_budget_s)
            if int(f[0]) != plan_id or int(f[3]) != SLOT_VALID:
                continue  # two publishes since we read the word reused the slot: start over
            p2l, l2p, rc, ptr, ops = slot.split(copies[0], int(f[4]))
            problem = _plan_bounds_problem(g, K, p2l, l2p, rc, ptr, ops)
            if problem:
                raise LayoutError(f"domain {self.name!r} plan slot {current} (plan {plan_id}): {problem}")
            return Plan(int(f[0]), int(f[1]), p2l, l2p, rc, ptr, ops)
        raise TornReadError(f"domain {self.name!r}: plan area kept changing while being read")

    # ------------------------------------------------------------ plan status

    def write_plan_status(self, status: PlanStatus) -> None:
        self._check_writable("write_plan_status")
        vals = [_as_int(getattr(status, f), f"status.{f}") for f in PlanStatus._fields]
        if not 0 <= vals[1] < _PLAN_STATES:
            raise ValueError(f"status.state must be one of PLAN_NONE..PLAN_REJECTED (0..4), got {vals[1]}")
        self._plan_status.write(vals)

    def read_plan_status(self) -> PlanStatus:
        self._check_open()
        f, _ = self._plan_status.read(None, self.read_budget_s)
        st = PlanStatus(*(int(x) for x in f[:5]))
        if not 0 <= st.state < _PLAN_STATES:
            raise LayoutError(f"domain {self.name!r} plan status: state {st.state} unknown")
        return st

    # ------------------------------------------------------------ daemon info

    def write_daemon_info(self, info: DaemonInfo) -> None:
        """Store the daemon's info; ``last_decision`` is cut to 96 bytes of utf-8 (whole characters)."""
        self._check_writable("write_daemon_info")
        dec = str(info.last_decision).encode("utf-8")[: lay.DECISION_BYTES]
        dec = dec.decode("utf-8", errors="ignore").encode("utf-8")
        ints = [_as_int(getattr(info, f), f"info.{f}") for f in _INFO_INTS]
        moves = [_as_int(getattr(info, f), f"info.{f}") for f in _INFO_MOVES]
        raw = lay.DAEMON_INFO.pack(
            1, *ints, dec, float(info.beta_now), float(info.beta_pred), *moves, float(info.compute_ms)
        )
        self._daemon_info.write([1], [(self._daemon_info_v, np.frombuffer(raw, dtype=np.uint8))])

    def daemon_info_mid_write(self) -> bool:
        """True while the daemon-info region's sequence is odd: a write in progress, or a
        daemon killed inside one (readers then reject the region until the next write)."""
        self._check_open()
        return self._daemon_info.seq % 2 == 1

    def read_daemon_info(self) -> DaemonInfo | None:
        """The daemon's latest info, or None if no daemon has written any."""
        self._check_open()
        view = [self._daemon_info_v]
        f, parts = self._daemon_info.read(lambda f: view if f[0] == 1 else [], self.read_budget_s)
        if int(f[0]) != 1:
            return None
        (raw,) = parts
        vals = lay.DAEMON_INFO.unpack(raw.tobytes())
        if vals[0] != 1:
            raise LayoutError(f"domain {self.name!r} daemon info: valid flag {vals[0]} in payload")
        dec = vals[8].rstrip(b"\0").decode("utf-8", errors="replace")
        return DaemonInfo(*[*vals[1:8], dec, *vals[9:]])

    # ------------------------------------------------------------ doorbell

    def _doorbell(self) -> Doorbell:
        self._check_open()
        if self._bell is None:
            try:
                self._bell = Doorbell.open(self.name)
            except posix_ipc.ExistentialError:
                raise DomainNotFoundError(f"domain {self.name!r}: doorbell semaphore is gone") from None
            except posix_ipc.PermissionsError as e:
                raise PermissionError(f"domain {self.name!r}: doorbell: {e}") from None
        return self._bell

    def ring_doorbell(self) -> None:
        """Wake the daemon (coalescing: at most one wake-up stays pending)."""
        self._doorbell().ring()

    def wait_doorbell(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for the doorbell; False on timeout."""
        return self._doorbell().wait(timeout)


def _create_segment(name: str, size: int, mode: int) -> posix_ipc.SharedMemory:
    """O_CREAT|O_EXCL the segment, replacing a stale one (dead owner) at most twice."""
    seg = segment_name(name)
    for _ in range(3):
        try:
            return posix_ipc.SharedMemory(seg, posix_ipc.O_CREX, mode=mode, size=size)
        except posix_ipc.ExistentialError:
            pass
        try:
            old = posix_ipc.SharedMemory(seg, read_only=True)
        except posix_ipc.ExistentialError:
            continue  # vanished meanwhile: try again
        except posix_ipc.PermissionsError as e:
            raise DomainExistsError(f"domain {name!r} exists and is not readable by us: {e}") from None
        try:
            st = os.fstat(old.fd)
            magic, pid, start, _ = _read_prefix(old.fd)
        finally:
            old.close_fd()
        complete = magic == lay.MAGIC
        if _pid_alive(pid, start):
            what = "" if complete else " (still being created)"
            raise DomainExistsError(f"domain {name!r} exists, owned by live pid {pid}{what}")
        if pid == 0 and time.time() - st.st_mtime < INCOMPLETE_GRACE_S:
            raise DomainExistsError(
                f"domain {name!r} is being created by an unknown process (no owner pid yet)"
            )
        # Stale: the owner (or half-way creator) is dead. Replace it.
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(seg)
        Doorbell.unlink(name)
    raise DomainExistsError(f"domain {name!r}: could not create the segment (it keeps reappearing)")
