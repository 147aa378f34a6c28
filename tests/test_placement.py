"""eplbd.placement: invariants, derived tables, β, moves, the peak lower bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplbd.geometry import Geometry
from eplbd.placement import (
    PlacementError,
    balancedness,
    count_moves,
    default_phy2log,
    layer_balancedness,
    log2phy_compact,
    log2phy_padded,
    peak_lower_bound,
    rank_loads,
    replica_count,
    validate_loads,
    validate_phy2log,
)

G = Geometry(2, 6, 4, 2, num_nodes=2)  # P = 8: experts 0, 1 have two replicas by default


def test_default_placement() -> None:
    p = default_phy2log(G)
    assert p.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]] * 2
    assert replica_count(p, G).tolist() == [[2, 2, 1, 1, 1, 1]] * 2
    validate_phy2log(p, G)


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda p: p[:, :-1], "shape"),
        (lambda p: p.astype(float), "not an integer type"),
        (lambda p: np.where(p == 5, 6, p), "outside [0, 6)"),
        (lambda p: np.where(p == 5, 4, p), "no replica of expert 5"),
        (lambda p: np.concatenate([p[:, :6], [[5, 5], [5, 5]]], axis=1), "rank 3 holds two replicas"),
    ],
)
def test_invalid_placements_are_named(mutate, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PlacementError, match="phy2log") as ei:
        validate_phy2log(mutate(default_phy2log(G)), G)
    assert words in str(ei.value)


@pytest.mark.parametrize(
    ("loads", "words"),
    [
        (np.ones((2, 5)), "shape (2, 5)"),
        (np.array([[1, 2, 3, np.inf, 5, 6]] * 2), "non-finite value inf at layer 0, expert 3"),
        (np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, -5, 6]]), "negative value -5.0 at layer 1, expert 4"),
    ],
)
def test_bad_loads(loads: np.ndarray, words: str) -> None:
    with pytest.raises(ValueError) as ei:
        validate_loads(loads, G)
    assert words in str(ei.value)


def test_tables_agree() -> None:
    p = np.array([[0, 1, 2, 3, 4, 5, 0, 1], [5, 4, 3, 2, 1, 0, 5, 0]], dtype=np.int32)
    rc = replica_count(p, G)
    comp = log2phy_compact(p)
    pad = log2phy_padded(p, G)
    off = np.cumsum(rc, axis=1) - rc
    for layer in range(2):
        for e in range(6):
            slots = sorted(np.nonzero(p[layer] == e)[0].tolist())
            assert comp[layer, off[layer, e] : off[layer, e] + rc[layer, e]].tolist() == slots
            assert [s for s in pad[layer, e].tolist() if s >= 0] == slots
    with pytest.raises(PlacementError, match="width 1"):
        log2phy_padded(p, G, width=1)


def test_rank_loads_and_beta() -> None:
    p = default_phy2log(G)
    w = np.array([[8, 4, 2, 2, 1, 1]] * 2, dtype=float)
    # ranks: [0,1] [2,3] [4,5] [0,1] with experts 0 and 1 split in two
    assert rank_loads(w, p, G).tolist() == [[6, 4, 2, 6]] * 2
    assert balancedness(w, p, G) == pytest.approx(4.5 / 6)
    assert layer_balancedness(w, p, G).tolist() == pytest.approx([0.75, 0.75])
    assert balancedness(np.zeros((2, 6)), p, G) == 1.0
    assert layer_balancedness(np.zeros((2, 6)), p, G).tolist() == [1.0, 1.0]


def test_count_moves_classifies() -> None:
    old = default_phy2log(G)  # node 0: ranks 0, 1 = slots 0..3; node 1: slots 4..7
    new = old.copy()
    new[0, [0, 1]] = [1, 0]  # local: rank 0 already held both
    new[0, 2] = 0  # remote, same node (rank 0 has expert 0)
    new[0, 4] = 2  # remote, cross-node (expert 2 only on node 0)
    new[1, 7] = 4  # remote, same node (rank 2 holds 4)
    mv = count_moves(old, new, G)
    assert mv == (3, 1, 2) and mv.total == 5
    assert count_moves(old, old, G) == (0, 0, 0)


def test_peak_lower_bound_small_case() -> None:
    g = Geometry(1, 8, 8, 2)
    w = np.array([[600, 560, 120, 120, 20, 10, 10, 10]], dtype=float)
    # mean 181.25; min-max share with 16 slots: 600/5 = 120 -> bound is the mean
    assert peak_lower_bound(w, g).tolist() == [181.25]
    hot = np.array([[1000, 0, 0, 0, 0, 0, 0, 0]], dtype=float)
    assert peak_lower_bound(hot, g).tolist() == [125.0]  # 8 replicas at most


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
)
def test_peak_lower_bound_holds_for_random_placements(ranks: int, extra: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    E = ranks * 2 + extra
    S = -(-E // ranks) + 1
    S = min(S, E)
    g = Geometry(2, E, ranks, S)
    w = rng.lognormal(0, 2, (2, E))
    # a random valid placement: every expert once, then random distinct extras per rank
    for _ in range(5):
        p = np.empty((2, g.num_slots), dtype=np.int32)
        for layer in range(2):
            while True:
                perm = rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, g.num_slots - E)]))
                rows = perm.reshape(ranks, S)
                if all(len(set(r.tolist())) == S for r in rows):
                    p[layer] = perm
                    break
        validate_phy2log(p, g)
        assert np.all(rank_loads(w, p, g).max(axis=1) >= peak_lower_bound(w, g) * (1 - 1e-12))
