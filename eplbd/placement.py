"""Placements of logical experts on physical slots: invariants, tables, balance, moves.

A placement is ``phy2log`` [L, P] int32: the logical expert held by each physical
slot. Everything else (replica counts, log2phy tables) is derived from it, so
there is one source of truth. All functions are pure and vectorised over layers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from eplbd.geometry import Geometry

__all__ = [
    "PlacementError",
    "MoveCounts",
    "default_phy2log",
    "validate_phy2log",
    "validate_loads",
    "replica_count",
    "log2phy_compact",
    "log2phy_padded",
    "rank_loads",
    "balancedness",
    "layer_balancedness",
    "count_moves",
    "peak_lower_bound",
]


class PlacementError(ValueError):
    """A placement breaks an invariant; the message names which and where."""


class MoveCounts(NamedTuple):
    """Slots whose expert changes. ``remote`` need weights from another rank
    (``cross_node`` of them from another node); ``local`` are copies within a rank."""

    remote: int
    cross_node: int
    local: int

    @property
    def total(self) -> int:
        return self.remote + self.local


def default_phy2log(g: Geometry) -> np.ndarray:
    """The placement an engine starts with: slot p holds expert p mod E.

    Returns [L, P] int32. Redundant slots wrap round; since S <= E the replicas
    of one expert land on different ranks.
    """
    row = np.arange(g.num_slots, dtype=np.int32) % g.num_experts
    return np.broadcast_to(row, (g.num_layers, g.num_slots)).copy()


def validate_loads(loads: np.ndarray, g: Geometry, name: str = "loads") -> np.ndarray:
    """Check loads [L, E] (finite, >= 0, right shape); return them as float64."""
    a = np.asarray(loads)
    if a.shape != (g.num_layers, g.num_experts):
        raise ValueError(f"{name}: shape {a.shape} != (layers, experts) = {(g.num_layers, g.num_experts)}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name}: dtype {a.dtype} is not numeric")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        l, e = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name}: non-finite value {a[l, e]} at layer {l}, expert {e}")
    if (a < 0).any():
        l, e = np.argwhere(a < 0)[0]
        raise ValueError(f"{name}: negative value {a[l, e]} at layer {l}, expert {e}")
    return a


def validate_phy2log(phy2log: np.ndarray, g: Geometry, name: str = "phy2log") -> np.ndarray:
    """Check every placement invariant; return phy2log as contiguous int32 [L, P].

    Invariants: shape [L, P]; entries in [0, E); every logical expert has >= 1
    replica in every layer; no rank holds two replicas of one expert (so each
    rank has exactly S distinct experts and an expert at most R replicas).
    """
    a = np.asarray(phy2log)
    if a.shape != (g.num_layers, g.num_slots):
        raise PlacementError(f"{name}: shape {a.shape} != (layers, slots) = {(g.num_layers, g.num_slots)}")
    if a.dtype.kind not in "iu":
        raise PlacementError(f"{name}: dtype {a.dtype} is not an integer type")
    if a.size and (a.min() < 0 or a.max() >= g.num_experts):
        bad = np.argwhere((a < 0) | (a >= g.num_experts))[0]
        raise PlacementError(
            f"{name}: layer {bad[0]} slot {bad[1]} holds expert {a[bad[0], bad[1]]}, "
            f"outside [0, {g.num_experts})"
        )
    a = np.ascontiguousarray(a, dtype=np.int32)
    rc = replica_count(a, g)
    if (rc == 0).any():
        l, e = np.argwhere(rc == 0)[0]
        raise PlacementError(f"{name}: layer {l} has no replica of expert {e}")
    per_rank = np.sort(a.reshape(g.num_layers, g.num_ranks, g.slots_per_rank), axis=2)
    dup = (per_rank[:, :, 1:] == per_rank[:, :, :-1]).any(axis=2)
    if dup.any():
        l, r = np.argwhere(dup)[0]
        raise PlacementError(f"{name}: layer {l} rank {r} holds two replicas of one expert")
    return a


def replica_count(phy2log: np.ndarray, g: Geometry) -> np.ndarray:
    """[L, P] -> [L, E] int32 replicas of each expert."""
    L, E = g.num_layers, g.num_experts
    flat = (phy2log.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[:, None]).ravel()
    return np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.int32)


def log2phy_compact(phy2log: np.ndarray) -> np.ndarray:
    """[L, P] -> [L, P] int32: slot ids grouped by expert (ascending), slots ascending.

    With ``replica_count`` this is log2phy in CSR form: expert e's replicas are
    ``out[l, off[e]:off[e] + rc[l, e]]`` with ``off = cumsum(rc) - rc``.
    """
    a = np.asarray(phy2log)
    # Expert ids < 32768 fit int16, whose stable sort is numpy's radix sort (~10x faster).
    if a.size and a.min() >= 0 and a.max() < 32768:
        a = a.astype(np.int16)
    return np.argsort(a, axis=1, kind="stable").astype(np.int32)


def log2phy_padded(phy2log: np.ndarray, g: Geometry, width: int | None = None) -> np.ndarray:
    """[L, P] -> [L, E, K] int32 with K = ``width`` or max_replicas, padded with -1."""
    K = g.max_replicas if width is None else width
    rc = replica_count(phy2log, g)
    if rc.max(initial=0) > K:
        raise PlacementError(f"log2phy width {K} < {rc.max()} replicas")
    order = log2phy_compact(phy2log)
    off = np.cumsum(rc, axis=1) - rc  # [L, E]
    sorted_exp = np.take_along_axis(phy2log, order, axis=1)  # [L, P]
    k = np.arange(g.num_slots)[None, :] - np.take_along_axis(off, sorted_exp.astype(np.int64), axis=1)
    out = np.full((g.num_layers, g.num_experts, K), -1, dtype=np.int32)
    li = np.repeat(np.arange(g.num_layers), g.num_slots)
    out[li, sorted_exp.ravel(), k.ravel()] = order.ravel()
    return out


def rank_loads(loads: np.ndarray, phy2log: np.ndarray, g: Geometry) -> np.ndarray:
    """Load per rank [L, R]: each replica takes an even share of its expert's load."""
    rc = replica_count(phy2log, g)
    per_replica = loads / np.maximum(rc, 1)  # [L, E]
    slot_load = np.take_along_axis(per_replica, phy2log.astype(np.int64), axis=1)  # [L, P]
    return slot_load.reshape(g.num_layers, g.num_ranks, g.slots_per_rank).sum(axis=2)


def layer_balancedness(loads: np.ndarray, phy2log: np.ndarray, g: Geometry) -> np.ndarray:
    """[L] mean/max rank load per layer (1.0 for an idle layer)."""
    rl = rank_loads(loads, phy2log, g)
    mx = rl.max(axis=1)
    return np.where(mx > 0, rl.mean(axis=1) / np.where(mx > 0, mx, 1.0), 1.0)


def balancedness(loads: np.ndarray, phy2log: np.ndarray, g: Geometry) -> float:
    """β = Σ_l mean_r load[l, r] / Σ_l max_r load[l, r]; 1.0 when there is no load."""
    rl = rank_loads(loads, phy2log, g)
    mx = float(rl.max(axis=1).sum())
    return float(rl.mean(axis=1).sum()) / mx if mx > 0 else 1.0


def count_moves(old: np.ndarray, new: np.ndarray, g: Geometry) -> MoveCounts:
    """Classify the slots whose expert changes between two placements [L, P].

    A changed slot is local when its rank already held the expert, remote
    otherwise; a remote move is cross-node when no replica is on its node.
    """
    L, E, R, S = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank
    changed = old != new
    if not changed.any():
        return MoveCounts(0, 0, 0)
    on_rank = np.zeros((L, R, E), dtype=bool)
    li = np.repeat(np.arange(L), R * S)
    ri = np.tile(np.repeat(np.arange(R), S), L)
    on_rank[li, ri, old.ravel()] = True
    on_node = np.asarray(on_rank.reshape(L, g.num_nodes, g.ranks_per_node, E).any(axis=2))
    l, p = np.nonzero(changed)
    e = new[l, p]
    r = p // S
    local = on_rank[l, r, e]
    same_node = on_node[l, r // g.ranks_per_node, e]
    return MoveCounts(
        remote=int((~local).sum()),
        cross_node=int((~local & ~same_node).sum()),
        local=int(local.sum()),
    )


def peak_lower_bound(loads: np.ndarray, g: Geometry) -> np.ndarray:
    """[L] a lower bound on the peak rank load any valid placement can reach.

    ``max(mean rank load, m*)`` where m* = min over replica counts (each expert
    1..max_replicas replicas, P in all) of max_e load_e / count_e: every rank
    carries at least the mean, and the rank holding the replica with the largest
    share carries at least that share. m* is reached by handing the P - E spare
    slots one by one to the expert with the largest load per replica.
    """
    from eplbd.policy._common import replicate  # here: policy imports this module

    w = np.asarray(loads, dtype=np.float64)
    counts = replicate(w, g.num_slots, cap=g.max_replicas)
    return np.maximum(w.sum(axis=1) / g.num_ranks, (w / counts).max(axis=1))
