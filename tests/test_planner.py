"""Transfer planner: plans turn old into new exactly, validation rejects tampering."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplbd.planner as planner_mod
from eplbd.geometry import Geometry
from eplbd.placement import count_moves, default_phy2log, log2phy_compact, replica_count
from eplbd.plan import COPY, OP_DTYPE, RECV, SEND, Plan, plan_hash
from eplbd.planner import (
    PlanError,
    apply_ops,
    build_plan,
    changed_layers,
    empty_plan,
    plan_stats,
    round_lower_bound,
    rounds_per_layer,
    staging_need,
    validate_plan,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- generators


def shuffled_placement(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    """Default placement with experts relabelled and ranks/slots shuffled per layer (valid)."""
    L, E, R, S = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank
    perm = np.argsort(rng.random((L, E)), axis=1)
    out = np.take_along_axis(perm, default_phy2log(g).astype(np.int64), axis=1).reshape(L, R, S)
    out = np.take_along_axis(out, np.argsort(rng.random((L, R)), axis=1)[:, :, None], axis=1)
    out = np.take_along_axis(out, np.argsort(rng.random((L, R, S)), axis=2), axis=2)
    return out.reshape(L, R * S).astype(np.int32)


def repoint(old: np.ndarray, g: Geometry, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to k random valid edits: a replica of an expert with >= 2 replicas becomes
    an expert its rank lacks; plus a few within-rank slot swaps (local moves)."""
    new = old.copy()
    S = g.slots_per_rank
    rc = replica_count(new, g)
    for _ in range(k):
        layer = int(rng.integers(g.num_layers))
        p = int(rng.integers(g.num_slots))
        r = p // S
        if rng.random() < 0.25 and S > 1:  # swap two slots of one rank: COPYs
            q = r * S + int(rng.integers(S))
            new[layer, p], new[layer, q] = new[layer, q], new[layer, p]
            continue
        x, y = new[layer, p], int(rng.integers(g.num_experts))
        if rc[layer, x] < 2 or (new[layer, r * S : (r + 1) * S] == y).any():
            continue
        new[layer, p] = y
        rc[layer, x] -= 1
        rc[layer, y] += 1
    return new


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    nodes = draw(st.integers(1, 3))
    ranks = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 4))
    experts = draw(st.integers(slots, ranks * slots))
    layers = draw(st.integers(1, 3))
    return Geometry(layers, experts, ranks, slots, num_nodes=nodes)


@st.composite
def placement_pairs(draw: st.DrawFn) -> tuple[Geometry, np.ndarray, np.ndarray]:
    g = draw(geometries())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mode = draw(st.sampled_from(["scratch", "steady", "both_random", "same"]))
    base = repoint(shuffled_placement(g, rng), g, 3 * g.num_slots, rng)
    if mode == "scratch":
        return g, default_phy2log(g), base
    if mode == "steady":
        return g, base, repoint(base, g, draw(st.integers(1, 8)), rng)
    if mode == "both_random":
        return g, base, repoint(shuffled_placement(g, rng), g, 3 * g.num_slots, rng)
    return g, base, base.copy()


def with_ops(plan: Plan, ops: np.ndarray, rows: np.ndarray, g: Geometry, resort: bool = True) -> Plan:
    """A copy of ``plan`` with these ops (row = layer*R + rank of each), CSR rebuilt."""
    if resort:
        order = np.lexsort((ops["dst_slot"], ops["src_slot"], ops["kind"], ops["round"], rows))
        ops, rows = ops[order], rows[order]
    indptr = np.zeros(g.num_layers * g.num_ranks + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=g.num_layers * g.num_ranks), out=indptr[1:])
    return dataclasses.replace(plan, ops=np.ascontiguousarray(ops), op_indptr=indptr)


def op_rows(plan: Plan) -> np.ndarray:
    return np.repeat(np.arange(plan.op_indptr.shape[0] - 1), np.diff(plan.op_indptr))


def plan_bytes(plan: Plan) -> bytes:
    arrs = (plan.phy2log, plan.log2phy, plan.replica_count, plan.op_indptr, plan.ops)
    return b"".join(a.tobytes() for a in arrs)


# ---------------------------------------------------------------- properties


@SETTINGS
@given(placement_pairs())
def test_plan_transforms_old_into_new(case: tuple[Geometry, np.ndarray, np.ndarray]) -> None:
    g, old, new = case
    plan = build_plan(7, 3, old, new, g)
    validate_plan(plan, old, g)
    assert np.array_equal(apply_ops(plan, old, g), new)
    assert plan.plan_id == 7 and plan.base_epoch == 3
    assert np.array_equal(plan.phy2log, new)
    assert np.array_equal(plan.log2phy, log2phy_compact(new))
    assert np.array_equal(plan.replica_count, replica_count(new, g))
    R, S = g.num_ranks, g.slots_per_rank
    # Only changed layers have ops.
    assert np.array_equal(changed_layers(plan, g), np.flatnonzero((old != new).any(axis=1)))
    # One RECV or COPY per changed slot; COPY exactly when the rank already held it.
    mv = count_moves(old, new, g)
    st_ = plan_stats(plan, g)
    assert (st_.transfers, st_.copies, st_.cross_node) == (mv.remote, mv.local, mv.cross_node)
    assert staging_need(plan, g).sum() == int((old != new).sum())
    rows = op_rows(plan)
    ops = plan.ops
    s = ops["kind"] == SEND
    # Same node first: a SEND crosses nodes only if no replica exists on the receiver's node.
    rpn = g.ranks_per_node
    for i in np.flatnonzero(s):
        layer, src_rank, dst_rank = rows[i] // R, rows[i] % R, int(ops["peer"][i])
        holders = np.flatnonzero(old[layer] == ops["expert"][i]) // S
        if (holders // rpn == dst_rank // rpn).any():
            assert src_rank // rpn == dst_rank // rpn
    # Rounds: within [lower bound, 2*lower bound - 1] (greedy first-fit bound).
    rounds, lb = rounds_per_layer(plan, g), round_lower_bound(plan, g)
    assert (rounds >= lb).all()
    assert (rounds <= np.maximum(2 * lb - 1, 0)).all()


@SETTINGS
@given(placement_pairs())
def test_plan_is_deterministic(case: tuple[Geometry, np.ndarray, np.ndarray]) -> None:
    g, old, new = case
    a = build_plan(11, 10, old, new, g)
    # Different input dtypes/copies give the same bytes.
    b = build_plan(11, 10, old.astype(np.int64), np.array(new, order="F"), g)
    assert plan_bytes(a) == plan_bytes(b)
    assert plan_hash(a) == plan_hash(b)
    assert plan_hash(build_plan(12, 10, old, new, g)) != plan_hash(a)


# ---------------------------------------------------------------- small exact cases


def test_copy_within_rank_and_empty_layers() -> None:
    g = Geometry(2, 4, 2, 2)
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=np.int32)
    new = np.array([[1, 0, 2, 3], [0, 1, 2, 3]], dtype=np.int32)  # layer 0: swap on rank 0
    plan = build_plan(1, 0, old, new, g)
    validate_plan(plan, old, g)
    assert plan.num_ops == 2
    assert (plan.ops["kind"] == COPY).all() and (plan.ops["round"] == 0).all()
    assert (plan.ops["peer"] == 0).all()
    assert list(changed_layers(plan, g)) == [0]
    assert plan.ops_for(1, 0, g.num_ranks).shape == (0,)
    assert staging_need(plan, g).tolist() == [[2, 0], [0, 0]]
    assert rounds_per_layer(plan, g).tolist() == [0, 0]


def test_sources_spread_over_replicas() -> None:
    # Expert 0 has 4 replicas on ranks 0-3 (node 0); ranks 4-7 (node 1) each get
    # expert 0 instead of their unique expert's second replica. No source on the
    # receivers' node, so every sender is cross-node, one send each.
    g = Geometry(1, 5, 8, 2, num_nodes=2)
    old = np.array([[0, 1, 0, 2, 0, 3, 0, 4, 1, 2, 2, 3, 3, 4, 4, 1]], dtype=np.int32)
    new = old.copy()
    new[0, [8, 10, 12, 14]] = 0  # ranks 4..7 slot 0: 1,2,3,4 -> 0 (each still has a replica)
    plan = build_plan(1, 0, old, new, g)
    validate_plan(plan, old, g)
    s = plan.ops[plan.ops["kind"] == SEND]
    senders = op_rows(plan)[plan.ops["kind"] == SEND] % g.num_ranks
    assert sorted(senders.tolist()) == [0, 1, 2, 3]
    assert len(s) == 4
    st_ = plan_stats(plan, g)
    assert st_.sends_max == 1 and st_.cross_node == 4
    # Four disjoint pairs: one round.
    assert rounds_per_layer(plan, g).tolist() == [1]


def test_same_node_source_preferred() -> None:
    # Expert 0 on rank 0 (node 0) and rank 2 (node 1); rank 3 (node 1) wants it.
    g = Geometry(1, 6, 4, 2, num_nodes=2)
    old = np.array([[0, 1, 2, 3, 0, 4, 5, 1]], dtype=np.int32)
    new = old.copy()
    new[0, 7] = 0  # rank 3 slot 1: 1 -> 0 (expert 1 keeps rank 0's replica)
    plan = build_plan(1, 0, old, new, g)
    validate_plan(plan, old, g)
    send = plan.ops[plan.ops["kind"] == SEND]
    assert op_rows(plan)[plan.ops["kind"] == SEND].tolist() == [2]
    assert send["src_slot"].tolist() == [0] and send["peer"].tolist() == [3]
    recv = plan.ops_for(0, 3, g.num_ranks)
    assert recv["kind"].tolist() == [RECV] and recv["peer"].tolist() == [2]


def test_pair_exchange_shares_a_round() -> None:
    # Rank 0 and rank 1 swap one expert each way: one round, each rank has one peer.
    g = Geometry(1, 4, 2, 3)
    old = np.array([[0, 1, 2, 0, 3, 1]], dtype=np.int32)
    new = np.array([[0, 1, 3, 0, 2, 1]], dtype=np.int32)
    plan = build_plan(1, 0, old, new, g)
    validate_plan(plan, old, g)
    assert rounds_per_layer(plan, g).tolist() == [1]
    for r in range(2):
        ops = plan.ops_for(0, r, 2)
        assert ops["kind"].tolist() == [SEND, RECV]
        assert set(ops["peer"].tolist()) == {1 - r}


def test_empty_plan() -> None:
    g = Geometry(3, 8, 4, 2)
    p = default_phy2log(g)
    plan = empty_plan(5, 4, p, g)
    validate_plan(plan, p, g)
    assert plan.num_ops == 0 and changed_layers(plan, g).shape == (0,)
    assert plan.op_indptr.shape == (g.num_layers * g.num_ranks + 1,)


def test_build_rejects_invalid_inputs() -> None:
    g = Geometry(1, 4, 2, 2)
    old = default_phy2log(g)
    bad = old.copy()
    bad[0, 0] = 1  # rank 0 holds expert 1 twice, expert 0 has no replica
    with pytest.raises(PlanError, match="new_phy2log"):
        build_plan(1, 0, old, bad, g)
    with pytest.raises(PlanError, match="old_phy2log"):
        build_plan(1, 0, old[:, :3], old, g)
    with pytest.raises(PlanError, match="plan_id"):
        build_plan(1.5, 0, old, old, g)  # type: ignore[arg-type]


def test_deepseek_shape_scratch_and_steady() -> None:
    g = Geometry.deepseek_v3()
    rng = np.random.default_rng(1)
    a = shuffled_placement(g, rng)
    plan = build_plan(1, 0, default_phy2log(g), a, g)
    validate_plan(plan, default_phy2log(g), g)
    b = repoint(a, g, 300, rng)
    plan2 = build_plan(2, 1, a, b, g)
    validate_plan(plan2, a, g)
    assert np.array_equal(apply_ops(plan2, a, g), b)
    st_ = plan_stats(plan2, g)
    assert st_.rounds_total <= 2 * st_.rounds_lower_bound_total


# ---------------------------------------------------------------- tampering


def tamper_case() -> tuple[Geometry, np.ndarray, Plan]:
    g = Geometry(2, 10, 6, 3, num_nodes=2)
    rng = np.random.default_rng(5)
    old = repoint(shuffled_placement(g, rng), g, 40, rng)
    new = repoint(shuffled_placement(g, rng), g, 40, rng)
    plan = build_plan(3, 2, old, new, g)
    validate_plan(plan, old, g)
    kinds = set(plan.ops["kind"].tolist())
    assert kinds == {SEND, RECV, COPY}, kinds  # the case must exercise every kind
    return g, old, plan


FIELDS = ["round", "kind", "peer", "src_slot", "dst_slot", "expert"]


def test_every_single_field_tampering_is_rejected() -> None:
    g, old, plan = tamper_case()
    rows = op_rows(plan)
    bounds = {"round": 4, "kind": 3, "peer": g.num_ranks, "src_slot": g.slots_per_rank,
              "dst_slot": g.slots_per_rank, "expert": g.num_experts}  # fmt: skip
    tried = 0
    for i in range(plan.num_ops):
        for f in FIELDS:
            for v in range(bounds[f]):
                if v == plan.ops[f][i]:
                    continue
                ops = plan.ops.copy()
                ops[f][i] = v
                for resort in (False, True):
                    bad = with_ops(plan, ops, rows, g, resort=resort)
                    with pytest.raises(PlanError):
                        validate_plan(bad, old, g)
                    tried += 1
    assert tried > 1000


def test_dropped_or_duplicated_op_is_rejected() -> None:
    g, old, plan = tamper_case()
    rows = op_rows(plan)
    for i in range(plan.num_ops):
        keep = np.arange(plan.num_ops) != i
        with pytest.raises(PlanError):
            validate_plan(with_ops(plan, plan.ops[keep], rows[keep], g), old, g)
        dup = np.r_[np.arange(plan.num_ops), i]
        with pytest.raises(PlanError):
            validate_plan(with_ops(plan, plan.ops[dup], rows[dup], g), old, g)


def test_round_exclusivity_is_checked() -> None:
    # Move every transfer of one pair into another round of the same rank, on both
    # sides: SEND/RECV still match, the ops stay sorted, but the rank now has two
    # peers in one round.
    g, old, plan = tamper_case()
    R = g.num_ranks
    rows = op_rows(plan)
    ops = plan.ops
    t = ops["kind"] != COPY
    found = False
    for i in np.flatnonzero(t):
        layer, me, peer, r0 = rows[i] // R, rows[i] % R, int(ops["peer"][i]), int(ops["round"][i])
        mine = t & (rows // R == layer) & (rows % R == me)
        others = np.unique(ops["round"][mine & (ops["round"] != r0)])
        if others.size == 0:
            continue
        r1 = int(others[0])
        pair = t & (rows // R == layer) & (ops["round"] == r0)
        pair &= ((rows % R == me) & (ops["peer"] == peer)) | ((rows % R == peer) & (ops["peer"] == me))
        bad_ops = ops.copy()
        bad_ops["round"][pair] = r1
        with pytest.raises(PlanError, match="in one round"):
            validate_plan(with_ops(plan, bad_ops, rows, g), old, g)
        found = True
        break
    assert found


def test_table_and_structure_tampering_is_rejected() -> None:
    g, old, plan = tamper_case()
    rc = plan.replica_count.copy()
    rc[0, 0] += 1
    cases: dict[str, Plan] = {"replica_count": dataclasses.replace(plan, replica_count=rc)}
    l2p = plan.log2phy.copy()
    l2p[0, [0, 1]] = l2p[0, [1, 0]]
    cases["log2phy"] = dataclasses.replace(plan, log2phy=l2p)
    l2p = plan.log2phy.copy()
    l2p[1, 0] = l2p[1, 1]  # not a permutation
    cases["log2phy "] = dataclasses.replace(plan, log2phy=l2p)
    p2l = plan.phy2log.copy()
    p2l[0, 0] = (p2l[0, 0] + 1) % g.num_experts
    cases["phy2log"] = dataclasses.replace(plan, phy2log=p2l)
    ip = plan.op_indptr.copy()
    ip[1], ip[2] = ip[2] + 1, ip[1]
    cases["op_indptr"] = dataclasses.replace(plan, op_indptr=ip)
    ip = plan.op_indptr.copy()
    ip[-1] -= 1
    cases["op_indptr "] = dataclasses.replace(plan, op_indptr=ip)
    cases["op_indptr  "] = dataclasses.replace(plan, op_indptr=plan.op_indptr.astype(np.int32))
    cases["ops"] = dataclasses.replace(plan, ops=plan.ops.astype([(f, "<i8") for f in OP_DTYPE.names]))
    cases["phy2log  "] = dataclasses.replace(plan, phy2log=plan.phy2log[:, :-1].copy())
    for name, bad in cases.items():
        with pytest.raises(PlanError, match=name.strip()):
            validate_plan(bad, old, g)
    # Wrong base placement: the ops do not fit it.
    other = old.copy()
    layer = int(changed_layers(plan, g)[0])
    other[layer] = plan.phy2log[layer]
    with pytest.raises(PlanError):
        validate_plan(plan, other, g)


@SETTINGS
@given(placement_pairs(), st.data())
def test_random_tampering_is_rejected(
    case: tuple[Geometry, np.ndarray, np.ndarray], data: st.DataObject
) -> None:
    g, old, new = case
    plan = build_plan(1, 0, old, new, g)
    if plan.num_ops == 0:
        return
    rows = op_rows(plan)
    i = data.draw(st.integers(0, plan.num_ops - 1))
    f = data.draw(st.sampled_from(FIELDS))
    delta = data.draw(st.integers(1, 40))
    ops = plan.ops.copy()
    ops[f][i] += delta
    with pytest.raises(PlanError):
        validate_plan(with_ops(plan, ops, rows, g, resort=data.draw(st.booleans())), old, g)


def test_apply_ops_reads_old_weights() -> None:
    # A 3-cycle of experts across ranks: each slot's source is overwritten by
    # another op, which staging semantics make harmless.
    g = Geometry(1, 3, 3, 1)
    old = np.array([[0, 1, 2]], dtype=np.int32)
    new = np.array([[1, 2, 0]], dtype=np.int32)
    plan = build_plan(1, 0, old, new, g)
    validate_plan(plan, old, g)
    assert apply_ops(plan, old, g).tolist() == new.tolist()
    # 3 pairs in a triangle need 3 rounds (odd cycle).
    assert rounds_per_layer(plan, g).tolist() == [3]
    assert round_lower_bound(plan, g).tolist() == [2]
    assert plan.ops.dtype == OP_DTYPE


def test_many_ranks_use_the_wide_colouring() -> None:
    # R > 32 takes the boolean colour table instead of the 64-bit masks.
    g = Geometry(3, 48, 48, 2, num_nodes=4)
    rng = np.random.default_rng(3)
    old = repoint(shuffled_placement(g, rng), g, 40, rng)
    new = repoint(shuffled_placement(g, rng), g, 40, rng)
    plan = build_plan(1, 0, old, new, g)
    validate_plan(plan, old, g)
    assert np.array_equal(apply_ops(plan, old, g), new)
    rounds, lb = rounds_per_layer(plan, g), round_lower_bound(plan, g)
    assert (lb > 0).all() and (rounds >= lb).all() and (rounds <= 2 * lb - 1).all()


@pytest.mark.parametrize("packed", [True, False])
def test_noncontiguous_rounds_and_unpacked_checks(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rounds need not be contiguous. Keys that overflow 62 bits make validation
    # fall back to multi-key sorts (forced here via _pack), which must agree.
    g, old, plan = tamper_case()  # built with packed sort keys
    if not packed:
        monkeypatch.setattr(planner_mod, "_pack", lambda cols: None)
        # A plan built with the lexsort fallback is identical (the keys are unique).
        assert plan_bytes(build_plan(3, 2, old, plan.phy2log, g)) == plan_bytes(plan)
    ops = plan.ops.copy()
    t = ops["kind"] != COPY
    ops["round"][t] += 2**31 - 64
    shifted = with_ops(plan, ops, op_rows(plan), g)  # COPYs (round 0) now sort first
    validate_plan(shifted, old, g)
    plan, ops, rows = shifted, shifted.ops, op_rows(shifted)
    for i in range(plan.num_ops):
        for f in FIELDS:
            bad = ops.copy()
            bad[f][i] = bad[f][i] - 1 if bad[f][i] > 0 else 1
            with pytest.raises(PlanError):
                validate_plan(with_ops(plan, bad, rows, g), old, g)
    # Two ops of a row swapped: not sorted.
    a = int(np.flatnonzero(np.diff(rows) == 0)[0])
    bad = ops.copy()
    bad[[a, a + 1]] = bad[[a + 1, a]]
    with pytest.raises(PlanError, match="not sorted"):
        validate_plan(dataclasses.replace(plan, ops=bad), old, g)
