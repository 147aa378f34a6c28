"""One planning pipeline for the daemon and ``eplbd replay``: windows -> forecast -> policy -> β.

:func:`propose` is a pure function of (recent windows, placement in force,
geometry, settings). The daemon calls it on the windows it read from the ring
and ``eplbd replay`` on the trace windows before the one being measured, so
the replay figures describe exactly what the daemon computes; only the
publish gate (``min_gain``, ``max_moves_per_plan``) stays in the daemon, and
replay mirrors it with :func:`gate`.

Steps:

1. ``predicted = forecast(windows, method, alpha=forecast_alpha)`` [L, E].
2. For ``moveaware`` with ``adaptive`` (default) and no explicit ``slack``
   option: ``slack = suggest_slack(windows, current, g)`` (how far the
   forecast itself is from the load it predicts, measured on the history;
   computed here without validating ``current`` a second time).
3. ``phy2log = rebalance(predicted, current, g, policy, **options)`` (the
   policy is called directly: its inputs are validated once, here); for
   ``moveaware``, when some layer is placed from scratch (no placement in
   force, or a layer still on the engine default) and there are >= 2
   windows, with ``scenarios(windows, predicted)`` for its scenario search.
4. ``beta_now`` / ``beta_pred``: β of ``predicted`` under ``current`` / under
   ``phy2log`` (the daemon's gate compares these two).

Identical inputs give bit-identical ``phy2log``, ``predicted``, ``beta_*``
(timings aside), so daemons on different nodes agree.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from eplbd.forecast import _ema_weights, validate_windows
from eplbd.forecast import forecast as _forecast
from eplbd.geometry import Geometry
from eplbd.placement import balancedness, validate_loads, validate_phy2log

__all__ = [
    "Proposal",
    "propose",
    "gate",
    "DEFAULT_FORECAST",
    "DEFAULT_FORECAST_ALPHA",
    "DEFAULT_MIN_GAIN",
    "DEFAULT_ADAPTIVE",
    "scenarios",
]

#: Forecast the pipeline uses unless told otherwise (config ``forecast``, replay ``--forecast``):
#: "auto" fits each layer's smoothing to the history (held-out β >= "ema" on the real traces).
DEFAULT_FORECAST = "auto"
#: Smoothing of the "ema"/"share_ema"/"trend" forecasts (config ``forecast_alpha``).
DEFAULT_FORECAST_ALPHA = 0.3
#: The daemon's default publish gate (config ``min_gain``): β gain on the forecast a plan must bring.
#: 0: moveaware gates each layer itself (a layer moves only when its peak is more than its
#: tolerance above the best candidate's), so a global gate would only block small follow-ups.
DEFAULT_MIN_GAIN = 0.0
#: Whether moveaware's ``slack`` is fitted to the history (:func:`eplbd.policy.suggest_slack`).
DEFAULT_ADAPTIVE = True
#: :func:`eplbd.policy.suggest_slack`: slack = clip(SLACK_PER_ERROR x forecast error, SLACK_MIN, SLACK_MAX).
#: 0.35: the DeepSeek-like synthetic trace (forecast error ~0.14) gets slack ~0.049, which keeps
#: moveaware's remote moves per plan within 10% of the from-scratch greedy's (benchmarks/README.md).
SLACK_PER_ERROR = 0.35
SLACK_MIN, SLACK_MAX = 0.005, 0.08


@dataclasses.dataclass(frozen=True)
class Proposal:
    """What one planning step proposes; the caller decides whether to publish it.

    ``phy2log`` [L, P] int32: the new placement. ``predicted`` [L, E] float64:
    the forecast it was made for (on the scale of the sum of the windows).
    ``beta_now`` / ``beta_pred``: β of ``predicted`` under the placement in
    force / under ``phy2log`` (NaN for ``beta_now`` when there is none).
    ``options``: the policy options actually used (with the adaptive ``slack``).
    ``forecast_ms`` / ``policy_ms``: wall time of the two steps.
    """

    phy2log: np.ndarray
    predicted: np.ndarray
    beta_now: float
    beta_pred: float
    policy: str
    forecast: str
    options: dict[str, Any]
    forecast_ms: float
    policy_ms: float

    @property
    def gain(self) -> float:
        """``beta_pred - beta_now`` (NaN without a placement in force)."""
        return self.beta_pred - self.beta_now


def propose(
    windows: np.ndarray,
    current: np.ndarray | None,
    g: Geometry,
    *,
    policy: str | None = None,
    forecast: str = DEFAULT_FORECAST,
    forecast_alpha: float = DEFAULT_FORECAST_ALPHA,
    options: dict[str, Any] | None = None,
    adaptive: bool = DEFAULT_ADAPTIVE,
) -> Proposal:
    """Forecast windows [W, L, E] (oldest first) and place for it against ``current`` [L, P] or None.

    ``policy`` defaults to :data:`eplbd.policy.DEFAULT_POLICY`; ``options`` are
    passed to it (unknown ones raise TypeError). Bad windows, an invalid
    ``current`` or an unknown policy/forecast raise ValueError naming the problem.
    """
    from eplbd.policy import DEFAULT_POLICY, POLICIES

    pol = DEFAULT_POLICY if policy is None else policy
    if pol not in POLICIES:
        raise ValueError(f"unknown policy {pol!r}; choose one of {list(POLICIES)}")
    x = validate_windows(windows, shape=(g.num_layers, g.num_experts))
    cur = None if current is None else validate_phy2log(current, g, name="current")
    t0 = time.perf_counter()
    predicted = _forecast(x, forecast, alpha=forecast_alpha)
    t1 = time.perf_counter()
    opts = dict(options or {})
    if adaptive and pol == "moveaware" and "slack" not in opts and cur is not None:
        opts["slack"] = _suggest_slack_validated(x, cur, g)
    if pol == "moveaware" and x.shape[0] >= 2 and _places_from_scratch(cur, g):
        new = _moveaware_scenarios(predicted, cur, g, scenarios(x, predicted), opts)
    else:
        # ``cur`` is validated above: the policy itself, not :func:`rebalance`,
        # which would check it again (0.2 ms at the DeepSeek-V3 shape).
        new = POLICIES[pol](validate_loads(predicted, g), cur, g, **opts)
    t2 = time.perf_counter()
    beta_now = math.nan if cur is None else balancedness(predicted, cur, g)
    beta_pred = balancedness(predicted, new, g)
    ms = ((t1 - t0) * 1e3, (t2 - t1) * 1e3)
    return Proposal(new, predicted, beta_now, beta_pred, pol, forecast, opts, *ms)


def _suggest_slack_validated(x: np.ndarray, cur: np.ndarray, g: Geometry) -> float:
    """:func:`eplbd.policy.suggest_slack` (bit for bit; a test checks it) for windows ``x``
    [W, L, E] float64 and a placement ``cur`` [L, P] int32 that :func:`propose` has
    already validated: no second validation, one replica count for both rank-load
    tables, row gathers (0.3 ms instead of 0.8 ms at the DeepSeek-V3 shape, inside
    the plan time)."""
    from eplbd.policy import NO_ESTIMATE_SLACK
    from eplbd.policy._common import take_rows

    if x.shape[0] < 2:
        return NO_ESTIMATE_SLACK
    h = max(1, x.shape[0] // 2)
    L, E, R, S = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank
    idx = cur.astype(np.int64)
    flat = (idx + (np.arange(L, dtype=np.int64) * E)[:, None]).ravel()
    rc = np.maximum(np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.int32), 1)
    # forecast(x[:-h], "ema") (its default alpha, 0.3) without validating the windows again.
    older = x[:-h]
    f = np.tensordot(_ema_weights(older.shape[0], 0.3), older, axes=1)
    f = take_rows(f / rc, idx).reshape(L, R, S).sum(axis=2)
    a = take_rows(x[-h:].sum(axis=0) / rc, idx).reshape(L, R, S).sum(axis=2)
    fm, am = f.mean(axis=1, keepdims=True), a.mean(axis=1, keepdims=True)
    live = (fm[:, 0] > 0) & (am[:, 0] > 0)
    if not live.any():
        return NO_ESTIMATE_SLACK
    dev = np.abs(a[live] / am[live] - f[live] / fm[live]).max(axis=1)
    return float(np.clip(SLACK_PER_ERROR * dev.mean(), SLACK_MIN, SLACK_MAX))


def scenarios(windows: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Load scenarios [L, W, E] for moveaware's scenario search: windows [W, L, E], forecast [L, E].

    Scenario k is window k's shares of each layer's load, on the forecast's
    scale (the layer's forecast total): every window weighs the same, and the
    spread and co-movement of experts are the ones observed. An idle (window,
    layer) becomes the forecast itself.
    """
    x = np.asarray(windows, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    tot = x.sum(axis=2, keepdims=True)  # [W, L, 1]
    ft = p.sum(axis=1)[None, :, None]  # [1, L, 1]
    s = np.divide(x, tot, out=np.zeros_like(x), where=tot > 0) * ft
    s = np.where(tot > 0, s, p[None])
    return np.ascontiguousarray(s.transpose(1, 0, 2))


def _places_from_scratch(cur: np.ndarray | None, g: Geometry) -> bool:
    """Whether moveaware places some layer from scratch: no placement in force, or a layer on the default."""
    if cur is None:
        return True
    default = (np.arange(g.num_slots) % g.num_experts)[None, :]
    return bool((cur == default).all(axis=1).any())


def _moveaware_scenarios(
    predicted: np.ndarray, cur: np.ndarray | None, g: Geometry, scen: np.ndarray, opts: dict[str, Any]
) -> np.ndarray:
    """:func:`eplbd.policy.rebalance` for moveaware, with load scenarios ``scen`` [L, K, E]."""
    from eplbd.policy import MOVEAWARE_DEFAULTS
    from eplbd.policy.moveaware import moveaware

    unknown = sorted(set(opts) - set(MOVEAWARE_DEFAULTS))
    if unknown:
        known = sorted(MOVEAWARE_DEFAULTS)
        raise TypeError(f"policy 'moveaware': unknown option(s) {unknown}; known: {known}")
    return moveaware(validate_loads(predicted, g), cur, g, scenarios=scen, **opts)


def gate(proposal: Proposal, moves_total: int, min_gain: float = DEFAULT_MIN_GAIN, max_moves: int = 0) -> str:
    """The daemon's publish rule: "" to publish, else the reason it is skipped.

    "no_change" (no slot changes), "gain_below_min" (``beta_pred - beta_now <
    min_gain``), "moves_over_max" (``max_moves`` > 0 and more slots change).
    Without a placement in force (``beta_now`` NaN) only the first two apply
    as "no_change"/publish.
    """
    if moves_total == 0:
        return "no_change"
    if not math.isnan(proposal.beta_now) and proposal.gain < min_gain:
        return "gain_below_min"
    if max_moves and moves_total > max_moves:
        return "moves_over_max"
    return ""
