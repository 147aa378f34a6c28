"""``greedy``: a from-scratch baseline in the style of DeepSeek's hierarchical EPLB.

Written from the algorithm's published description, vectorised over layers:

1. **Groups to nodes** (only when there are several nodes and the number of
   expert groups is a multiple of the number of nodes): each node gets G/N
   whole groups, packed heaviest group first onto the least loaded node with
   room, so a token's group-limited routing touches few nodes.
2. **Replicas**: within each node (or globally), every expert gets one
   replica and each spare slot goes to the expert with the largest load per
   replica. A replica can only live on a rank of its node, so an expert gets
   at most ``ranks_per_node`` replicas there.
3. **Ranks**: the replicas (each an even share of its expert's load) are
   packed heaviest first onto the least loaded rank of the node that has a
   free slot and does not already hold that expert.

It ignores the placement in force, so nearly every slot changes on every
plan: the baseline the move-aware policy is measured against.

``hierarchical=False`` skips step 1 even where it applies: one global
replication and packing over all ranks, as SGLang's "global" variant of
DeepSeek's algorithm does (what vLLM's default does with one node). Packing
is then unconstrained by nodes, which balances better but ignores topology.
"""

from __future__ import annotations

import numpy as np

from eplbd.geometry import Geometry
from eplbd.policy._common import lpt_pack, repair_duplicates, replicate, take_rows

__all__ = ["greedy", "hierarchical_feasible"]


def hierarchical_feasible(g: Geometry) -> bool:
    """Group-to-node packing applies: N > 1, N divides G, and a node's experts fill its slots.

    Each node gets E/N experts for its R/N * S slots, with at most R/N replicas
    each, so it needs S <= E/N.
    """
    N = g.num_nodes
    return N > 1 and g.num_groups % N == 0 and g.slots_per_rank <= g.num_experts // N


def _pack_groups(gw: np.ndarray, num_nodes: int) -> np.ndarray:
    """gw: [L, G] group loads -> [L, N, G/N] group ids per node (heaviest first onto least loaded node)."""
    L, G = gw.shape
    per = G // num_nodes
    order = np.argsort(-gw, axis=1, kind="stable")
    ar = np.arange(L)
    load = np.zeros((L, num_nodes))
    fill = np.zeros((L, num_nodes), dtype=np.int64)
    out = np.empty((L, num_nodes, per), dtype=np.int64)
    for j in range(G):
        gid = order[:, j]
        n = np.argmin(np.where(fill >= per, np.inf, load), axis=1)
        out[ar, n, fill[ar, n]] = gid
        load[ar, n] += gw[ar, gid]
        fill[ar, n] += 1
    return out


def _place(w: np.ndarray, experts: np.ndarray, ranks: int, S: int, E: int) -> np.ndarray:
    """Replicate and pack one batch of independent sub-problems.

    w: [B, m] loads of the experts ``experts`` [B, m] (global ids) that must go
    onto ``ranks`` ranks of S slots. Returns [B, ranks * S] expert ids.
    """
    B, m = w.shape
    counts = replicate(w, ranks * S, cap=ranks)
    idx = np.repeat(np.arange(B * m), counts.ravel())  # item -> flat (row, local expert)
    n = ranks * S
    loc = (idx % m).reshape(B, n)
    item_e = take_rows(experts, loc)
    item_w = take_rows(w / counts, loc)
    bin_of, pos_of = lpt_pack(item_w, item_e, ranks, S, E)
    out = np.empty((B, n), dtype=np.int64)
    np.put_along_axis(out, bin_of * S + pos_of, item_e, axis=1)
    return out


def greedy(loads: np.ndarray, g: Geometry, hierarchical: bool = True) -> np.ndarray:
    """From-scratch placement [L, P] int32 for loads [L, E] (float64, validated by the caller).

    The number of layers is taken from ``loads`` (so a per-layer loop can call
    this with one layer at a time); the rest of the shape from ``g``.
    ``hierarchical``: pack groups onto nodes where :func:`hierarchical_feasible`
    (the default, DeepSeek's and vLLM's); False: global, over all ranks at once.
    """
    w = np.asarray(loads, dtype=np.float64)
    L, E = w.shape
    S, R, N = g.slots_per_rank, g.num_ranks, g.num_nodes
    if hierarchical and hierarchical_feasible(g):
        G = g.num_groups
        epg = E // G
        gw = w.reshape(L, G, epg).sum(axis=2)
        node_groups = _pack_groups(gw, N)  # [L, N, G/N]
        # experts of each node, group by group: [L, N, E/N]
        ex = (node_groups[:, :, :, None] * epg + np.arange(epg)).reshape(L * N, E // N)
        wn = take_rows(np.repeat(w, N, axis=0), ex)
        rpn = R // N
        out = _place(wn, ex, rpn, S, E).reshape(L, R * S)
    else:
        ex = np.broadcast_to(np.arange(E), (L, E))
        out = _place(w, ex, R, S, E)
    out = out.astype(np.int32)
    repair_duplicates(out, w, E, S)
    return out
