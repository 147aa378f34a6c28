"""Building blocks shared by the placement policies, vectorised over a leading batch axis.

Every function here works on a batch of B independent rows (B = layers, or
layers x nodes) at once: the Python loops run over items or rounds, never over
layers, so the cost of a plan barely grows with the number of layers.

Determinism: only stable sorts and first-index argmin/argmax are used, there is
no randomness and no dict/set iteration, so identical inputs give bit-identical
outputs (daemons on different nodes must compute the same plan).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "take_rows",
    "stable_argsort",
    "replicate",
    "lpt_pack",
    "slot_shares",
    "rank_loads_of",
    "holds_table",
    "node_holds",
    "repair_duplicates",
    "local_search",
    "replica_search",
    "bfd_place",
    "adjust_counts",
    "align_to",
]


def take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, idx, axis=1)`` for 2-D ``a`` [B, n] and ``idx`` [B, k], ~3x faster.

    One flat ``np.take`` instead of numpy's broadcast fancy indexing (this is
    called a few dozen times per plan on [58, 288] arrays).
    """
    B, n = a.shape
    off = np.arange(0, B * n, n, dtype=np.int64)[:, None]
    return np.take(a.reshape(-1), idx + off)


def stable_argsort(x: np.ndarray) -> np.ndarray:
    """``np.argsort(x, axis=-1, kind="stable")`` for a 2-D array, several times faster.

    numpy's stable sort of floats (or of ints wider than 16 bits) is a
    timsort/mergesort, ~10x slower than its quicksort on rows of a few hundred.
    Here a quicksort groups equal values, then the ties are put in index order
    by a radix sort (numpy's stable sort of 16-bit keys) on ``group * n +
    index``, which needs n * n <= 65536: rows of up to 256. The result is
    exactly the stable order; longer rows fall back to the stable sort.
    """
    B, n = x.shape
    if n > 256 or n < 2:
        return np.argsort(x, axis=1, kind="stable")
    order = np.argsort(x, axis=1)
    v = take_rows(x, order)
    grp = np.empty((B, n), dtype=np.uint16)
    grp[:, 0] = 0
    np.cumsum(v[:, 1:] != v[:, :-1], axis=1, out=grp[:, 1:])
    key = grp * np.uint16(n) + order.astype(np.uint16)
    return take_rows(order, np.argsort(key, axis=1, kind="stable"))


def replicate(w: np.ndarray, num_slots: int, cap: int, order: np.ndarray | None = None) -> np.ndarray:
    """Replica counts [B, m] int64 that minimise the largest per-replica load.

    w: [B, m] loads; every expert gets one replica, then each of the
    ``num_slots - m`` extra slots goes to the expert with the largest
    per-replica load ``w / count`` (ties: lowest index), never above ``cap``
    replicas. This greedy is optimal for min max_e w_e / c_e. ``order``
    (optional) [B, m]: ``stable_argsort(-w)``, if the caller has it already.
    """
    B, m = w.shape
    extra = num_slots - m
    if extra < 0 or extra > m * (cap - 1):
        raise ValueError(f"cannot fit {m} experts into {num_slots} slots with at most {cap} replicas each")
    counts = np.ones((B, m), dtype=np.int64)
    if extra == 0:
        return counts
    # Only experts whose load exceeds the final largest share get extra replicas,
    # each at least one, so usually they are among the ``extra`` heaviest: work
    # on those columns, then check that every increment taken beat the heaviest
    # expert left out (strictly, so ties resolve as the full greedy would).
    srt = stable_argsort(-w) if order is None else order
    n = min(m, extra)
    top = srt[:, :n]
    ct, low, ok = _top_increments(take_rows(w, top), extra, cap)
    if n < m:
        ok &= low > take_rows(w, srt[:, n : n + 1])[:, 0]
    np.put_along_axis(counts, top, np.where(ok[:, None], ct, 1), axis=1)
    rows = np.nonzero(~ok)[0]  # ties at the cut: the greedy step by step, on those rows only
    if rows.size:
        counts[rows] = _replicate_steps(w[rows], extra, cap, srt[rows])
    return counts


def _replicate_steps(w: np.ndarray, extra: int, cap: int, srt: np.ndarray) -> np.ndarray:
    """:func:`replicate` by the step-by-step greedy: on the ``extra`` heaviest columns
    (``srt``: the stable descending order) if that provably gives the same counts, else on all."""
    B, m = w.shape
    if extra < m:
        top = np.sort(srt[:, :extra], axis=1)
        ct, low = _increments_loop(take_rows(w, top), extra, cap)
        if (low > take_rows(w, srt[:, extra : extra + 1])[:, 0]).all():
            counts = np.ones((B, m), dtype=np.int64)
            np.put_along_axis(counts, top, ct, axis=1)
            return counts
    return _increments_loop(w, extra, cap)[0]


def _top_increments(ws: np.ndarray, extra: int, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The greedy of :func:`replicate` at once, on loads ``ws`` [B, n] sorted heaviest first.

    The greedy (``extra`` times: one more replica for the expert with the
    largest ``w / count``) takes the ``extra`` largest of the candidate shares
    ``w_i / j`` (j = 1 .. cap - 1; each expert's decrease in j): a merge of
    sorted lists. Candidate (i, j) of the i-th heaviest expert with
    ``(i + 1) (j - 1) >= extra`` is strictly below that many others
    (``w_i' / j'`` with i' <= i, j' < j), so only j <= ceil(extra / (i + 1))
    can be taken: ~extra x ln(extra) candidates, whose ``extra``-th largest
    ``t`` is found by one sort. Any order of equal loads in ``ws`` will do.
    Returns (counts [B, n] int64 in the order of ``ws``, t [B]: the smallest
    share incremented, ok [B]): rows not ok would need the greedy's tie order
    (candidates equal to ``t`` straddle the cut, or ``t`` = 0) and must be
    redone step by step (:func:`_increments_loop`). Same divisions as it, so
    the same counts bit for bit where ok.
    """
    B, n = ws.shape
    J = np.minimum(cap - 1, -(-extra // np.arange(1, n + 1)))  # candidates per expert
    tot = int(J.sum())
    if cap < 2 or tot < extra:
        return np.ones((B, n), dtype=np.int64), np.zeros(B), np.zeros(B, dtype=bool)
    starts = np.cumsum(J) - J
    ii = np.repeat(np.arange(n), J)
    jj = (np.arange(tot) - starts[ii] + 1).astype(np.float64)
    vals = ws[:, ii] / jj  # [B, tot]
    t = np.sort(vals, axis=1)[:, tot - extra]
    ge = vals >= t[:, None]
    ok = (t > 0) & (ge.sum(axis=1) == extra)
    ct = 1 + np.add.reduceat(ge, starts, axis=1, dtype=np.int64)
    return ct, t, ok


def _increments_loop(w: np.ndarray, extra: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts after ``extra`` largest-share increments, one at a time; the smallest share incremented [B]."""
    B = w.shape[0]
    ct = np.ones(w.shape, dtype=np.int64)
    ar = np.arange(B)
    low = np.full(B, np.inf)
    # -1 marks capped experts; zero-load experts still compete with score 0.
    for _ in range(extra):
        score = np.where(ct < cap, w / ct, -1.0)
        idx = np.argmax(score, axis=1)
        low = np.minimum(low, score[ar, idx])
        ct[ar, idx] += 1
    return ct, low


def lpt_pack(
    item_w: np.ndarray, item_e: np.ndarray, num_bins: int, cap: int, num_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Longest-processing-time packing with a per-bin item cap and no duplicate expert per bin.

    item_w, item_e: [B, n] weights and expert ids (n = num_bins * cap).
    Items are taken heaviest first (stable: ties keep input order); each goes to
    the least loaded bin that still has room and does not hold that expert
    (ties: lowest bin). Returns (bin [B, n], pos [B, n]): the bin of each item
    and its position within the bin, both int64. If every open bin already holds
    the expert the item goes to an open bin anyway and the caller must run
    :func:`repair_duplicates`.

    The replicas of one expert must be adjacent in ``item_e`` with equal
    weights (as :func:`eplbd.policy.greedy` builds them): the stable sort then
    keeps them adjacent, so "this bin holds the expert" is just "this bin took
    the previous item of the same expert", and no [B, bins, E] table is needed.
    """
    B, n = item_w.shape
    if n != num_bins * cap:
        raise ValueError(f"lpt_pack: {n} items != {num_bins} bins x {cap}")
    order = stable_argsort(-item_w)
    w_sorted = take_rows(item_w, order)
    e_sorted = take_rows(item_e, order)
    off = np.arange(B, dtype=np.int64) * num_bins
    score = np.zeros(B * num_bins)  # bin load; +inf once the bin is full
    fill = np.zeros(B * num_bins, dtype=np.int64)
    last = np.full((B, num_bins), -1, dtype=np.int64)  # expert of the last item each bin took
    # A bin holding the current expert scores above every open bin (but below
    # full ones): picked only when no other open bin is left (repaired later).
    big = 4.0 * float(np.abs(item_w).sum(axis=1).max(initial=0.0)) + 1.0
    bin_pos = np.empty((B, n), dtype=np.int64)  # bin of the j-th heaviest item
    pos_sorted = np.empty((B, n), dtype=np.int64)
    sc2 = score.reshape(B, num_bins)
    for j in range(n):
        e = e_sorted[:, j]
        b = np.argmin(sc2 + (last == e[:, None]) * big, axis=1)
        fb = off + b
        bin_pos[:, j] = b
        pos_sorted[:, j] = fill[fb]
        fill[fb] += 1
        score[fb] = np.where(fill[fb] >= cap, np.inf, score[fb] + w_sorted[:, j])
        last.ravel()[fb] = e
    bin_of = np.empty((B, n), dtype=np.int64)
    pos_of = np.empty((B, n), dtype=np.int64)
    np.put_along_axis(bin_of, order, bin_pos, axis=1)
    np.put_along_axis(pos_of, order, pos_sorted, axis=1)
    return bin_of, pos_of


def slot_shares(w: np.ndarray, phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(share [B, P] float64, counts [B, E] int64): each slot's even share of its expert's load."""
    B, P = phy2log.shape
    flat = (phy2log.astype(np.int64) + (np.arange(B, dtype=np.int64) * num_experts)[:, None]).ravel()
    counts = np.bincount(flat, minlength=B * num_experts).reshape(B, num_experts)
    per = w / np.maximum(counts, 1)
    return take_rows(per, phy2log.astype(np.int64)), counts


def rank_loads_of(w: np.ndarray, phy2log: np.ndarray, num_experts: int, slots_per_rank: int) -> np.ndarray:
    """[B, R] load of each rank under an even split of each expert over its replicas."""
    share, _ = slot_shares(w, phy2log, num_experts)
    B, P = phy2log.shape
    return share.reshape(B, P // slots_per_rank, slots_per_rank).sum(axis=2)


def node_holds(phy2log: np.ndarray, num_experts: int, slots_per_rank: int, num_nodes: int) -> np.ndarray:
    """[B, N, E] bool: whether node n holds a replica of expert e."""
    B, P = phy2log.shape
    per_node = P // num_nodes
    key = (
        np.arange(B, dtype=np.int64)[:, None] * (num_nodes * num_experts)
        + (np.arange(P, dtype=np.int64) // per_node)[None, :] * num_experts
        + phy2log.astype(np.int64)
    )
    counts = np.bincount(key.ravel(), minlength=B * num_nodes * num_experts)
    return counts.reshape(B, num_nodes, num_experts) > 0


def holds_table(phy2log: np.ndarray, num_experts: int, slots_per_rank: int) -> np.ndarray:
    """[B, R, E] int32: how many replicas of expert e rank r holds (>1 is a duplicate)."""
    B, P = phy2log.shape
    R = P // slots_per_rank
    key = (
        np.arange(B, dtype=np.int64)[:, None] * (R * num_experts)
        + (np.arange(P, dtype=np.int64) // slots_per_rank)[None, :] * num_experts
        + phy2log.astype(np.int64)
    )
    return np.bincount(key.ravel(), minlength=B * R * num_experts).reshape(B, R, num_experts).astype(np.int32)


def repair_duplicates(
    phy2log: np.ndarray, w: np.ndarray, num_experts: int, slots_per_rank: int, dups: np.ndarray | None = None
) -> None:
    """Fix, in place, every rank that holds two replicas of one expert.

    A duplicate of e on rank r is swapped with a slot of another rank r' that
    lacks e, holding an expert f that r lacks; such a pair always exists (e has
    fewer distinct holders than replicas <= R, and r holds < S distinct
    experts). Among candidates the swap that keeps max(load r, load r') lowest
    wins (ties: lowest slot), so the fix costs as little balance as possible.
    Duplicates are rare (only from packing dead-ends); the loop runs over the
    most duplicates any one row has, all rows at once. ``dups`` (optional)
    [n, 3] int: every duplicate as (row, rank, expert), one entry per replica
    beyond the first, sorted (what the scan here would list), if the caller
    knows them.
    """
    S = slots_per_rank
    B, P = phy2log.shape
    R = P // S
    if dups is None:
        srt = np.sort(phy2log.reshape(B, R, S), axis=2)
        dup = np.argwhere(srt[:, :, 1:] == srt[:, :, :-1])
        if dup.size == 0:
            return
        dup[:, 2] = srt[dup[:, 0], dup[:, 1], dup[:, 2]]
    else:
        dup = np.asarray(dups, dtype=np.int64).reshape(-1, 3)
        if dup.size == 0:
            return
    # A swap never creates a duplicate (rank(q) lacks e, r lacks row[q]) but may
    # remove one (row[q] duplicated on rank(q)), so the duplicates left are a
    # subset of this first list: fixing its entries in order, skipping those gone,
    # is exactly "fix the first duplicate, re-sort, repeat" at one sort per call.
    # Rows are independent, so wave k fixes the k-th listed duplicate of every
    # row at once (a row's entries in list order, as one at a time would).
    rq = np.arange(P) // S
    first = np.ones(len(dup), dtype=bool)
    first[1:] = dup[1:, 0] != dup[:-1, 0]
    at = np.arange(len(dup))
    wave = at - np.maximum.accumulate(np.where(first, at, 0))  # argwhere lists rows in order
    for k in range(int(wave.max()) + 1):
        b, r, e = dup[wave == k].T
        slots_r = r[:, None] * S + np.arange(S)  # [n, S]
        held = np.take_along_axis(phy2log[b], slots_r, axis=1)
        here = held == e[:, None]
        live = here.sum(axis=1) >= 2
        if not live.any():
            continue
        b, r, e, slots_r, held, here = b[live], r[live], e[live], slots_r[live], held[live], here[live]
        n = b.size
        ar = np.arange(n)
        rows = phy2log[b]  # [n, P] copies
        share, _ = slot_shares(w[b], rows, num_experts)
        rl = share.reshape(n, R, S).sum(axis=2)
        p = slots_r[ar, S - 1 - np.argmax(here[:, ::-1], axis=1)]  # the last replica of e on r
        # Candidate slots q on other ranks: their rank lacks e, and r lacks their expert.
        rank_has_e = (rows.reshape(n, R, S) == e[:, None, None]).any(axis=2)  # [n, R]
        r_has = (rows[:, :, None] == held[:, None, :]).any(axis=2)  # [n, P]: rank r holds row[q]
        ok = (rq[None, :] != r[:, None]) & ~rank_has_e[:, rq] & ~r_has
        dq = share[ar, p][:, None] - share  # load moved from r to rank(q) when swapping p <-> q
        cost = np.maximum(rl[ar, r][:, None] - dq, rl[:, rq] + dq)
        cost = np.where(ok, cost, np.inf)
        qbest = np.argmin(cost, axis=1)
        if not np.isfinite(cost[ar, qbest]).all():  # pragma: no cover - impossible by the argument above
            i = int(np.argmin(np.isfinite(cost[ar, qbest])))
            raise RuntimeError(f"repair_duplicates: no swap for expert {e[i]} on rank {r[i]} (row {b[i]})")
        vp, vq = phy2log[b, p], phy2log[b, qbest]
        phy2log[b, p], phy2log[b, qbest] = vq, vp


def local_search(
    phy2log: np.ndarray,
    w: np.ndarray,
    num_experts: int,
    slots_per_rank: int,
    rounds: int,
    pairs: int = 4,
    min_step: float | np.ndarray = 0.0,
    active: np.ndarray | None = None,
    above: float | np.ndarray = -np.inf,
    counts: np.ndarray | None = None,
) -> int:
    """Balance ranks pairwise by swapping slot contents, in place; returns swaps made.

    Each round, in every row at once: rank the ranks by load and pair the k-th
    most loaded with the k-th least loaded (k < ``pairs``, pairs disjoint, so
    up to ``pairs`` swaps per row and round). For each pair every swap of one
    slot of the heavy rank with one slot of the light one is evaluated
    ([B, pairs, S, S] candidates) and the one minimising the larger of the two
    new loads is applied if it lowers the heavy rank by more than ``min_step``
    (absolute, scalar or [B]). Only heavy ranks above ``above`` (scalar or [B],
    e.g. the peak allowed) are treated, so balanced ranks are not churned.
    Replica counts never change, so shares stay fixed; swaps that would put two
    replicas of an expert on one rank are excluded (``phy2log`` must have no
    such duplicate to begin with: :func:`repair_duplicates` first).
    ``active`` [B] bool limits the search to some rows. Stops early when no
    row improves. ``counts`` [B, E] (optional): the replica counts of
    ``phy2log``, if the caller knows them.
    """
    S = slots_per_rank
    B, P = phy2log.shape
    R = P // S
    if R < 2 or rounds <= 0:
        return 0
    k = max(1, min(pairs, R // 2))
    if counts is None:
        share, _ = slot_shares(w, phy2log, num_experts)
    else:
        share = take_rows(w / np.maximum(counts, 1), phy2log.astype(np.int64))
    pl = phy2log.reshape(B * R, S)  # view (row-major: rank b * R + r): writes go to phy2log
    sh = share.reshape(B * R, S)
    rl = sh.sum(axis=1)  # [B * R]
    # holds[q * E + e]: flat rank q holds expert e (a lookup per slot instead of
    # comparing every slot of one rank with every slot of the other).
    E = num_experts
    holds = np.zeros(B * R * E, dtype=bool)
    holds[(np.arange(B * R)[:, None] * E + pl).reshape(-1)] = True
    live = np.ones(B, dtype=bool) if active is None else active.astype(bool).copy()
    step = np.broadcast_to(np.asarray(min_step, dtype=np.float64), (B,))
    neg_step = bool((step < 0).any())
    floor = np.broadcast_to(np.asarray(above, dtype=np.float64), (B,))
    swaps = 0
    for _ in range(rounds):
        if not live.any():
            break
        rows = np.nonzero(live)[0]
        rlr = rl.reshape(B, R)[rows]
        order = np.argsort(rlr, axis=1, kind="stable")
        heavy = order[:, ::-1][:, :k]  # [b, k] most loaded first
        light = order[:, :k]  # [b, k] least loaded first
        lh = take_rows(rlr, heavy)
        # Only pairs whose heavy rank is above the floor are worth evaluating:
        # work follows the imbalance, not the model size.
        pb, pk = np.nonzero(lh > floor[rows, None])
        if pb.size == 0:
            break
        n = pb.size
        pr = rows[pb]
        q1, q2 = pr * R + heavy[pb, pk], pr * R + light[pb, pk]  # flat rank ids
        lhp = lh[pb, pk]
        eh, xh = pl[q1], sh[q1]  # [n, S_i]
        el, yl = pl[q2], sh[q2]  # [n, S_j]
        # A swap that would put two replicas of an expert on one rank (the light
        # rank holds e_i, or the heavy e_j) is out: those shares read as -inf /
        # +inf, so d = -inf and the new peak +inf. A swap that moves no load off
        # the heavy rank (d <= 0) leaves it at >= its load, never a step down, so
        # it needs no mask while ``step`` >= 0: it can neither be applied nor
        # beat a swap that is.
        xh = np.where(holds[q2[:, None] * E + eh], -np.inf, xh)
        yl = np.where(holds[q1[:, None] * E + el], np.inf, yl)
        d = xh[:, :, None] - yl[:, None, :]  # [n, S_i, S_j] load leaving the heavy rank
        val = rl[q1][:, None, None] - d
        np.maximum(val, rl[q2][:, None, None] + d, out=val)
        if neg_step:
            np.putmask(val, d <= 0, np.inf)
        flat = val.reshape(n, S * S)
        best = np.argmin(flat, axis=1)
        bval = flat[np.arange(n), best]
        good = (bval < lhp - step[pr]) & (q1 != q2)
        if not good.any():
            break
        q1, q2, i, j = q1[good], q2[good], *np.divmod(best[good], S)
        e1, e2 = pl[q1, i], pl[q2, j]
        s1, s2 = sh[q1, i], sh[q2, j]
        pl[q1, i], pl[q2, j] = e2, e1
        sh[q1, i], sh[q2, j] = s2, s1
        holds[q1 * E + e1] = False
        holds[q2 * E + e2] = False
        holds[q1 * E + e2] = True
        holds[q2 * E + e1] = True
        rl[q1] += s2 - s1
        rl[q2] += s1 - s2
        swaps += int(good.sum())
        improved = np.zeros(B, dtype=bool)
        improved[pr[good]] = True
        live &= improved
    return swaps


def replica_search(
    phy2log: np.ndarray,
    w: np.ndarray,
    num_experts: int,
    slots_per_rank: int,
    rounds: int,
    partners: int = 4,
    min_step: float | np.ndarray = 0.0,
    active: np.ndarray | None = None,
) -> int:
    """Lower each row's peak by re-assigning one replica, changing replica counts; in place.

    A candidate turns a slot q on one of the ``partners`` least loaded ranks,
    holding expert f with >= 2 replicas, into one more replica of an expert e of
    the most loaded rank (q's rank must lack e). Every rank holding e gets
    lighter (e's load is split once more), q's rank trades f's share for e's,
    and the ranks keeping f get heavier. All [B, S, partners, S] candidates are
    evaluated exactly over all R ranks; the one with the lowest maximum over the
    ranks it changes is applied if that is below the old peak by more than
    ``min_step``. This fixes what count-by-count greedy replication cannot see
    (packing granularity). Returns the number of re-assignments.
    """
    S = slots_per_rank
    E = num_experts
    B, P = phy2log.shape
    R = P // S
    if R < 2 or rounds <= 0:
        return 0
    k = min(partners, R - 1)
    pl = phy2log.reshape(B, R, S)
    step = np.broadcast_to(np.asarray(min_step, dtype=np.float64), (B,))
    live = np.ones(B, dtype=bool) if active is None else active.astype(bool).copy()
    ar = np.arange(B)
    moved = 0
    rr = np.arange(R)
    for _ in range(rounds):
        if not live.any():
            break
        rows = np.nonzero(live)[0]
        b = rows.size
        a = ar[:b]
        sub = phy2log[rows]
        share, cnt = slot_shares(w[rows], sub, E)
        rl = share.reshape(b, R, S).sum(axis=2)
        holds = holds_table(sub, E, S) > 0  # [b, R, E]
        order = np.argsort(rl, axis=1, kind="stable")
        rmax = order[:, -1]
        cand = order[:, :k]
        lmax = rl[a, rmax]
        wr = w[rows]
        ex = pl[rows, rmax]  # [b, S] experts e of the peak rank
        we = take_rows(wr, ex.astype(np.int64))
        ce = take_rows(cnt, ex.astype(np.int64))
        de = we / (ce + 1) - we / ce  # [b, S] change on each holder of e (<= 0)
        ef = pl[rows[:, None], cand]  # [b, k, S] experts f on partner slots
        ef64 = ef.astype(np.int64)
        wf = wr[a[:, None, None], ef64]
        cf = cnt[a[:, None, None], ef64]
        df = np.where(cf > 1, wf / np.maximum(cf - 1, 1) - wf / cf, 0.0)  # [b, k, S] on holders of f
        hE = holds[a[:, None], :, ex.astype(np.int64)]  # [b, S, R]
        hF = holds[a[:, None, None], :, ef64]  # [b, k, S, R]
        onq = rr[None, None, :] == cand[:, :, None]  # [b, k, R]
        hF = hF & ~onq[:, :, None, :]
        # new[b, i, kk, j, r]
        new = (
            rl[:, None, None, None, :]
            + hE[:, :, None, None, :] * de[:, :, None, None, None]
            + hF[:, None, :, :, :] * df[:, None, :, :, None]
            + onq[:, None, :, None, :]
            * (we[:, :, None, None, None] / (ce[:, :, None, None, None] + 1) - (wf / cf)[:, None, :, :, None])
        )
        changed = hE[:, :, None, None, :] | hF[:, None, :, :, :] | onq[:, None, :, None, :]
        val = np.where(changed, new, -np.inf).max(axis=4)  # [b, S, k, S]
        lacks = ~holds[a[:, None, None], cand[:, :, None], ex[:, None, :].astype(np.int64)]  # [b, k, S_i]
        ok = lacks.transpose(0, 2, 1)[:, :, :, None] & (cf > 1)[:, None, :, :]
        ok &= ce[:, :, None, None] < R
        val = np.where(ok, val, np.inf)
        flat = val.reshape(b, -1)
        best = np.argmin(flat, axis=1)
        good = flat[a, best] < lmax - step[rows]
        if not good.any():
            break
        i, rem = np.divmod(best[good], k * S)
        kk, j = np.divmod(rem, S)
        ga = a[good]
        pl[rows[good], cand[ga, kk], j] = ex[ga, i]
        moved += int(good.sum())
        live[rows[~good]] = False
    return moved


def bfd_place(
    w: np.ndarray, target: np.ndarray, slots_per_rank: int, num_ranks: int, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Try to place every row under a peak of ``target`` [B] by best-fit decreasing with splitting.

    Experts go heaviest first; expert e takes the fewest replicas c (at least
    ceil(w_e / target)) such that c ranks with a free slot can take a share
    w_e / c without exceeding the target, and enough slots remain for the
    experts still to come; its replicas go on the fullest such ranks (best fit).
    Placing all replicas of an expert at once means no rank gets two. Slots left
    at the end get extra replicas of the lightest expert the rank lacks.
    Returns (ok [B] bool, phy2log [B, P] int32); rows that failed hold a
    complete but unchecked placement. Packing granularity (few slots per rank,
    a few heavy experts) is what this handles better than LPT.
    """
    B, E = w.shape
    S, R = slots_per_rank, num_ranks
    P = R * S
    win = 4  # replica counts tried per expert: ceil(w/T) .. +3
    order = np.argsort(-w, axis=1, kind="stable")
    ar = np.arange(B)
    load = np.zeros((B, R))
    fill = np.zeros((B, R), dtype=np.int64)
    out = np.full((B, R, S), -1, dtype=np.int64)
    ok = np.ones(B, dtype=bool)
    slots_left = np.full(B, P, dtype=np.int64)
    tgt = target * (1 + 1e-12) + 1e-300
    offs = np.arange(win)
    for j in range(E):
        e = order[:, j]
        we = w[ar, e]
        remaining = E - j - 1
        c_lo = np.clip(np.ceil(we / tgt).astype(np.int64), 1, cap)
        cs = np.minimum(c_lo[:, None] + offs[None, :], cap)  # [B, win]
        share = we[:, None] / cs
        open_ = fill < S
        elig = open_[:, None, :] & (load[:, None, :] + share[:, :, None] <= tgt[:, None, None])
        feas = (elig.sum(axis=2) >= cs) & (slots_left[:, None] - cs >= remaining)
        has = feas.any(axis=1)
        pick = np.argmax(feas, axis=1)
        c = np.where(has, cs[ar, pick], 1)
        sh = np.where(has, share[ar, pick], we)
        el = np.where(has[:, None], elig[ar, pick], open_)
        ok &= has
        # fullest eligible ranks first (ties: lowest rank)
        rank_order = np.argsort(np.where(el, -load, np.inf), axis=1, kind="stable")
        sel = np.zeros((B, R), dtype=bool)
        np.put_along_axis(sel, rank_order, np.arange(R)[None, :] < c[:, None], axis=1)
        sel &= el
        bi, ri = np.nonzero(sel)
        out[bi, ri, fill[bi, ri]] = e[bi]
        fill[bi, ri] += 1
        load[bi, ri] += sh[bi]
        slots_left -= sel.sum(axis=1)
    # Leftover slots: one more replica of the lightest expert the rank lacks
    # (one free slot per row per pass, so a row never picks twice for a rank at once).
    flat = out.reshape(B, P)
    while (out < 0).any():
        bi, ri, si = np.nonzero(out < 0)
        first = np.unique(bi, return_index=True)[1]
        bi, ri, si = bi[first], ri[first], si[first]
        present = (out[bi, ri, :, None] == np.arange(E)[None, None, :]).any(axis=1)
        out[bi, ri, si] = np.argmin(np.where(present, np.inf, w[bi]), axis=1)
    return ok, flat.astype(np.int32)


def adjust_counts(
    w: np.ndarray,
    c0: np.ndarray,
    cap: int,
    ratio: float,
    floor: np.ndarray,
    max_iter: int,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Replica counts [B, E] int64 reached from ``c0`` by worthwhile single-replica transfers.

    Each step, in every row at once, moves one replica from the donor whose
    per-replica load after losing it is smallest (``w/(c-1)``, c >= 2) to the
    receiver with the largest per-replica load ``w/c`` (c < cap), but only if
    the receiver's share exceeds both ``ratio`` x the donor's new share and
    ``floor`` [B] (an absolute load). With ratio 1 and floor 0 this reaches
    the min-max counts of :func:`replicate`; ratio > 1 adds hysteresis, so
    counts of experts whose shares are close, or too small to matter for the
    peak, do not flip with load noise (every flip is a weight transfer).
    ``order`` (optional) [B, E]: ``stable_argsort(-w)``, if the caller has it.
    """
    B, E = w.shape
    cols = None
    # Only donors (count >= 2: at most P - E of them) and the hottest experts can
    # take part; working on those columns keeps the loop cheap at E = 256.
    k = min(E, 2 * int((c0 - 1).sum(axis=1).max(initial=0)) + 16)
    if k < E:
        # Every donor, then the heaviest other experts (stable order of -w)
        # until each row has k columns, in column order. The k heaviest hold
        # enough of those others (at least k - donors).
        srt = (stable_argsort(-w) if order is None else order)[:, :k]
        is_donor = c0 >= 2
        other = ~take_rows(is_donor, srt)  # [B, k] in the order of srt
        quota = k - is_donor.sum(axis=1, keepdims=True)
        sel = other & (np.cumsum(other, axis=1) <= quota)
        pick = is_donor.copy()
        pick[np.nonzero(sel)[0], srt[sel]] = True
        cols = np.nonzero(pick)[1].reshape(B, k)
        w = take_rows(w, cols)
        c = take_rows(c0, cols).astype(np.int64)
    else:
        c = c0.astype(np.int64, copy=True)
    # recv / donor shares are kept up to date entry by entry (two per row and
    # step), and rows that stop are dropped from the working arrays: they never
    # resume (a row with no worthwhile transfer has none after other rows move).
    K = c.shape[1]
    cflat = c.reshape(-1)
    idx = np.arange(0, B * K, K)  # working row -> offset of its row in cflat
    wk = w
    fl = np.broadcast_to(np.asarray(floor, dtype=np.float64), (B,))
    recv = np.where(c < cap, w / c, -np.inf)
    donor = np.where(c >= 2, w / np.maximum(c - 1, 1), np.inf)
    base = np.arange(0, B * K, K)  # working row -> offset of its row in recv / donor / wk
    for _ in range(max_iter):
        e = recv.argmax(axis=1)
        d = donor.argmin(axis=1)
        rf, df = recv.reshape(-1), donor.reshape(-1)
        rs, ds = rf[base + e], df[base + d]
        do = (rs > ratio * ds) & (rs > fl) & (e != d)
        if not do.all():
            if not do.any():
                break
            keep = np.nonzero(do)[0]
            idx, wk, fl, e, d = idx[keep], wk[keep], fl[keep], e[keep], d[keep]
            recv, donor = recv[keep], donor[keep]
            rf, df = recv.reshape(-1), donor.reshape(-1)
            base = np.arange(0, keep.size * K, K)
        cflat[idx + e] += 1
        cflat[idx + d] -= 1
        ed = np.concatenate((e, d))
        f = np.concatenate((base, base)) + ed
        cc = cflat[np.concatenate((idx, idx)) + ed]
        wc = wk.reshape(-1)[f]
        rf[f] = np.where(cc < cap, wc / cc, -np.inf)
        df[f] = np.where(cc >= 2, wc / np.maximum(cc - 1, 1), np.inf)
    if cols is None:
        return c
    out = c0.astype(np.int64, copy=True)
    np.put_along_axis(out, cols, c, axis=1)
    return out


def align_to(new: np.ndarray, old: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Relabel the ranks of ``new`` [B, P] and order each rank's slots to keep as much of ``old`` as possible.

    Rank loads do not depend on which rank is called what, so a from-scratch
    placement may be permuted freely: new ranks are matched to old ranks
    greedily by how many experts they share (largest overlap first, ties: lowest
    ids), then within a rank every expert already there keeps its slot and the
    others take the remaining slots in order. Returns [B, P] int32.
    """
    S = slots_per_rank
    B, P = new.shape
    R = P // S
    nw = new.reshape(B, R, S)
    od = old.reshape(B, R, S)
    # overlap[b, i, j] = experts rank i of new shares with rank j of old
    ov = (nw[:, :, None, :, None] == od[:, None, :, None, :]).any(axis=4).sum(axis=3)
    ov = ov.astype(np.float64)
    perm = np.empty((B, R), dtype=np.int64)  # perm[b, j] = new rank placed on old rank j
    ar = np.arange(B)
    for _ in range(R):
        flat = np.argmax(ov.reshape(B, R * R), axis=1)
        i, j = np.divmod(flat, R)
        perm[ar, j] = i
        ov[ar, i, :] = -1.0
        ov[ar, :, j] = -1.0
    bp = np.take_along_axis(nw, perm[:, :, None], axis=1)  # [B, R, S] new sets on old ranks
    keep = (od[:, :, :, None] == bp[:, :, None, :]).any(axis=3)  # old slot's expert stays
    fresh = ~(bp[:, :, :, None] == od[:, :, None, :]).any(axis=3)  # new expert not there yet
    slots = np.argsort(keep, axis=2, kind="stable")  # free slots first
    src = np.argsort(~fresh, axis=2, kind="stable")  # fresh experts first
    vals = np.take_along_axis(bp, src, axis=2)
    nfree = (~keep).sum(axis=2, keepdims=True)
    k = np.arange(S)[None, None, :]
    out = od.copy()
    cur_vals = np.take_along_axis(out, slots, axis=2)
    np.put_along_axis(out, slots, np.where(k < nfree, vals, cur_vals), axis=2)
    return out.reshape(B, P).astype(np.int32)


def scenario_search(
    phy2log: np.ndarray,
    x: np.ndarray,
    num_experts: int,
    slots_per_rank: int,
    rounds: int,
    partners: int = 4,
    min_gain: float | np.ndarray = 0.0,
) -> int:
    """Lower the sum over scenarios of each row's peak rank load by slot swaps, in place; returns swaps.

    ``x`` [B, K, E]: K load scenarios per row (e.g. recent windows). The
    objective of a row is ``J = Σ_k max_r load_k[r]`` with each expert split
    evenly over its replicas: the held-out peak is a per-window peak, and
    experts that spike together should not share a rank, which a single
    forecast cannot show. Each round, in every row: the rank contributing most
    to J (the sum of the scenario peaks it carries) is paired with the
    ``partners`` ranks of least total load, every swap of one of its slots
    with one of theirs is evaluated exactly ([B, K, partners, S, S]), and the
    best is applied if it lowers J by more than ``min_gain`` (absolute, scalar
    or [B]). Replica counts never change; swaps creating a duplicate are
    excluded. Stops early when no row improves.
    """
    S = slots_per_rank
    B, P = phy2log.shape
    R = P // S
    K = x.shape[1]
    if R < 2 or rounds <= 0 or B == 0 or K == 0:
        return 0
    m = max(1, min(partners, R - 1))
    pl = phy2log.reshape(B, R, S)  # view: writes go to phy2log
    _, counts = slot_shares(x[:, 0], phy2log, num_experts)
    per = x / np.maximum(counts, 1)[:, None, :]  # [B, K, E] load of one replica
    idx = phy2log.astype(np.int64)
    v = np.take_along_axis(per, np.broadcast_to(idx[:, None, :], (B, K, P)), axis=2).reshape(B, K, R, S)
    lk = v.sum(axis=3)  # [B, K, R]
    gain_min = np.maximum(np.broadcast_to(np.asarray(min_gain, dtype=np.float64), (B,)), 0.0)
    ar_r = np.arange(R)
    swaps = 0
    live = np.ones(B, dtype=bool)
    for _ in range(rounds):
        rows = np.nonzero(live)[0]
        if rows.size == 0:
            break
        n = rows.size
        L = lk[rows]  # [n, K, R]
        top = np.argsort(-L, axis=2, kind="stable")[:, :, : min(3, R)]  # [n, K, <=3]
        topv = np.take_along_axis(L, top, axis=2)  # [n, K, <=3]
        pk = topv[:, :, 0]  # [n, K]
        J = pk.sum(axis=1)
        contrib = ((top[:, :, :1] == ar_r) * pk[:, :, None]).sum(axis=1)  # [n, R]
        hot = np.argmax(contrib, axis=1)  # [n]
        tot = L.sum(axis=1)
        tot[np.arange(n), hot] = np.inf
        part = np.argsort(tot, axis=1, kind="stable")[:, :m]  # [n, m] lightest ranks
        # Largest load in each scenario among the ranks other than hot and partner.
        t4 = top[:, :, None, :]
        excl = (t4 == hot[:, None, None, None]) | (t4 == part[:, None, :, None])
        other = np.where(excl, -np.inf, topv[:, :, None, :]).max(axis=3)  # [n, K, m]
        vr = v[rows]
        va = vr[np.arange(n), :, hot]  # [n, K, S]
        vb = np.take_along_axis(vr, part[:, None, :, None], axis=2)  # [n, K, m, S]
        d = vb[:, :, :, None, :] - va[:, :, None, :, None]  # [n, K, m, Sa, Sb]: load onto hot
        lh = np.take_along_axis(L, hot[:, None, None], axis=2)[:, :, :, None, None]  # [n, K, 1, 1, 1]
        lp = np.take_along_axis(L, part[:, None, :], axis=2)[:, :, :, None, None]  # [n, K, m, 1, 1]
        nj = np.maximum(np.maximum(lh + d, lp - d), other[:, :, :, None, None]).sum(axis=1)  # [n, m, Sa, Sb]
        ea = pl[rows, hot]  # [n, S]
        eb = pl[rows[:, None], part]  # [n, m, S]
        same = ea[:, None, :, None] == eb[:, :, None, :]  # [n, m, Sa, Sb]
        bad = same.any(axis=3)[:, :, :, None] | same.any(axis=2)[:, :, None, :]
        flat = np.where(bad, np.inf, nj).reshape(n, m * S * S)
        best = np.argmin(flat, axis=1)
        gain = J - flat[np.arange(n), best]
        ok = gain > gain_min[rows]
        live[rows[~ok]] = False
        c = np.nonzero(ok)[0]
        if c.size == 0:
            break
        b = rows[c]
        pi, ab = np.divmod(best[c], S * S)
        ia, ib = np.divmod(ab, S)
        rh, rp = hot[c], part[c, pi]
        e1, e2 = pl[b, rh, ia].copy(), pl[b, rp, ib].copy()
        pl[b, rh, ia], pl[b, rp, ib] = e2, e1
        v1, v2 = v[b, :, rh, ia].copy(), v[b, :, rp, ib].copy()  # [c, K]
        v[b, :, rh, ia], v[b, :, rp, ib] = v2, v1
        lk[b, :, rh] += v2 - v1
        lk[b, :, rp] += v1 - v2
        swaps += c.size
    return swaps
