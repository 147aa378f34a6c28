"""The one definition of the eplbd shared-memory layout (daemon and client both import it).

Shared memory layout
====================

One POSIX segment ``/dev/shm/<name>`` per domain. All integers little-endian;
every region starts on a 64-byte boundary. ``L, E, R, P`` come from the
:class:`~eplbd.geometry.Geometry` stored in the header, ``C`` is the ring
capacity, ``K = L * 2 * P`` the op capacity of a plan slot. Sizes below are
rounded up to 64 bytes. "seqlock" regions start with a 64-byte region header
(``seq`` u64, ``crc`` u32, 4 reserved bytes, six i64 fields) followed by their
payload; the CRC32 covers the six fields and the (used part of the) payload.

==============  ===================================  ===================================================
region          offset rule                          size
==============  ===================================  ===================================================
header          0                                    512 (magic written last; CRC32 over bytes 8..crc)
words           512                                  64: lock-free u64 words ``current plan`` (plan id,
                                                     slot) and ``latest window`` (id), see below
placement       after words                          64 + L*P*4 (seqlock): epoch; phy2log [L, P] i32
plan slot 0, 1  after placement, back to back        64 + 2*L*P*4 + L*E*4 + (L*R+1)*8 + K*24 each
                                                     (seqlock): plan id, base epoch, hash, state, n_ops;
                                                     phy2log, log2phy [L, P] i32, replica_count [L, E] i32,
                                                     op_indptr [L*R+1] i64, ops [K] OP_DTYPE
plan status     after plan slot 1                    64 (seqlock): id, state, layers committed, error, time
daemon info     after plan status                    64 + 256 (seqlock): ``DAEMON_INFO`` struct
rank pids       after daemon info                    64 + R*8 (seqlock): count; pids [R] i64
ring            after rank pids                      C slots of 64 + L*E*8 (seqlock each): window id,
                                                     step begin, step end, epoch, timestamp ns;
                                                     loads [L, E] i64. Window w lives in slot w % C
==============  ===================================  ===================================================

Words: bits 0..45 hold id+1 (0: none), bit 46 a flag (the plan slot that is
current), bit 47 zero, bits 48..63 a 16-bit check of bits 0..47. One aligned 8-byte store
publishes (plan id, current slot) atomically, so there is no window in which
they disagree and no lock that a killed writer could leave held; the check
rejects a stray write or an all-zero page.

The first 40 header bytes never change between layout versions (magic, version,
header size, owner pid, owner start time, creation time), so any build can tell
who owns a segment of another version, or a half-made one, and whether that
owner is still alive. Only the used part of a plan slot (``n_ops`` ops) is
copied and checksummed, so a small plan publishes fast although each slot is
sized for the worst case.
"""

from __future__ import annotations

import dataclasses
import struct

from eplbd.geometry import Geometry
from eplbd.plan import OP_DTYPE

__all__ = [
    "MAGIC",
    "LAYOUT_VERSION",
    "HEADER_SIZE",
    "HEADER_PREFIX",
    "HEADER",
    "HEADER_FIELDS",
    "HEADER_CRC",
    "HEADER_CRC_OFF",
    "GEOMETRY_FIELDS",
    "OFFSET_FIELDS",
    "ALIGN",
    "REGION_HEADER_SIZE",
    "REGION_FIELDS",
    "WORDS_SIZE",
    "WORD_CURRENT_PLAN",
    "WORD_LATEST_WINDOW",
    "DAEMON_INFO",
    "DAEMON_INFO_SIZE",
    "DECISION_BYTES",
    "ID_LIMIT",
    "MAX_RING_CAPACITY",
    "Layout",
    "compute_layout",
    "ops_capacity",
    "encode_word",
    "decode_word",
]

MAGIC = b"EPLBDSHM"
LAYOUT_VERSION = 1
ALIGN = 64
HEADER_SIZE = 512
REGION_HEADER_SIZE = 64
REGION_FIELDS = 6  # i64 fields at bytes 16..64 of every region header
WORDS_SIZE = 64
WORD_CURRENT_PLAN = 0  # u64 index inside the words area: (latest plan id, its slot)
WORD_LATEST_WINDOW = 1
ID_LIMIT = (1 << 46) - 1  # window and plan ids must be in [0, ID_LIMIT): they share a word
MAX_RING_CAPACITY = 1 << 16

# Version-independent prefix: magic, layout version, header size, owner pid,
# owner process start time (psutil create_time, seconds), creation time (ns).
HEADER_PREFIX = struct.Struct("<8sIIqdq")

GEOMETRY_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Geometry))
OFFSET_FIELDS: tuple[str, ...] = (
    "total_size",
    "words_off",
    "placement_off",
    "plan_slot0_off",
    "plan_slot1_off",
    "plan_slot_size",
    "ops_capacity",
    "plan_status_off",
    "daemon_info_off",
    "rank_pids_off",
    "ring_off",
    "ring_slot_size",
)
HEADER_FIELDS: tuple[str, ...] = (
    ("magic", "layout_version", "header_size", "owner_pid", "owner_start", "created_ns")
    + GEOMETRY_FIELDS
    + ("ring_capacity",)
    + OFFSET_FIELDS
)
# prefix, geometry, ring capacity, offsets; the header CRC32 follows at HEADER.size.
HEADER = struct.Struct(HEADER_PREFIX.format + "q" * len(GEOMETRY_FIELDS) + "q" + "q" * len(OFFSET_FIELDS))
HEADER_CRC = struct.Struct("<I")
HEADER_CRC_OFF = HEADER.size
assert HEADER.size + HEADER_CRC.size <= HEADER_SIZE

# Daemon info payload: valid flag, pid, started_ns, heartbeat_ns, windows_seen,
# plans_published, errors, last_window, last_decision (utf-8, NUL padded),
# beta_now, beta_pred, moves_remote, moves_cross_node, moves_local, compute_ms.
DECISION_BYTES = 96
DAEMON_INFO = struct.Struct(f"<8q{DECISION_BYTES}s2d3qd")
DAEMON_INFO_SIZE = 256
assert DAEMON_INFO.size <= DAEMON_INFO_SIZE


def _up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def ops_capacity(g: Geometry) -> int:
    """Worst case ops of one plan: every slot changes, one SEND + one RECV each: L * 2 * P."""
    return g.num_layers * 2 * g.num_slots


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte offsets of every region for one (geometry, ring capacity).

    Plan slot payload offsets (``slot_*``) are relative to the payload start,
    i.e. ``plan_slotN_off + REGION_HEADER_SIZE``.
    """

    geometry: Geometry
    ring_capacity: int
    total_size: int
    words_off: int
    placement_off: int
    plan_slot0_off: int
    plan_slot1_off: int
    plan_slot_size: int
    ops_capacity: int
    plan_status_off: int
    daemon_info_off: int
    rank_pids_off: int
    ring_off: int
    ring_slot_size: int
    # inside a plan slot payload
    slot_phy2log: int
    slot_log2phy: int
    slot_replica_count: int
    slot_op_indptr: int
    slot_ops: int

    def offsets(self) -> dict[str, int]:
        """The values stored in (and cross-checked against) the header, by field name."""
        return {f: getattr(self, f) for f in OFFSET_FIELDS}

    def ring_slot_off(self, slot: int) -> int:
        return self.ring_off + slot * self.ring_slot_size


def compute_layout(g: Geometry, ring_capacity: int) -> Layout:
    """Offsets and sizes of every region (see the table in this module's docstring)."""
    if isinstance(ring_capacity, bool) or not isinstance(ring_capacity, int):
        raise ValueError(f"ring_capacity must be an int, got {ring_capacity!r}")
    if not 1 <= ring_capacity <= MAX_RING_CAPACITY:
        raise ValueError(f"ring_capacity must be in [1, {MAX_RING_CAPACITY}], got {ring_capacity}")
    L, E, R, P = g.num_layers, g.num_experts, g.num_ranks, g.num_slots
    K = ops_capacity(g)
    H = REGION_HEADER_SIZE

    s_phy2log = 0
    s_log2phy = s_phy2log + _up(L * P * 4)
    s_rc = s_log2phy + _up(L * P * 4)
    s_indptr = s_rc + _up(L * E * 4)
    s_ops = s_indptr + _up((L * R + 1) * 8)
    plan_slot_size = H + s_ops + _up(K * OP_DTYPE.itemsize)

    off = HEADER_SIZE
    words_off, off = off, off + WORDS_SIZE
    placement_off, off = off, off + H + _up(L * P * 4)
    plan_slot0_off, off = off, off + plan_slot_size
    plan_slot1_off, off = off, off + plan_slot_size
    plan_status_off, off = off, off + H
    daemon_info_off, off = off, off + H + DAEMON_INFO_SIZE
    rank_pids_off, off = off, off + H + _up(R * 8)
    ring_slot_size = H + _up(L * E * 8)
    ring_off, off = off, off + ring_capacity * ring_slot_size
    return Layout(
        geometry=g,
        ring_capacity=ring_capacity,
        total_size=off,
        words_off=words_off,
        placement_off=placement_off,
        plan_slot0_off=plan_slot0_off,
        plan_slot1_off=plan_slot1_off,
        plan_slot_size=plan_slot_size,
        ops_capacity=K,
        plan_status_off=plan_status_off,
        daemon_info_off=daemon_info_off,
        rank_pids_off=rank_pids_off,
        ring_off=ring_off,
        ring_slot_size=ring_slot_size,
        slot_phy2log=s_phy2log,
        slot_log2phy=s_log2phy,
        slot_replica_count=s_rc,
        slot_op_indptr=s_indptr,
        slot_ops=s_ops,
    )


# Lock-free words (see the module docstring).
_MASK46 = (1 << 46) - 1
_MASK48 = (1 << 48) - 1


def _check16(v: int) -> int:
    return (((v * 0x9E3779B1) >> 16) ^ v ^ (v >> 32) ^ 0xA5C3) & 0xFFFF


def encode_word(ident: int, flag: int = 0) -> int:
    """(id (-1 for none), flag bit) -> u64 word."""
    v = (ident + 1) | (flag << 46)
    return v | (_check16(v) << 48)


def decode_word(word: int) -> tuple[int, int] | None:
    """u64 word -> (id (-1 for none), flag bit), or None if the check does not match."""
    v = word & _MASK48
    if word >> 48 != _check16(v) or v >> 47:
        return None
    return (v & _MASK46) - 1, v >> 46
