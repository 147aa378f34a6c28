"""``moveaware`` (the default policy): from-scratch balance at a small fraction of the moves.

Starting from the placement in force, all layers at once:

0. **Pre-gate**: a layer whose predicted balancedness (mean / max rank load
   under the forecast) could not gain ``min_gain`` even at the lower bound of
   its peak is left alone, with no work.
1. **Replica counts**: from the current counts, move one replica at a time
   from the expert that needs it least (smallest per-replica load after the
   loss) to the one that needs it most (largest per-replica load), but only
   while the receiver's share beats the donor's by ``count_ratio`` and exceeds
   ``count_floor`` x mean rank load: min-max counts with hysteresis, so noise
   does not flip the counts of experts that are close or too small to matter.
2. **Keep** every existing replica that is still wanted, where it is. An
   expert with fewer target replicas loses those on the most loaded ranks.
3. **Fill** the free slots with the missing replicas, heaviest first, each on
   the least loaded rank with a free slot that does not hold the expert yet; a
   rank on a node that already holds the expert (the copy stays inside the
   node) wins unless it is more than ``node_penalty`` x mean load heavier.
4. **Local search**: up to ``rounds`` rounds; each pairs the k-th most loaded
   rank with the k-th least loaded one (``partners`` pairs) and applies, per
   pair, the slot swap that best evens the two, if it lowers the heavier rank
   by more than ``min_step`` x mean. Only ranks above (1 + ``slack``) x mean
   are touched: forecast error is larger than that, so balancing further on
   the forecast buys little held-out balance for many moves.
   (``replica_rounds`` > 0 adds rounds that re-assign one replica from a light
   rank to an expert of the peak rank, changing counts; off by default in
   steady state: costly and rarely useful at DeepSeek-like shapes; a plan in
   which some layer is still on the engine default placement, the first plan,
   uses ``first_replica_rounds``, at no steady-state cost.)
5. **Choice**, per layer: keep (no move), the repair of steps 1-4 (few
   moves) or a from-scratch placement relabelled onto the current ranks
   (many moves). From scratch only where neither other is within the
   tolerance (``max(tolerance, slack_scale x (slack - 0.015))``, wider when
   the forecast is poor) of the best candidate's peak; the repair also
   wherever it lowers the peak in force by more than ``repair_tolerance``
   (not widened: its few moves are worth a fresher forecast).
6. **Gain gate**: a layer whose predicted β gain is below ``min_gain`` keeps
   its placement, so load noise alone moves (almost) nothing.
7. **Scenario search** (layers placed from scratch in this plan, e.g. the
   first plan, given load ``scenarios`` such as the recent windows): slot
   swaps that lower the mean over scenarios of the per-window peak, up to
   ``first_scenario_rounds`` rounds against ``scenario_partners`` light
   ranks. The held-out peak is a per-window peak, and experts that spike
   together should not share a rank, which the forecast alone cannot show;
   these layers move (almost) every slot anyway, so it costs no extra move.

With ``current=None`` every slot is free: min-max counts, LPT fill, swap and
replica local search to convergence, then, where that stays > 0.5% above the
lower bound, best-fit decreasing with splitting under a bisected peak target
(packing granularity: the issue's 8-expert case reaches its optimum 196.67).

Each step is vectorised over layers; the Python loops run over items
(step 3) or rounds (steps 1, 4). Only stable sorts and first-index argmin /
argmax are used: identical inputs give bit-identical outputs.
"""

from __future__ import annotations

import numpy as np

from eplbd.geometry import Geometry
from eplbd.placement import peak_lower_bound
from eplbd.policy._common import (
    adjust_counts,
    align_to,
    bfd_place,
    local_search,
    rank_loads_of,
    repair_duplicates,
    replica_search,
    replicate,
    scenario_search,
    slot_shares,
    stable_argsort,
    take_rows,
)

__all__ = ["moveaware", "DEFAULTS"]

#: Default options; ``rebalance(..., policy="moveaware", **options)`` overrides them.
DEFAULTS: dict[str, float | int] = {
    "min_gain": 0.0,  # per-layer β gain below which a layer keeps its placement (0: off)
    "tolerance": 0.04,  # keep / only repair while the peak is within this of the best candidate
    "rounds": 8,  # local-search rounds with a current placement
    "scratch_rounds": 256,  # local-search rounds from scratch (moves are free then)
    "partners": 16,  # rank pairs (heaviest with lightest) balanced per local-search round
    "min_step": 0.002,  # a swap must lower the peak by this x mean rank load
    "node_penalty": 0.02,  # x mean rank load: how much heavier a same-node target may be
    "replica_rounds": 0,  # rounds of replica re-assignment per local-search pass (0: off)
    "slack": 0.06,  # ranks within (1 + slack) x mean rank load are not touched by local search
    "count_ratio": 1.25,  # a replica moves to a hotter expert only if its share beats the donor's x this
    "count_floor": 0.1,  # ... and exceeds this x mean rank load
    "repair_tolerance": 0.04,  # repair (few moves) where it lowers the peak by more than this (no slack)
    "slack_scale": 2.0,  # tolerance is at least slack_scale x (slack - 0.015): forecast error bounds the gain
    "first_replica_rounds": 4,  # replica_rounds for a plan with a layer on the engine default placement
    "first_scenario_rounds": 32,  # scenario-search rounds for layers placed from scratch (0: off)
    "scenario_partners": 16,  # light ranks the hottest rank may swap with, per scenario round
    "scenario_work": 5e6,  # at most this many swap evaluations (layers x scenarios x swaps) per plan
}


def _fill(
    new: np.ndarray,
    w: np.ndarray,
    counts: np.ndarray,
    deficit: np.ndarray,
    g: Geometry,
    src: np.ndarray | None = None,
    node_penalty: float = 0.0,
    dropped: tuple[np.ndarray, np.ndarray] | None = None,
    marks: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Place ``deficit`` [L, E] new replicas into the free (-1) slots of ``new`` [L, P] int64, in place.

    ``src`` [L, P] int64 (or None: no preference): the placement the weights
    come from; a rank on a node that holds no replica of the expert in ``src``
    scores ``node_penalty`` x mean rank load heavier. ``dropped`` (optional,
    with ``src``): (layers, slots) of the free slots of ``new``, which equals
    ``src`` elsewhere, and ``marks`` (optional, with ``src``): (layers, slots)
    of every slot of ``src`` whose expert has a deficit (both save passes over
    all slots). Returns the replicas that had to go on a rank already holding
    their expert, [n, 3] (layer, rank, expert) sorted, the duplicates
    :func:`repair_duplicates` must fix (none: ``new`` has no duplicate that it
    did not have before).
    """
    L, E = w.shape
    R, S, N = g.num_ranks, g.slots_per_rank, g.num_nodes
    P = R * S
    share = w / np.maximum(counts, 1)
    nitems = deficit.sum(axis=1)
    fmax = int(nitems.max(initial=0))
    stuck_at: list[np.ndarray] = []
    if fmax == 0:
        return np.zeros((0, 3), dtype=np.int64)
    # Items of every layer, heaviest share first (ties: lower expert id), padded
    # with -1. The items of one (layer, expert) are adjacent (equal keys).
    idx = np.repeat(np.arange(L * E), deficit.ravel())
    lay, ex = np.divmod(idx, E)
    order = np.lexsort((ex, -share.ravel()[idx], lay))
    idx, lay, ex = idx[order], lay[order], ex[order]
    start = np.cumsum(nitems) - nitems
    col = np.arange(lay.size) - start[lay]
    at = lay * fmax + col  # flat item index
    items = np.full(L * fmax, -1, dtype=np.int64)
    items[at] = ex
    item_sh = np.zeros(L * fmax)
    item_sh[at] = share.ravel()[idx]
    first = np.zeros(L * E, dtype=np.int64)  # column of the first item of (layer, expert)
    head = np.ones(idx.size, dtype=bool)
    head[1:] = idx[1:] != idx[:-1]
    first[idx[head]] = col[head]

    # Free slots, their count per rank, and rank loads of the slots kept.
    if dropped is not None and src is not None:
        fl, fp = dropped
        free = np.zeros(L * P, dtype=bool)
        free[fl * P + fp] = True
        nfree = np.bincount(fl * R + fp // S, minlength=L * R)
        slot_sh = take_rows(share, src)
        slot_sh[fl, fp] = 0.0
    else:
        free = (new < 0).reshape(-1)
        nfree = free.reshape(L * R, S).sum(axis=1)
        slot_sh = take_rows(share, np.where(new < 0, 0, new))  # free slots read as expert 0 ...
        slot_sh.reshape(-1)[free] = 0.0  # ... with zero share
    rl = slot_sh.reshape(L, R, S).sum(axis=2)
    # held[l * fmax + j, r]: rank r holds the expert of item j; on_node likewise
    # for the nodes of ``src`` (only the items' experts are ever asked about).
    held = np.zeros((L * fmax, R), dtype=bool)
    item_pen = None
    ref = src if src is not None else np.where(new < 0, 0, new)
    if marks is not None and src is not None:
        ml, mp = marks
    else:
        n_ref = take_rows(deficit, ref)
        if src is None:
            n_ref[new < 0] = 0
        ml, mp = np.nonzero(n_ref)
    if ml.size:
        x = ref[ml, mp]
        nn = deficit[ml, x]
        jj = np.repeat(first[ml * E + x], nn) + np.arange(int(nn.sum())) - np.repeat(np.cumsum(nn) - nn, nn)
        rowj = np.repeat(ml, nn) * fmax + jj
        slot = np.repeat(mp, nn)
        still = np.repeat(new[ml, mp] == x, nn)  # still in ``new`` (src: not dropped)
        held[rowj[still], slot[still] // S] = True
    if src is not None:
        on_node = np.zeros((L * fmax, N), dtype=bool)
        if ml.size:
            on_node[rowj, slot // (P // N)] = True
        pen = np.repeat(node_penalty * w.sum(axis=1) / R, fmax)  # [L * fmax]
        item_pen = (~on_node)[:, np.arange(R) // (R // N)] * pen[:, None]  # [L * fmax, R]
    rlf, flat = rl.reshape(-1), new.reshape(-1)
    for j in range(fmax):
        rows = np.nonzero(nitems > j)[0]
        rj = rows * fmax + j
        e = items[rj]
        score = rl[rows]
        if item_pen is not None:
            score += item_pen[rj]
        closed = nfree.reshape(L, R)[rows] == 0
        hj = held[rj]
        blocked = closed | hj
        r = np.argmin(np.where(blocked, np.inf, score), axis=1)
        stuck = blocked.all(axis=1)
        if stuck.any():  # every open rank holds e: take one, repair_duplicates fixes it
            r = np.where(stuck, np.argmin(np.where(closed, np.inf, score), axis=1), r)
            stuck_at.append(np.stack([rows[stuck], r[stuck], e[stuck]], axis=1))
        fr = rows * R + r
        fs = fr * S + np.argmax(free.reshape(L * R, S)[fr], axis=1)  # first free slot of that rank
        flat[fs] = e
        free[fs] = False
        nfree[fr] -= 1
        rlf[fr] += item_sh[rj]
        if j + 1 < fmax:  # the next item of the same expert sees this replica too
            hj[np.arange(rows.size), r] = True
            nxt = items[rj + 1] == e
            held[rj[nxt] + 1] = hj[nxt]
    if not stuck_at:
        return np.zeros((0, 3), dtype=np.int64)
    dups = np.concatenate(stuck_at).astype(np.int64)
    return dups[np.lexsort((dups[:, 2], dups[:, 1], dups[:, 0]))]


def _improve(
    pl: np.ndarray,
    w: np.ndarray,
    E: int,
    S: int,
    rounds: int,
    partners: int,
    step: np.ndarray,
    replica_rounds: int,
    outer: int = 4,
    above: float | np.ndarray = -np.inf,
    counts: np.ndarray | None = None,
) -> bool:
    """Alternate swap search and replica re-assignment until neither helps (at most ``outer`` times).

    ``counts`` [L, E] (optional): the replica counts of ``pl``. Returns whether
    they may have changed (some replica was re-assigned).
    """
    for _ in range(outer):
        local_search(pl, w, E, S, rounds, max(partners, 1), step, above=above, counts=counts)
        if replica_rounds <= 0 or replica_search(pl, w, E, S, replica_rounds, min(partners, 4), step) == 0:
            break
        counts = None
    return counts is None


def _granular(new: np.ndarray, w: np.ndarray, g: Geometry, rounds: int, bisect: int = 14) -> None:
    """From scratch: where LPT + local search stays > 0.5% above the lower bound, try best-fit
    decreasing with splitting (:func:`bfd_place`) under a bisected peak target; keep it if better.

    Needed when few slots per rank make packing granularity dominate (the issue's
    8 experts on 8 ranks x 2 slots: LPT 232, optimum 196.67).
    """
    E, S, R = g.num_experts, g.slots_per_rank, g.num_ranks
    lb = peak_lower_bound(w, g)
    pk = rank_loads_of(w, new, E, S).max(axis=1)
    rows = np.nonzero(pk > lb * 1.005)[0]
    if rows.size == 0:
        return
    lo, hi = lb[rows].copy(), pk[rows].copy()
    best = new[rows].copy()
    best_pk = pk[rows].copy()
    wr = w[rows]
    for _ in range(bisect):
        mid = 0.5 * (lo + hi)
        ok, cand = bfd_place(wr, mid, S, R, g.max_replicas)
        cpk = rank_loads_of(wr, cand, E, S).max(axis=1)
        better = ok & (cpk < best_pk)
        best[better] = cand[better]
        best_pk = np.where(better, cpk, best_pk)
        hi = np.where(ok, np.minimum(mid, cpk), hi)
        lo = np.where(ok, lo, mid)
    _improve(best, wr, E, S, rounds, R, 1e-9 * wr.sum(axis=1) / R, max(rounds // 4, 1))
    new[rows] = best


def _scratch(w: np.ndarray, counts: np.ndarray, g: Geometry, rounds: int) -> np.ndarray:
    """From-scratch placement [B, P] int32 for loads [B, E] with replica ``counts`` [B, E].

    LPT fill (heaviest replica onto the least loaded rank), duplicate repair,
    then swap local search over all rank pairs until no swap helps (at most
    ``rounds`` rounds per pass). Deterministic.
    """
    B, E = w.shape
    R, S = g.num_ranks, g.slots_per_rank
    alt = np.full((B, R * S), -1, dtype=np.int64)
    dups = _fill(alt, w, counts, counts, g, None, 0.0)
    alt = alt.astype(np.int32)
    if dups.size:
        repair_duplicates(alt, w, E, S, dups)
    _improve(alt, w, E, S, rounds, R, 1e-9 * w.sum(axis=1) / R, 0, outer=1)
    return alt


def moveaware(
    loads: np.ndarray,
    current: np.ndarray | None,
    g: Geometry,
    *,
    min_gain: float = float(DEFAULTS["min_gain"]),
    tolerance: float = float(DEFAULTS["tolerance"]),
    rounds: int = int(DEFAULTS["rounds"]),
    scratch_rounds: int = int(DEFAULTS["scratch_rounds"]),
    partners: int = int(DEFAULTS["partners"]),
    min_step: float = float(DEFAULTS["min_step"]),
    node_penalty: float = float(DEFAULTS["node_penalty"]),
    replica_rounds: int = int(DEFAULTS["replica_rounds"]),
    slack: float = float(DEFAULTS["slack"]),
    count_ratio: float = float(DEFAULTS["count_ratio"]),
    count_floor: float = float(DEFAULTS["count_floor"]),
    slack_scale: float = float(DEFAULTS["slack_scale"]),
    repair_tolerance: float = float(DEFAULTS["repair_tolerance"]),
    first_replica_rounds: int = int(DEFAULTS["first_replica_rounds"]),
    first_scenario_rounds: int = int(DEFAULTS["first_scenario_rounds"]),
    scenario_partners: int = int(DEFAULTS["scenario_partners"]),
    scenario_work: float = float(DEFAULTS["scenario_work"]),
    scenarios: np.ndarray | None = None,
) -> np.ndarray:
    """New placement [L, P] int32 for forecast loads [L, E] (float64) given ``current`` [L, P] or None.

    Inputs are validated by :func:`eplbd.policy.rebalance`; the number of layers
    is taken from ``loads`` so a per-layer loop can call this one layer at a time.
    ``scenarios`` [L, K, E] (optional; :func:`eplbd.policy.pipeline.scenarios`
    makes them from the recent windows): load scenarios for the scenario search
    of the layers placed from scratch (step 7); None or K < 2: no search.
    """
    w = np.asarray(loads, dtype=np.float64)
    L, E = w.shape
    R, S = g.num_ranks, g.slots_per_rank
    P = R * S
    mean = w.sum(axis=1) / R  # [L] mean rank load
    srt = stable_argsort(-w)  # [L, E] heaviest first (shared by replicate and adjust_counts)
    counts = replicate(w, P, cap=min(R, P - E + 1), order=srt)
    if current is None:
        new = np.full((L, P), -1, dtype=np.int64)
        dups = _fill(new, w, counts, counts, g, None, 0.0)
        if dups.size:
            repair_duplicates(new, w, E, S, dups)
        new = new.astype(np.int32)
        _improve(new, w, E, S, scratch_rounds, R, 1e-9 * mean, max(scratch_rounds // 4, 1))
        _granular(new, w, g, scratch_rounds)
        every, rr = np.ones(L, dtype=bool), first_scenario_rounds
        _scenario_step(new, scenarios, mean, every, S, rr, scenario_partners, scenario_work)
        return new

    cur = np.asarray(current, dtype=np.int32)
    # A layer still on the engine default placement (slot p holds p mod E, an
    # arbitrary start) must move a lot anyway: it gets the best candidate
    # (tolerance 0), normally the relabelled from-scratch one.
    fresh = (cur == (np.arange(P, dtype=np.int32) % E)[None, :]).all(axis=1)
    # Balancing much tighter than the forecast error (``slack``) buys little held-out balance.
    thr = np.where(fresh, 1.0, 1.0 + max(tolerance, slack_scale * (slack - 0.015), 0.0))
    # The repair candidate moves few slots, so it need not wait for the
    # slack-widened threshold that guards the costly from-scratch candidate:
    # it is taken where it lowers the peak by more than `repair_tolerance`.
    thr_r = np.minimum(thr, np.where(fresh, 1.0, 1.0 + max(repair_tolerance, 0.0)))
    # Pre-gate: a layer already within `tolerance` of the lower bound of its
    # peak (so of any candidate), or that could not gain min_gain even at that
    # bound, is left alone without any work.
    sh_cur, c_cur = slot_shares(w, cur, E)  # [L, P], [L, E]: current shares and replica counts
    pk_cur = sh_cur.reshape(L, R, S).sum(axis=2).max(axis=1)
    lb = np.maximum(mean, (w / counts).max(axis=1))
    gain_max = mean / _safe(lb) - mean / _safe(pk_cur)
    rows = np.nonzero((pk_cur > lb * thr_r) & (gain_max >= max(min_gain, 1e-12)))[0]
    out = cur.copy()
    if rows.size == 0:
        return out  # nothing moves, so no layer is placed from scratch either (step 7)
    sub: slice | np.ndarray
    if rows.size == L:  # every layer (the usual steady state): no copies
        wr, mr, lbr, curr, sub = w, mean, lb, cur, slice(None)
    else:
        wr, mr, lbr, curr, sub = w[rows], mean[rows], lb[rows], cur[rows], rows
        thr, thr_r = thr[rows], thr_r[rows]
    # Candidate (b), incremental repair: min-max counts reached from the current
    # ones only by transfers that clearly pay off (hysteresis against noise),
    # keep what is wanted, fill deficits, local search above the target peak.
    c0 = c_cur[sub]
    tgt = adjust_counts(wr, c0, g.max_replicas, count_ratio, count_floor * mr, P, order=srt[sub])
    inc = _incremental(wr, curr, c0, tgt, g, partners, node_penalty)
    above = np.maximum((1 + slack) * mr, lbr * thr_r)
    # Layers still on the engine default placement (the first plan) move a lot
    # anyway: there replica re-assignment also runs (no cost in steady state).
    rr = max(replica_rounds, first_replica_rounds) if fresh[rows].any() else replica_rounds
    # inc holds the target counts (fill and swaps keep them; replica rounds may not).
    if _improve(inc, wr, E, S, rounds, partners, min_step * mr, rr, above=above, counts=tgt):
        pk_inc = rank_loads_of(wr, inc, E, S).max(axis=1)
    else:
        pk_inc = take_rows(wr / tgt, inc.astype(np.int64)).reshape(-1, R, S).sum(axis=2).max(axis=1)
    # Candidate (c), a from-scratch placement relabelled onto the current ranks
    # (a rank permutation keeps its rank loads exactly, so what can stay, stays);
    # only where (b) is not already within `tolerance` of the bound.
    best = np.minimum(pk_cur[rows], pk_inc)
    pk_c = np.full(rows.size, np.inf)
    alt = inc
    need = np.nonzero(pk_inc > lbr * thr)[0]
    if need.size:
        sc = _scratch(wr[need], counts[rows][need], g, scratch_rounds)
        alt = inc.copy()
        alt[need] = align_to(sc, curr[need], S)
        pk_c[need] = rank_loads_of(wr[need], alt[need], E, S).max(axis=1)
        best = np.minimum(best, pk_c)
    # Per layer the candidate with the fewest moves (keep < repair < scratch)
    # whose peak is within `tolerance` of the best candidate's; the repair also
    # wherever it beats the placement in force by more than `repair_tolerance`.
    lim = best * thr
    use_c = (pk_cur[rows] > lim) & (pk_inc > lim)
    use_inc = ~use_c & ((pk_cur[rows] > lim) | (pk_inc * thr_r < pk_cur[rows]))
    out[rows[use_inc]] = inc[use_inc]
    out[rows[use_c]] = alt[use_c]
    # Gain gate against the placement in force.
    if min_gain > 0:
        pk_new = rank_loads_of(wr, out[rows], E, S).max(axis=1)
        gain = mr / _safe(pk_new) - mr / _safe(pk_cur[rows])
        back = gain < min_gain
        out[rows[back]] = curr[back]
    done = fresh & (out != cur).any(axis=1)  # layers placed from scratch in this plan
    _scenario_step(out, scenarios, mean, done, S, first_scenario_rounds, scenario_partners, scenario_work)
    return out


def _scenario_step(
    out: np.ndarray, scenarios: np.ndarray | None, mean: np.ndarray, rows: np.ndarray, S: int, rounds: int,
    partners: int, work: float,
) -> None:  # fmt: skip
    """Step 7, :func:`scenario_search` on the layers ``rows`` [L] bool of ``out`` [L, P], in place.

    Only for layers placed from scratch in this plan, which move (almost)
    every slot anyway: there a better packing for the observed per-window
    loads costs no extra move. Any gain is taken (the objective is already an
    average over the scenarios). Rounds are capped so that at most ``work``
    swaps x scenarios x layers are evaluated (DeepSeek-V3 shape, 10 windows:
    6 rounds, ~70 ms once; the real traces' shapes: all ``rounds``).
    """
    if scenarios is None or rounds <= 0 or not rows.any():
        return
    x = np.asarray(scenarios, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] != out.shape[0] or x.shape[1] < 2:
        return
    idx = np.nonzero(rows)[0]
    K, R = x.shape[1], out.shape[1] // S
    per_round = idx.size * K * max(1, min(partners, R - 1)) * S * S
    rounds = min(rounds, max(1, int(work // per_round)))
    sub = out[idx]
    scenario_search(sub, x[idx], x.shape[2], S, rounds, partners, 1e-9 * K * mean[idx])
    out[idx] = sub


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 1.0)


def _incremental(
    w: np.ndarray,
    cur: np.ndarray,
    c0: np.ndarray,
    counts: np.ndarray,
    g: Geometry,
    partners: int,
    node_penalty: float,
) -> np.ndarray:
    """Steps 2-3 on a batch of layers: keep wanted replicas, drop surplus, fill deficits.

    ``c0`` [L, E]: the replica counts of ``cur`` [L, P]; ``counts`` [L, E]: the target ones.
    """
    L, E = w.shape
    R, S = g.num_ranks, g.slots_per_rank
    # Drop surplus replicas from the most loaded ranks (loads with the new
    # shares; ties: lower rank). Only the slots of experts with a surplus.
    cur64 = cur.astype(np.int64)
    surplus = np.maximum(c0 - counts, 0)
    new = cur64.copy()
    # Slots whose expert loses replicas (li, pi) or gains some (marks for the fill).
    change = take_rows(counts - c0, cur64)
    li, pi = np.nonzero(change < 0)
    ml, mp = np.nonzero(change > 0)
    if li.size:
        x, r = cur64[li, pi], pi // S
        # Loads of just those slots' ranks (the same sums as over all ranks).
        on_r = new.reshape(L * R, S)[li * R + r]  # [n, S]
        rl = (w / counts)[li[:, None], on_r].sum(axis=1)
        o = np.lexsort((r, -rl, x, li))
        li, pi, grp = li[o], pi[o], (li * E + x)[o]
        at = np.arange(grp.size)
        head = np.ones(grp.size, dtype=bool)
        head[1:] = grp[1:] != grp[:-1]
        k = at - np.maximum.accumulate(np.where(head, at, 0))  # position within (layer, expert)
        drop = k < surplus.ravel()[grp]
        li, pi = li[drop], pi[drop]
        new[li, pi] = -1
    # Fill the deficits, preferring nodes that hold a source copy.
    dups = _fill(new, w, counts, np.maximum(counts - c0, 0), g, cur64, node_penalty, (li, pi), (ml, mp))
    new = new.astype(np.int32)
    if dups.size:
        repair_duplicates(new, w, E, S, dups)
    return new
