"""Transfer planner: (old placement, new placement) -> per-layer, per-rank ops.

Pure numpy, no I/O. The plan format and op semantics are fixed in
:mod:`eplbd.plan` (read its docstring first); this module builds plans
(:func:`build_plan`), checks them (:func:`validate_plan`, run by every rank
before it starts a plan), simulates them (:func:`apply_ops`) and derives what
the executor needs to size itself (:func:`changed_layers`, :func:`staging_need`,
:func:`plan_stats`).

How a plan is built, for every slot whose expert changes (layer l, slot p on
rank r, new expert e):

- **COPY** when rank r already holds e in the old placement (local device copy
  from that slot; no network).
- Otherwise a **RECV** on r and a matching **SEND** on a source rank holding e
  in the old placement. Sources are picked per layer, same node first, then the
  source rank with the fewest sends so far in this layer (so transfers spread
  over the existing replicas), then the nearest rank after r in ring order
  (deterministic, and it spreads ties). The choice is made in *waves*: wave j
  assigns the j-th demand of every (layer, expert) at once, vectorised over all
  layers, then updates the send counts; demands for one expert are thus spread
  exactly, demands for different experts approximately.

Every op reads old (live) weights and writes a staging buffer, so no op of a
layer can clobber the source of another: there are no ordering hazards.

**Rounds.** The transfers of one layer form an undirected multigraph on ranks
(one edge per transfer). We colour its *pairs* (the simple graph): all the
transfers between one pair of ranks share a round, in both directions, so a
round is a matching of ranks and each rank talks to at most one peer per
round, as the plan format requires. The lower bound on rounds is then the max
number of distinct peers of a rank in the layer (Δ); greedy first-fit colouring
over pairs sorted by (multiplicity desc, pair) uses at most 2Δ-1 and in practice
about Δ+1 (see benchmarks/bench_planner.py). Putting several experts of one pair
in one round keeps the number of rounds (and synchronisations) down; the cost
is that a round lasts as long as its busiest pair. The greedy colouring runs in
lock-step over layers: step j colours the j-th pair of every layer at once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from eplbd.geometry import Geometry
from eplbd.placement import PlacementError, replica_count, validate_phy2log
from eplbd.plan import COPY, KIND_NAMES, OP_DTYPE, RECV, SEND, Plan, PlanError

__all__ = [
    "PlanError",
    "PlanStats",
    "build_plan",
    "validate_plan",
    "apply_ops",
    "changed_layers",
    "staging_need",
    "rounds_per_layer",
    "round_lower_bound",
    "plan_stats",
    "empty_plan",
]

_I64_MAX = np.iinfo(np.int64).max


def _placement(a: np.ndarray, g: Geometry, name: str) -> np.ndarray:
    try:
        return validate_phy2log(a, g, name)
    except PlacementError as exc:
        raise PlanError(str(exc)) from exc


def _check_id(v: int, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise PlanError(f"{name}: must be an int, got {type(v).__name__}")
    if not (-(2**63) <= int(v) < 2**63):
        raise PlanError(f"{name}: {v} does not fit in int64")
    return int(v)


def _argsort_rows(a: np.ndarray, num_experts: int) -> np.ndarray:
    """Stable argsort of each row of a placement [l, P] (= log2phy_compact).

    Expert ids below 2**15 are sorted as int16, for which numpy's stable sort is
    a radix sort: ~10x faster than sorting int32 on the DeepSeek-V3 shape.
    """
    if num_experts <= np.iinfo(np.int16).max:
        a = a.astype(np.int16)
    return np.argsort(a, axis=1, kind="stable").astype(np.int32)


def _rows_of_ops(op_indptr: np.ndarray, n_ops: int) -> np.ndarray:
    """Row (layer * R + rank) of every op, [n_ops] int64; op_indptr must be checked."""
    return np.repeat(np.arange(op_indptr.shape[0] - 1, dtype=np.int64), np.diff(op_indptr))


def _assign_sources(
    l: np.ndarray, e: np.ndarray, r_dst: np.ndarray, old: np.ndarray, g: Geometry
) -> np.ndarray:
    """Pick a source slot (global index into old[l]) for every remote demand.

    l, e, r_dst: [n] layer, expert, destination rank of each demand (destination
    does not hold e). Returns [n] int64 global source slots; deterministic.
    """
    n = l.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    E, R, S = g.num_experts, g.num_ranks, g.slots_per_rank
    P, rpn = g.num_slots, g.ranks_per_node
    # Holders of (l, e) in old via the compact log2phy of the layers concerned.
    layers, li = np.unique(l, return_inverse=True)
    sub = old[layers]
    order = _argsort_rows(sub, E)  # [Lc, P] slots grouped by expert
    rc = replica_count(sub, Geometry(len(layers), E, R, S, g.num_nodes))  # [Lc, E]
    off = np.cumsum(rc, axis=1) - rc
    rc_d = rc[li, e].astype(np.int64)  # [n]
    K = int(rc_d.max())
    kk = np.arange(K, dtype=np.int64)
    valid = kk[None, :] < rc_d[:, None]  # [n, K]
    idx = np.minimum(off[li, e][:, None] + kk[None, :], P - 1)
    cand = order[li[:, None], idx].astype(np.int64)  # [n, K] global slots
    cand_rank = cand // S
    cross = (cand_rank // rpn) != (r_dst // rpn)[:, None]
    # Score = (cross node, sends so far, ring distance); packed into one int64 so
    # argmin is a lexicographic choice. The sends term is added per wave.
    dist = (cand_rank - r_dst[:, None]) % R
    shift_cnt = int(R).bit_length() + 1
    shift_cross = shift_cnt + int(n).bit_length() + 1
    static = (cross.astype(np.int64) << shift_cross) + dist
    static[~valid] = _I64_MAX >> 1
    # Wave j = the j-th demand of each (layer, expert), demands ordered by dst rank.
    key = (l.astype(np.int64) * E + e) * R + r_dst
    srt = np.argsort(key, kind="stable")
    grp = (l.astype(np.int64) * E + e)[srt]
    start = np.r_[True, grp[1:] != grp[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    wave = np.empty(n, dtype=np.int64)
    wave[srt] = np.arange(n) - first
    by_wave = np.argsort(wave, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(wave))]
    sends = np.zeros(len(layers) * R, dtype=np.int64)
    choice = np.empty(n, dtype=np.int64)
    for w in range(len(bounds) - 1):
        ids = by_wave[bounds[w] : bounds[w + 1]]
        rows = li[ids, None] * R + cand_rank[ids]
        score = static[ids] + (sends[rows] << shift_cnt)
        k = np.argmin(score, axis=1)
        pick = cand[ids, k]
        choice[ids] = pick
        np.add.at(sends, li[ids] * R + pick // S, 1)
    return choice


def _colour_pairs(l: np.ndarray, u: np.ndarray, v: np.ndarray, R: int) -> np.ndarray:
    """Round of every transfer: greedy edge colouring of rank pairs, per layer.

    l, u, v: [n] layer, sender, receiver of each transfer. All transfers of one
    unordered pair get the same round. Returns [n] int32 rounds, 0-based and
    contiguous per layer.
    """
    n = l.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    a = np.minimum(u, v).astype(np.int64)
    b = np.maximum(u, v).astype(np.int64)
    key = (l.astype(np.int64) * R + a) * R + b
    pairs, inv, mult = np.unique(key, return_inverse=True, return_counts=True)
    pl, pa, pb = pairs // (R * R), (pairs // R) % R, pairs % R
    layers, pli = np.unique(pl, return_inverse=True)
    # Greedy order within a layer: heaviest pairs first (they get the low rounds),
    # ties by pair ids, so the result is deterministic.
    order = np.lexsort((pb, pa, -mult, pli))
    gl = pli[order]
    start = np.r_[True, gl[1:] != gl[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
    step = np.arange(len(order)) - first  # position of the pair within its layer
    seq = order[np.argsort(step, kind="stable")]  # step-major; one pair per layer per step
    bounds = np.r_[0, np.cumsum(np.bincount(step))]
    ru = pli[seq] * R + pa[seq]  # rows of the used-colour table
    rv = pli[seq] * R + pb[seq]
    colour = np.empty(len(pairs), dtype=np.int32)
    if R <= 32:
        # First-fit needs < 2R-3 <= 61 colours: a uint64 bit mask per (layer, rank);
        # the lowest free colour is the lowest zero bit, ~m & (m + 1).
        used = np.zeros(len(layers) * R, dtype=np.uint64)
        bits = np.empty(len(seq), dtype=np.uint64)
        one = np.uint64(1)
        for s in range(len(bounds) - 1):
            a, b = bounds[s], bounds[s + 1]
            u, v = ru[a:b], rv[a:b]
            m = used[u] | used[v]
            free = ~m & (m + one)
            bits[a:b] = free
            used[u] |= free
            used[v] |= free
        # bits are powers of two below 2**62: frexp gives the exponent exactly.
        colour[seq] = np.frexp(bits.astype(np.float64))[1] - 1
    else:
        used_b = np.zeros((len(layers) * R, 2 * R), dtype=bool)
        for s in range(len(bounds) - 1):
            a, b = bounds[s], bounds[s + 1]
            u, v = ru[a:b], rv[a:b]
            c = np.argmin(used_b[u] | used_b[v], axis=1)
            colour[seq[a:b]] = c
            used_b[u, c] = True
            used_b[v, c] = True
    return colour[inv]


def _pack(cols: list[tuple[np.ndarray, int]]) -> np.ndarray | None:
    """Pack non-negative columns (most significant first) with their exclusive
    upper bounds into one int64 key per row, or None if they do not fit in 62 bits.

    One int64 sort/compare is several times cheaper than a multi-key lexsort."""
    bits = [max(int(hi - 1).bit_length(), 1) for _, hi in cols]
    if sum(bits) > 62:
        return None
    key = np.zeros(cols[0][0].shape[0], dtype=np.int64)
    for (c, _), b in zip(cols, bits, strict=True):
        key <<= b
        key |= c.astype(np.int64)
    return key


def _assemble(
    g: Geometry,
    row: np.ndarray,
    rnd: np.ndarray,
    kind: np.ndarray,
    peer: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    expert: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Sort ops by (row, round, kind, src_slot, dst_slot) and build the CSR."""
    LR, S = g.num_layers * g.num_ranks, g.slots_per_rank
    nr = int(rnd.max(initial=0)) + 1
    key = _pack([(row, LR), (rnd, nr), (kind, 3), (src, S), (dst, S)])
    # Keys are unique (see plan.py), so any sort gives the same order.
    order = np.argsort(key) if key is not None else np.lexsort((dst, src, kind, rnd, row))
    ops = np.empty(len(order), dtype=OP_DTYPE)
    ops["round"] = rnd[order]
    ops["kind"] = kind[order]
    ops["peer"] = peer[order]
    ops["src_slot"] = src[order]
    ops["dst_slot"] = dst[order]
    ops["expert"] = expert[order]
    counts = np.bincount(row, minlength=LR)
    indptr = np.zeros(LR + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, ops


def build_plan(
    plan_id: int, base_epoch: int, old_phy2log: np.ndarray, new_phy2log: np.ndarray, g: Geometry
) -> Plan:
    """Build the plan turning ``old_phy2log`` (epoch ``base_epoch``) into ``new_phy2log``.

    old_phy2log, new_phy2log: [L, P] placements (both must be valid). Returns a
    :class:`Plan` whose ops cover exactly the changed slots (unchanged layers have
    no ops), with ``log2phy``/``replica_count`` of the new placement. Identical
    inputs give byte-identical plans (and equal :func:`eplbd.plan.plan_hash`).
    Raises PlanError for invalid ids or placements.
    """
    plan_id = _check_id(plan_id, "plan_id")
    base_epoch = _check_id(base_epoch, "base_epoch")
    old = _placement(old_phy2log, g, "old_phy2log")
    new = _placement(new_phy2log, g, "new_phy2log")
    R, S = g.num_ranks, g.slots_per_rank
    l, p = np.nonzero(old != new)
    e = new[l, p].astype(np.int64)
    r = p // S
    dst = p - r * S
    # Does the destination rank already hold e (old)? -> local COPY from that slot.
    old_r = old.reshape(g.num_layers, R, S)[l, r]  # [n, S]
    hit = old_r == e[:, None]
    local = hit.any(axis=1)
    local_src = np.argmax(hit, axis=1)

    cl = l[local]
    n_copy = cl.shape[0]
    rm = ~local
    tl, te, tr, tdst = l[rm], e[rm], r[rm], dst[rm]
    src_slot = _assign_sources(tl, te, tr, old, g)
    sr = src_slot // S
    rnd = _colour_pairs(tl, sr, tr, R)

    n_t = tl.shape[0]
    row = np.concatenate([cl * R + r[local], tl * R + sr, tl * R + tr])
    rounds = np.concatenate([np.zeros(n_copy, np.int64), rnd, rnd])
    kind = np.concatenate([np.full(n_copy, COPY), np.full(n_t, SEND), np.full(n_t, RECV)])
    peer = np.concatenate([r[local], tr, sr])
    src = np.concatenate([local_src[local], src_slot - sr * S, src_slot - sr * S])
    dsts = np.concatenate([dst[local], tdst, tdst])
    expert = np.concatenate([e[local], te, te])
    indptr, ops = _assemble(g, row, rounds, kind, peer, src, dsts, expert)
    return Plan(
        plan_id=plan_id,
        base_epoch=base_epoch,
        phy2log=new.copy() if new is new_phy2log else new,
        log2phy=_argsort_rows(new, g.num_experts),  # == placement.log2phy_compact(new)
        replica_count=replica_count(new, g),
        op_indptr=indptr,
        ops=ops,
    )


def empty_plan(plan_id: int, base_epoch: int, phy2log: np.ndarray, g: Geometry) -> Plan:
    """A plan with no ops that keeps ``phy2log`` (useful to re-announce a placement)."""
    return build_plan(plan_id, base_epoch, phy2log, phy2log, g)


def _check_array(a: object, name: str, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise PlanError(f"plan.{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise PlanError(f"plan.{name}: dtype {a.dtype} != {np.dtype(dtype)}")
    if a.shape != shape:
        raise PlanError(f"plan.{name}: shape {a.shape} != {shape}")
    return a


def _check_structure(plan: Plan, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Shapes, dtypes, CSR bounds and op field ranges. Returns (row [n], ops)."""
    L, E, R, S, P = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank, g.num_slots
    _check_id(plan.plan_id, "plan_id")
    _check_id(plan.base_epoch, "base_epoch")
    if not isinstance(plan.ops, np.ndarray) or plan.ops.ndim != 1:
        raise PlanError("plan.ops: expected a 1-D numpy array")
    ops = _check_array(plan.ops, "ops", OP_DTYPE, (plan.ops.shape[0],))
    n = ops.shape[0]
    _check_array(plan.phy2log, "phy2log", "<i4", (L, P))
    _check_array(plan.log2phy, "log2phy", "<i4", (L, P))
    _check_array(plan.replica_count, "replica_count", "<i4", (L, E))
    ip = _check_array(plan.op_indptr, "op_indptr", "<i8", (L * R + 1,))
    if ip[0] != 0:
        raise PlanError(f"plan.op_indptr: starts at {ip[0]}, not 0")
    if ip[-1] != n:
        raise PlanError(f"plan.op_indptr: ends at {ip[-1]} but there are {n} ops")
    d = np.diff(ip)
    if (d < 0).any():
        i = int(np.argmax(d < 0))
        raise PlanError(f"plan.op_indptr: decreases at row {i} (layer {i // R}, rank {i % R})")
    row = _rows_of_ops(ip, n)
    for f, hi in (("peer", R), ("src_slot", S), ("dst_slot", S), ("expert", E), ("kind", 3)):
        col = ops[f]
        bad = (col < 0) | (col >= hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise PlanError(
                f"plan.ops[{i}] (layer {row[i] // R}, rank {row[i] % R}): {f} {col[i]} outside [0, {hi})"
            )
    if (ops["round"] < 0).any():
        i = int(np.argmax(ops["round"] < 0))
        raise PlanError(f"plan.ops[{i}] (layer {row[i] // R}, rank {row[i] % R}): negative round")
    return row, ops


def _where(i: int, row: np.ndarray, ops: np.ndarray, R: int) -> str:
    o = ops[i]
    return (
        f"plan.ops[{i}] (layer {row[i] // R}, rank {row[i] % R}, {KIND_NAMES[int(o['kind'])]}, "
        f"round {o['round']}, peer {o['peer']}, slots {o['src_slot']}->{o['dst_slot']}, "
        f"expert {o['expert']})"
    )


def apply_ops(plan: Plan, old_phy2log: np.ndarray, g: Geometry) -> np.ndarray:
    """Simulate the plan's ops on the slot table ``old_phy2log`` [L, P]; return [L, P] int32.

    Staging semantics: every RECV/COPY reads the *old* content of its source slot
    (the sender's slot for a RECV) and lands in its destination slot at commit;
    SENDs change no slot. The expert fields of ops are not trusted: the content
    is what the source slot held. Raises PlanError on malformed CSR/fields or a
    slot written twice.
    """
    row, ops = _check_structure(plan, g)
    old = np.asarray(old_phy2log)
    if old.shape != (g.num_layers, g.num_slots):
        raise PlanError(f"old_phy2log: shape {old.shape} != {(g.num_layers, g.num_slots)}")
    return _apply(row, ops, old, g)


def _apply(row: np.ndarray, ops: np.ndarray, old: np.ndarray, g: Geometry) -> np.ndarray:
    R, S, P = g.num_ranks, g.slots_per_rank, g.num_slots
    out = np.array(old, dtype=np.int32, copy=True)
    w = ops["kind"] != SEND
    wl, wr = row[w] // R, row[w] % R
    src_rank = np.where(ops["kind"][w] == RECV, ops["peer"][w], wr)
    src_p = src_rank * S + ops["src_slot"][w]
    dst_p = wr * S + ops["dst_slot"][w]
    target = wl * P + dst_p
    if target.size:
        cnt = np.bincount(target, minlength=g.num_layers * P)
        if cnt.max() > 1:
            t = int(np.argmax(cnt))
            raise PlanError(f"plan: layer {t // P} slot {t % P} is written by {cnt[t]} ops")
    out[wl, dst_p] = old[wl, src_p]
    return out


def validate_plan(plan: Plan, old_phy2log: np.ndarray, g: Geometry) -> None:
    """Check that ``plan`` is well formed and turns ``old_phy2log`` into ``plan.phy2log``.

    Raises :class:`PlanError` naming the first failed check:

    - shapes/dtypes of every array; CSR row pointers monotonic from 0 to n_ops;
      op fields in range (peer in [0, R), slots in [0, S), expert in [0, E),
      kind in {SEND, RECV, COPY}, round >= 0);
    - the new placement's invariants; replica_count and log2phy match it;
    - ops within a (layer, rank) sorted by (round, kind, src_slot, dst_slot) with
      no duplicates; COPY: round 0, peer = own rank; SEND/RECV: peer != own rank;
    - every source slot holds the op's expert in the old placement, every
      written slot gets the op's expert in the new one, no slot written twice,
      ops only on changed slots, and applying the ops to old gives exactly new;
    - every SEND matched by exactly one RECV on its peer (same layer, round,
      expert, slots) and vice versa;
    - in every round a rank exchanges with at most one peer.

    Vectorised: cost is O(L·P + n_ops log n_ops).
    """
    L, E, R, S, P = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank, g.num_slots
    row, ops = _check_structure(plan, g)
    old = np.asarray(old_phy2log)
    if old.shape != (L, P) or old.dtype.kind not in "iu":
        raise PlanError(f"old_phy2log: shape {old.shape} dtype {old.dtype}, want ({L}, {P}) integer")
    if old.size and (old.min() < 0 or old.max() >= E):
        raise PlanError(f"old_phy2log: expert ids outside [0, {E})")
    new = _placement(plan.phy2log, g, "plan.phy2log")

    rc = replica_count(new, g)
    if not np.array_equal(rc, plan.replica_count):
        l, x = np.argwhere(rc != plan.replica_count)[0]
        raise PlanError(
            f"plan.replica_count: layer {l} expert {x} is {plan.replica_count[l, x]}, "
            f"phy2log gives {rc[l, x]}"
        )
    # log2phy must equal the stable argsort of phy2log: a permutation of each row
    # along which (expert, slot) strictly increases. Checked in O(L·P), no sort.
    l2p = plan.log2phy
    if l2p.size:
        if l2p.min() < 0 or l2p.max() >= P:
            raise PlanError(f"plan.log2phy: slot ids outside [0, {P})")
        key = np.take_along_axis(new, l2p, axis=1).astype(np.int64) * P + l2p
        bad = ~(key[:, 1:] > key[:, :-1]).all(axis=1)
        if bad.any():
            raise PlanError(
                f"plan.log2phy: layer {int(np.argmax(bad))} is not phy2log's slots grouped by expert"
            )

    kind, peer, rnd = ops["kind"], ops["peer"], ops["round"]
    src, dst, ex = ops["src_slot"], ops["dst_slot"], ops["expert"]
    n = ops.shape[0]
    own = row % R
    lay = row // R
    # Sorted, unique (round, kind, src, dst) within a row: the message-matching
    # order. Rows never decrease (CSR), so one non-decreasing key suffices here;
    # uniqueness is checked after round exclusivity (a second peer in a round is
    # the likelier cause of a duplicate key, and the clearer message).
    nr = int(rnd.max(initial=0)) + 1
    dup = np.zeros(max(n - 1, 0), dtype=bool)
    if n > 1:
        key = _pack([(row, L * R), (rnd, nr), (kind, 3), (src, S), (dst, S)])
        if key is not None:
            bad = key[1:] < key[:-1]
            dup = key[1:] == key[:-1]
        else:
            same = row[1:] == row[:-1]
            k1 = np.stack([rnd, kind, src, dst], axis=1).astype(np.int64)
            diff = k1[1:] - k1[:-1]
            nz = diff != 0
            lead = diff[np.arange(n - 1), np.argmax(nz, axis=1)]
            bad = same & nz.any(axis=1) & (lead < 0)
            dup = same & ~nz.any(axis=1)
        if bad.any():
            i = int(np.argmax(bad)) + 1
            raise PlanError(f"{_where(i, row, ops, R)}: ops not sorted by (round, kind, src_slot, dst_slot)")
    is_copy = kind == COPY
    bad = is_copy & ((rnd != 0) | (peer != own))
    if bad.any():
        i = int(np.argmax(bad))
        raise PlanError(f"{_where(i, row, ops, R)}: COPY must have round 0 and peer = own rank")
    bad = ~is_copy & (peer == own)
    if bad.any():
        i = int(np.argmax(bad))
        raise PlanError(f"{_where(i, row, ops, R)}: SEND/RECV with itself")
    # Sources hold the expert in old.
    src_rank = np.where(kind == RECV, peer, own)
    held = old[lay, src_rank * S + src]
    bad = held != ex
    if bad.any():
        i = int(np.argmax(bad))
        raise PlanError(f"{_where(i, row, ops, R)}: source slot holds expert {held[i]} in old placement")
    # Written slots get the expert in new, and only changed slots are written.
    w = ~(kind == SEND)
    dst_p = own * S + dst
    bad = w & (new[lay, dst_p] != ex)
    if bad.any():
        i = int(np.argmax(bad))
        raise PlanError(
            f"{_where(i, row, ops, R)}: destination slot holds expert {new[lay[i], dst_p[i]]} "
            "in new placement"
        )
    bad = w & (old[lay, dst_p] == new[lay, dst_p])
    if bad.any():
        i = int(np.argmax(bad))
        raise PlanError(f"{_where(i, row, ops, R)}: writes a slot whose expert does not change")
    applied = _apply(row, ops, old, g)
    if not np.array_equal(applied, new):
        l, x = np.argwhere(applied != new)[0]
        raise PlanError(
            f"plan: ops leave layer {l} slot {x} with expert {applied[l, x]}, new placement has {new[l, x]}"
        )
    # SEND <-> RECV matching: (layer, round, sender, receiver, src, dst, expert).
    s = kind == SEND
    rcv = kind == RECV
    if s.sum() != rcv.sum():
        raise PlanError(f"plan: {int(s.sum())} SENDs but {int(rcv.sum())} RECVs")
    if s.any():
        cs = [lay[s], rnd[s], own[s], peer[s], src[s], dst[s], ex[s]]
        cr = [lay[rcv], rnd[rcv], peer[rcv], own[rcv], src[rcv], dst[rcv], ex[rcv]]
        his = [L, nr, R, R, S, S, E]
        ks = _pack(list(zip(cs, his, strict=True)))
        if ks is not None:
            kr = _pack(list(zip(cr, his, strict=True)))
            assert kr is not None
            os_, or_ = np.argsort(ks, kind="stable"), np.argsort(kr, kind="stable")
            mism = ks[os_] != kr[or_]
        else:
            ms = np.stack(cs, axis=1).astype(np.int64)
            mr = np.stack(cr, axis=1).astype(np.int64)
            os_, or_ = np.lexsort(ms.T[::-1]), np.lexsort(mr.T[::-1])
            mism = (ms[os_] != mr[or_]).any(axis=1)
        if mism.any():
            j = int(np.argmax(mism))
            i = int(np.flatnonzero(s)[os_[j]])
            raise PlanError(f"{_where(i, row, ops, R)}: SEND has no matching RECV on its peer")
        # RECVs write distinct slots (checked by _apply), hence keys are unique and
        # the sorted equality above is a bijection.
    # At most one peer per rank per round: ops are sorted by (round, kind), so
    # the SEND/RECV ops of one (row, round) are contiguous; adjacent peers must agree.
    if n > 1:
        t = ~is_copy
        same = (row[1:] == row[:-1]) & (rnd[1:] == rnd[:-1]) & t[1:] & t[:-1]
        bad = same & (peer[1:] != peer[:-1])
        if bad.any():
            i = int(np.argmax(bad)) + 1
            raise PlanError(
                f"{_where(i, row, ops, R)}: rank exchanges with peers {peer[i - 1]} and {peer[i]} "
                "in one round"
            )
    if dup.any():
        i = int(np.argmax(dup)) + 1
        raise PlanError(f"{_where(i, row, ops, R)}: duplicate op (same round, kind, src_slot, dst_slot)")


def changed_layers(plan: Plan, g: Geometry) -> np.ndarray:
    """Layers that have ops (= layers whose placement changes), ascending [n] int32."""
    per_layer = plan.op_indptr[:: g.num_ranks]
    return np.flatnonzero(np.diff(per_layer) > 0).astype(np.int32)


def staging_need(plan: Plan, g: Geometry) -> np.ndarray:
    """Experts each rank stages per layer: RECV + COPY ops, [L, R] int32.

    Every RECV and COPY lands in a staging buffer until the layer commits, so a
    rank executing one layer at a time needs ``staging_need(plan, g)[:, r].max()``
    expert buffers (``.max()`` over all ranks for a uniform pool).
    """
    n = plan.ops.shape[0]
    row = _rows_of_ops(plan.op_indptr, n)
    w = plan.ops["kind"] != SEND
    cnt = np.bincount(row[w], minlength=g.num_layers * g.num_ranks)
    return cnt.reshape(g.num_layers, g.num_ranks).astype(np.int32)


def rounds_per_layer(plan: Plan, g: Geometry) -> np.ndarray:
    """Number of transfer rounds per layer, [L] int32 (0 for a layer with only COPYs)."""
    row = _rows_of_ops(plan.op_indptr, plan.ops.shape[0])
    t = plan.ops["kind"] != COPY
    out = np.zeros(g.num_layers, dtype=np.int32)
    if t.any():
        np.maximum.at(out, row[t] // g.num_ranks, plan.ops["round"][t] + 1)
    return out


def round_lower_bound(plan: Plan, g: Geometry) -> np.ndarray:
    """Lower bound on rounds per layer: max distinct peers of a rank, [L] int32."""
    R = g.num_ranks
    row = _rows_of_ops(plan.op_indptr, plan.ops.shape[0])
    t = plan.ops["kind"] != COPY
    out = np.zeros(g.num_layers, dtype=np.int32)
    if t.any():
        pairs = np.unique(row[t] * R + plan.ops["peer"][t])
        deg = np.bincount(pairs // R, minlength=g.num_layers * R).reshape(g.num_layers, R)
        out[:] = deg.max(axis=1)
    return out


class PlanStats(NamedTuple):
    """Summary of a plan (counts over all layers)."""

    ops: int
    copies: int  # local device copies
    transfers: int  # remote moves (SEND/RECV pairs)
    cross_node: int  # transfers whose sender is on another node
    layers: int  # changed layers
    rounds_total: int  # Σ_l rounds
    rounds_max: int  # max_l rounds
    rounds_lower_bound_total: int  # Σ_l max distinct peers of a rank
    sends_max: int  # most SENDs by one rank in one layer
    staging_max: int  # most experts staged by one rank in one layer
    bytes_remote: int  # transfers × expert_bytes


def plan_stats(plan: Plan, g: Geometry) -> PlanStats:
    """Counts for logs, metrics and the benchmark; see :class:`PlanStats`."""
    R = g.num_ranks
    ops = plan.ops
    row = _rows_of_ops(plan.op_indptr, ops.shape[0])
    s = ops["kind"] == SEND
    rpn = g.ranks_per_node
    cross = int(((row[s] % R) // rpn != ops["peer"][s] // rpn).sum())
    sends = np.bincount(row[s], minlength=g.num_layers * R)
    rounds = rounds_per_layer(plan, g)
    n_t = int(s.sum())
    return PlanStats(
        ops=int(ops.shape[0]),
        copies=int((ops["kind"] == COPY).sum()),
        transfers=n_t,
        cross_node=cross,
        layers=int(changed_layers(plan, g).shape[0]),
        rounds_total=int(rounds.sum()),
        rounds_max=int(rounds.max(initial=0)),
        rounds_lower_bound_total=int(round_lower_bound(plan, g).sum()),
        sends_max=int(sends.max(initial=0)),
        staging_max=int(staging_need(plan, g).max(initial=0)),
        bytes_remote=n_t * g.expert_bytes,
    )
