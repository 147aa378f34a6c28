"""The one planning pipeline (eplbd.policy.propose/gate) and the fast helpers it runs on."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from eplbd.config import FORECAST_METHODS, Config
from eplbd.config import POLICIES as CONFIG_POLICIES
from eplbd.forecast import METHODS, forecast
from eplbd.geometry import Geometry
from eplbd.placement import balancedness, count_moves, default_phy2log, log2phy_compact, validate_phy2log
from eplbd.policy import DEFAULT_POLICY, POLICIES, Proposal, gate, propose, rebalance, suggest_slack
from eplbd.policy._common import lpt_pack, stable_argsort, take_rows
from eplbd.policy.moveaware import moveaware
from eplbd.policy.pipeline import DEFAULT_FORECAST, DEFAULT_FORECAST_ALPHA, DEFAULT_MIN_GAIN, scenarios
from eplbd.replay import replay
from eplbd.synthetic import drifting_trace

G = Geometry(4, 32, 8, 5, num_nodes=2, num_groups=4)


def windows(n: int = 8, seed: int = 0) -> np.ndarray:
    return drifting_trace(n, G.num_layers, G.num_experts, seed)


def test_defaults_agree_with_config() -> None:
    c = Config()
    assert c.forecast == DEFAULT_FORECAST and c.policy == DEFAULT_POLICY
    assert c.forecast_alpha == DEFAULT_FORECAST_ALPHA and c.min_gain == DEFAULT_MIN_GAIN
    assert set(FORECAST_METHODS) == set(METHODS) and set(CONFIG_POLICIES) == set(POLICIES)


def test_propose_is_forecast_then_rebalance() -> None:
    win, cur = windows(), default_phy2log(G)
    p = propose(win, cur, G)
    fc = forecast(win, DEFAULT_FORECAST, alpha=DEFAULT_FORECAST_ALPHA)
    assert np.array_equal(p.predicted, fc)
    assert p.options == {"slack": suggest_slack(win.astype(np.float64), cur, G)}  # adaptive by default
    # Layers on the engine default are placed from scratch, with the windows as load scenarios.
    assert np.array_equal(p.phy2log, moveaware(fc, cur, G, scenarios=scenarios(win, fc), **p.options))
    # Without such a layer the scenarios play no part: exactly rebalance.
    q = propose(win, p.phy2log, G)
    assert np.array_equal(q.phy2log, rebalance(fc, p.phy2log, G, **q.options))
    assert p.phy2log.dtype == np.int32 and validate_phy2log(p.phy2log, G) is not None
    assert p.beta_now == balancedness(fc, cur, G) and p.beta_pred == balancedness(fc, p.phy2log, G)
    assert p.gain == p.beta_pred - p.beta_now and p.policy == DEFAULT_POLICY
    assert propose(win, cur, G, adaptive=False).options == {}
    assert p.forecast_ms >= 0 and p.policy_ms >= 0


def test_propose_deterministic_and_options() -> None:
    win, cur = windows(seed=3), default_phy2log(G)
    kws = ({}, {"policy": "greedy"}, {"forecast": "auto"}, {"adaptive": True}, {"options": {"slack": 0.0}})
    for kw in kws:
        a, b = propose(win, cur, G, **kw), propose(win.copy(), cur.copy(), G, **kw)  # type: ignore[arg-type]
        assert np.array_equal(a.phy2log, b.phy2log) and a.beta_pred == b.beta_pred
    ad = propose(win, cur, G, adaptive=True)
    assert ad.options == {"slack": suggest_slack(win.astype(np.float64), cur, G)}
    assert propose(win, cur, G, adaptive=True, options={"slack": 0.01}).options == {"slack": 0.01}
    first = propose(win, None, G)
    assert math.isnan(first.beta_now) and not math.isnan(first.beta_pred)


def test_propose_errors() -> None:
    win, cur = windows(), default_phy2log(G)
    with pytest.raises(ValueError, match="unknown policy"):
        propose(win, cur, G, policy="nope")
    with pytest.raises(ValueError, match="unknown method"):
        propose(win, cur, G, forecast="nope")
    with pytest.raises(ValueError, match="non-finite"):
        bad = win.astype(float)
        bad[1, 0, 0] = np.nan
        propose(bad, cur, G)
    with pytest.raises(ValueError, match="shape"):
        propose(win[:, :, :-1], cur, G)
    with pytest.raises(ValueError):
        propose(win, cur[:, :-1], G)
    with pytest.raises(TypeError, match="unknown option"):
        propose(win, cur, G, options={"bogus": 1})


def test_gate_mirrors_daemon_rule() -> None:
    p = propose(windows(), default_phy2log(G), G)
    assert gate(p, 0) == "no_change"
    assert gate(p, 5, min_gain=p.gain + 1e-9) == "gain_below_min"
    assert gate(p, 5, min_gain=p.gain - 1e-9) == ""
    assert gate(p, 5, min_gain=0.0, max_moves=4) == "moves_over_max"
    assert gate(p, 5, min_gain=0.0, max_moves=5) == ""
    first = dataclasses.replace(p, beta_now=math.nan)
    assert gate(first, 5, min_gain=1.0) == ""


def test_replay_follows_the_pipeline_and_gate() -> None:
    tr = drifting_trace(30, G.num_layers, G.num_experts, 5)
    res = replay(tr, G, interval=10, history=10, min_gain=0.0)
    cur = default_phy2log(G)
    for t, remote in zip(res.plan_windows, res.moves_remote, strict=True):
        new = propose(tr[t - 10 : t], cur, G).phy2log
        assert count_moves(cur, new, G).remote == remote
        cur = new
    # An unreachable gain keeps the default placement: no moves, static β.
    frozen = replay(tr, G, interval=10, history=10, min_gain=1.0)
    assert sum(frozen.moves_remote) == 0 and np.array_equal(frozen.beta, frozen.beta_static)


def test_stable_argsort_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    for t in range(200):
        n, b = int(rng.integers(1, 300)), int(rng.integers(1, 4))
        x = rng.integers(0, int(rng.integers(1, 9)), (b, n)).astype(np.float64)
        if t % 3 == 0:
            x = rng.random((b, n))
        if t % 5 == 0:
            x[x > 0.5] = np.inf
        assert np.array_equal(stable_argsort(x), np.argsort(x, axis=1, kind="stable"))
        idx = rng.integers(0, n, (b, 7))
        assert np.array_equal(take_rows(x, idx), np.take_along_axis(x, idx, axis=1))


def test_lpt_pack_contract() -> None:
    """Heaviest first to the least loaded open bin without the expert; replicas on distinct bins."""
    w = np.array([[9.0, 4.0, 4.0, 4.0, 3.0, 2.0]])
    e = np.array([[0, 1, 1, 1, 2, 3]])  # expert 1 has three replicas (adjacent, equal shares)
    b, pos = lpt_pack(w, e, 3, 2, 4)
    # 9 -> bin 0; the replicas of 1 -> bins 1, 2, then 0 (1 and 2 hold it); 3 -> 1 (0 is full); 2 -> 2
    assert b.tolist() == [[0, 1, 2, 0, 1, 2]]
    slots = sorted(zip(b[0].tolist(), pos[0].tolist(), strict=True))
    assert slots == [(i, j) for i in range(3) for j in range(2)]


def test_log2phy_compact_int16_path() -> None:
    rng = np.random.default_rng(1)
    for E in (5, 300, 40000):
        p = rng.integers(0, E, (3, 50))
        assert np.array_equal(log2phy_compact(p), np.argsort(p, axis=1, kind="stable"))


def test_proposal_is_frozen() -> None:
    p = propose(windows(), None, G)
    assert isinstance(p, Proposal)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.beta_pred = 0.0  # type: ignore[misc]


def test_scenarios_are_windows_on_the_forecast_scale() -> None:
    win = windows(6, seed=2).astype(np.float64)
    win[2, 1] = 0.0  # an idle (window, layer)
    fc = forecast(win, "auto")
    x = scenarios(win, fc)
    assert x.shape == (G.num_layers, 6, G.num_experts)
    np.testing.assert_allclose(x.sum(axis=2), np.broadcast_to(fc.sum(axis=1)[:, None], (G.num_layers, 6)))
    np.testing.assert_allclose(x[0, 3] / x[0, 3].sum(), win[3, 0] / win[3, 0].sum())
    assert np.array_equal(x[1, 2], fc[1])


def test_first_plan_scenario_search_lowers_per_window_peaks() -> None:
    from eplbd.placement import rank_loads

    win = windows(8, seed=5).astype(np.float64)
    cur = default_phy2log(G)
    with_s = propose(win, cur, G)
    without = propose(win, cur, G, options={"first_scenario_rounds": 0})
    validate_phy2log(with_s.phy2log, G)
    # same replica counts, lower mean over the windows of the per-window peak
    counts = [np.sort(np.apply_along_axis(np.bincount, 1, p.phy2log, minlength=G.num_experts), axis=1)
              for p in (with_s, without)]  # fmt: skip
    assert np.array_equal(*counts)
    x = scenarios(win, with_s.predicted)

    def mean_peak(p: np.ndarray) -> float:
        return float(np.mean([rank_loads(x[:, k], p, G).max(axis=1).sum() for k in range(x.shape[1])]))

    assert mean_peak(with_s.phy2log) < mean_peak(without.phy2log)
    assert np.array_equal(with_s.phy2log, propose(win.copy(), cur.copy(), G).phy2log)  # deterministic


def _slack_reference(win: np.ndarray, cur: np.ndarray, g: Geometry) -> float:
    """suggest_slack's documented formula, written plainly with the public pieces."""
    from eplbd.forecast import forecast
    from eplbd.placement import rank_loads
    from eplbd.policy import NO_ESTIMATE_SLACK

    if win.shape[0] < 2:
        return NO_ESTIMATE_SLACK
    h = max(1, win.shape[0] // 2)
    f = rank_loads(forecast(win[:-h], "ema"), cur, g)
    a = rank_loads(win[-h:].sum(axis=0), cur, g)
    fm, am = f.mean(axis=1, keepdims=True), a.mean(axis=1, keepdims=True)
    live = (fm[:, 0] > 0) & (am[:, 0] > 0)
    if not live.any():
        return NO_ESTIMATE_SLACK
    dev = np.abs(a[live] / am[live] - f[live] / fm[live]).max(axis=1)
    return float(np.clip(0.35 * dev.mean(), 0.005, 0.08))


def test_pipeline_slack_equals_suggest_slack() -> None:
    # The slack estimate (row gathers, one replica count) is the plain formula bit for bit.
    from eplbd.policy.pipeline import _suggest_slack_validated

    rng = np.random.default_rng(8)
    for g in (G, Geometry(3, 64, 16, 5, num_nodes=2), Geometry(2, 8, 8, 2)):
        L, E = g.num_layers, g.num_experts
        for it in range(12):
            W = int(rng.integers(1, 12))
            win = drifting_trace(W, L, E, seed=it).astype(np.float64)
            if it % 4 == 3:
                win[:, 0] = 0.0  # an idle layer
            if it % 6 == 5:
                win[:] = 0.0
            cur = rebalance(rng.lognormal(0, 1, (L, E)), None, g, "greedy")
            want = _slack_reference(win, cur, g)
            assert _suggest_slack_validated(win, cur, g) == want == suggest_slack(win, cur, g)
