"""Placement policies: (loads, placement in force, geometry) -> new placement. Pure numpy.

The stable entry points are :func:`rebalance` (one policy call) and
:func:`propose` (:mod:`eplbd.policy.pipeline`: forecast + policy + β, what the
daemon and ``eplbd replay`` both run)::

    phy2log = rebalance(loads, current, geometry, policy="moveaware", **options)

- ``loads`` [L, E]: predicted load of each logical expert (finite, >= 0).
- ``current`` [L, P] int or None: the placement in force (None: first plan).
- returns [L, P] int32 ``phy2log`` satisfying every invariant of
  :func:`eplbd.placement.validate_phy2log`.

Policies:

- ``"moveaware"`` (default, :mod:`eplbd.policy.moveaware`): keeps what is still
  wanted, fixes replica deficits, local search, per-layer gain gate.
  Options: see :data:`eplbd.policy.moveaware.DEFAULTS`.
- ``"greedy"`` (:mod:`eplbd.policy.greedy`): DeepSeek-EPLB-style from-scratch
  baseline; ignores ``current``. One option, ``hierarchical`` (default True:
  groups packed onto nodes where that applies; False/0: global packing over all
  ranks, SGLang's global variant).

Identical inputs give bit-identical outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from eplbd.geometry import Geometry
from eplbd.placement import validate_loads, validate_phy2log
from eplbd.policy.greedy import greedy
from eplbd.policy.moveaware import DEFAULTS as MOVEAWARE_DEFAULTS
from eplbd.policy.moveaware import moveaware

__all__ = [
    "Proposal",
    "propose",
    "gate",
    "POLICIES",
    "DEFAULT_POLICY",
    "rebalance",
    "suggest_slack",
    "MOVEAWARE_DEFAULTS",
    "GREEDY_DEFAULTS",
    "NO_ESTIMATE_SLACK",
]

DEFAULT_POLICY = "moveaware"

#: slack :func:`suggest_slack` returns when the history cannot tell the forecast error.
NO_ESTIMATE_SLACK = 0.02


#: Options of policy "greedy" and their defaults.
GREEDY_DEFAULTS: dict[str, bool] = {"hierarchical": True}


def _greedy(loads: np.ndarray, current: np.ndarray | None, g: Geometry, **options: Any) -> np.ndarray:
    unknown = sorted(set(options) - set(GREEDY_DEFAULTS))
    if unknown:
        raise TypeError(f"policy 'greedy': unknown option(s) {unknown}; known: {sorted(GREEDY_DEFAULTS)}")
    hier = options.get("hierarchical", GREEDY_DEFAULTS["hierarchical"])
    # Accept bools and the 0/1 that command-line KEY=VALUE options parse to, nothing else.
    if not isinstance(hier, bool | int | np.integer | np.bool_) or hier not in (0, 1):
        raise TypeError(f"policy 'greedy': option hierarchical must be true/false (or 1/0), got {hier!r}")
    return greedy(loads, g, hierarchical=bool(hier))


def _moveaware(loads: np.ndarray, current: np.ndarray | None, g: Geometry, **options: Any) -> np.ndarray:
    unknown = sorted(set(options) - set(MOVEAWARE_DEFAULTS))
    if unknown:
        known = sorted(MOVEAWARE_DEFAULTS)
        raise TypeError(f"policy 'moveaware': unknown option(s) {unknown}; known: {known}")
    return moveaware(loads, current, g, **options)


#: name -> implementation ``(loads, current, g, **options) -> phy2log``; names in a fixed order.
POLICIES: dict[str, Callable[..., np.ndarray]] = {"moveaware": _moveaware, "greedy": _greedy}


def rebalance(
    loads: np.ndarray,
    current: np.ndarray | None,
    geometry: Geometry,
    policy: str = DEFAULT_POLICY,
    **options: Any,
) -> np.ndarray:
    """Compute a new placement [L, P] int32 for predicted ``loads`` [L, E].

    Raises ValueError naming the problem for NaN/negative/wrongly shaped loads,
    an invalid ``current`` placement (:class:`eplbd.placement.PlacementError`)
    or an unknown policy; TypeError for unknown options.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    w = validate_loads(loads, geometry)
    cur = None if current is None else validate_phy2log(current, geometry, name="current")
    return POLICIES[policy](w, cur, geometry, **options)


def suggest_slack(windows: np.ndarray, current: np.ndarray, geometry: Geometry) -> float:
    """A ``slack`` for moveaware matched to how predictable the load is: [W, L, E], [L, P] -> float.

    Balancing ranks on the forecast much tighter than the forecast's own error
    buys little held-out balance for many moves; much looser leaves balance on
    the table when the load is steady. The error is measured on the history
    itself: the EMA forecast of the older half of the windows against the sum
    of the newer half, as rank loads under ``current`` relative to the layer
    mean; ``err`` = mean over layers of the largest rank deviation. Returns
    ``clip(0.35 * err, 0.005, 0.08)``
    (:data:`eplbd.policy.pipeline.SLACK_PER_ERROR` and its bounds). 0.35 spends
    the move budget (10% of the from-scratch greedy's moves) on the DeepSeek-like
    synthetic trace, err ~0.14: slack ~0.049, ~1,420 remote moves per plan, held-out
    β +0.0025 over the former 0.45 (slack 0.063, ~1,230 moves) on seeds not used
    to choose it; steady real traces, err 0.015-0.06, get 0.005-0.021, which
    changes their held-out β by at most 0.0003. With fewer than 2 windows (or no
    load) there is no estimate: :data:`NO_ESTIMATE_SLACK` (0.02), leaning to balance.
    """
    from eplbd.policy.pipeline import _suggest_slack_validated

    win = np.asarray(windows, dtype=np.float64)
    if win.ndim != 3 or win.shape[0] < 2:
        return NO_ESTIMATE_SLACK
    cur = validate_phy2log(current, geometry, name="current")
    return _suggest_slack_validated(win, cur.astype(np.int32, copy=False), geometry)


# The pipeline calls rebalance/suggest_slack; imported last so they exist when it loads.
from eplbd.policy.pipeline import Proposal, gate, propose  # noqa: E402
