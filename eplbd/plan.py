"""A plan: the move from one placement (epoch ``base_epoch``) to the next (epoch ``plan_id``).

This is the in-memory form shared by the planner (which builds it), the shm
layer (which stores it byte for byte) and the client (which executes it).

Ops are kept in CSR form indexed by (layer, rank): the ops of rank r in layer l
are ``ops[op_indptr[l*R + r] : op_indptr[l*R + r + 1]]``, sorted by round.
Every op reads *old* (live) weights and writes a staging buffer; staged experts
are copied into their slots only at commit, so ops of one layer never race.

Op kinds, seen from the rank that owns the op list:

- ``SEND``: send local slot ``src_slot`` (expert ``expert``) to rank ``peer``,
  which stores it for its slot ``dst_slot``.
- ``RECV``: receive from rank ``peer`` (its slot ``src_slot``) the weights of
  ``expert`` for local slot ``dst_slot``.
- ``COPY``: local device copy from slot ``src_slot`` to slot ``dst_slot``;
  ``peer`` is the rank itself.

In each round a rank exchanges with at most one peer (it may both send to and
receive from it); COPY ops carry round 0 and need no peer.

Slot fields are local slot indices in [0, S) (global slot = rank * S + slot).
Within a (layer, rank) row, ops are sorted by (round, kind, src_slot, dst_slot)
and that key is unique, so the SENDs of rank u to v in a round appear in the
same order as the matching RECVs of v from u: point-to-point messages between
a pair match in issue order. Several transfers between one pair may share a
round. ``eplbd.planner`` builds and validates plans.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

__all__ = ["OP_DTYPE", "SEND", "RECV", "COPY", "KIND_NAMES", "Plan", "PlanError", "plan_hash"]

SEND, RECV, COPY = 0, 1, 2
KIND_NAMES = ("SEND", "RECV", "COPY")


class PlanError(ValueError):
    """A plan is malformed or does not turn its base placement into its new one;
    the message names the check that failed and where (layer, rank, op index)."""


OP_DTYPE = np.dtype(
    [
        ("round", "<i4"),
        ("kind", "<i4"),
        ("peer", "<i4"),
        ("src_slot", "<i4"),
        ("dst_slot", "<i4"),
        ("expert", "<i4"),
    ]
)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Arrays (all little-endian, C-contiguous):

    - ``phy2log`` [L, P] int32: the new placement.
    - ``log2phy`` [L, P] int32: compact log2phy (see placement.log2phy_compact).
    - ``replica_count`` [L, E] int32.
    - ``op_indptr`` [L*R + 1] int64: CSR row pointers over (layer, rank).
    - ``ops`` [n_ops] OP_DTYPE.
    """

    plan_id: int
    base_epoch: int
    phy2log: np.ndarray
    log2phy: np.ndarray
    replica_count: np.ndarray
    op_indptr: np.ndarray
    ops: np.ndarray

    @property
    def num_ops(self) -> int:
        return int(self.ops.shape[0])

    def ops_for(self, layer: int, rank: int, num_ranks: int) -> np.ndarray:
        row = layer * num_ranks + rank
        return self.ops[self.op_indptr[row] : self.op_indptr[row + 1]]

    @property
    def hash(self) -> int:
        return plan_hash(self)


def plan_hash(plan: Plan) -> int:
    """63-bit content hash, identical on every host for identical plans.

    Fits a signed int64 control word; ranks compare it to make sure every node
    is about to execute the same plan.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(np.array([plan.plan_id, plan.base_epoch], dtype="<i8").tobytes())
    for a in (plan.phy2log, plan.log2phy, plan.replica_count, plan.op_indptr, plan.ops):
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
