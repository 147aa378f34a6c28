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
  baseline; ignores ``current``. No options.

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
    "NO_ESTIMATE_SLACK",
]

DEFAULT_POLICY = "moveaware"

#: slack :func:`suggest_slack` returns when the history cannot tell the forecast error.
NO_ESTIMATE_SLACK = 0.02


def _greedy(loads: np.ndarray, current: np.ndarray | None, g: Geometry, **options: Any) -> np.ndarray:
    if options:
        raise TypeError(f"policy 'greedy' takes no options, got {sorted(options)}")
    return greedy(loads, g)


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
    ``clip(0.45 * err, 0.005, 0.08)`` (0.45 calibrated so that the DeepSeek-like
    synthetic trace, err ~0.13, gets the default 0.06; steady real traces,
    err 0.015-0.06, get 0.007-0.027). With fewer than 2 windows (or no load)
    there is no estimate: :data:`NO_ESTIMATE_SLACK` (0.02), leaning to balance.
    """
    from eplbd.policy.pipeline import _suggest_slack_validated

    win = np.asarray(windows, dtype=np.float64)
    if win.ndim != 3 or win.shape[0] < 2:
        return NO_ESTIMATE_SLACK
    cur = validate_phy2log(current, geometry, name="current")
    return _suggest_slack_validated(win, cur.astype(np.int32, copy=False), geometry)


# The pipeline calls rebalance/suggest_slack; imported last so they exist when it loads.
from eplbd.policy.pipeline import Proposal, gate, propose  # noqa: E402
