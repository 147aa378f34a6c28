"""Load forecast: recent windows of expert loads -> predicted load. Pure numpy.

``forecast(windows, method)`` takes the last W windows ``[W, L, E]`` (oldest
first, as ``Domain.read_windows`` returns them) and predicts the load of each
logical expert ``[L, E]`` float64 for the period the next plan will be in force.

Scale: every method returns its prediction on the scale of the **sum of the
windows it used** (``history`` of them), so methods are comparable: for W
identical windows every method returns their sum. Placement policies and β are
scale-free per layer; the scale only matters to code that compares forecasts.

Methods:

- ``"sum"``: Σ of the last W windows. Most robust to noise, slowest to follow drift.
- ``"ema"``: exponential moving average of the windows, weight ``alpha`` on the
  newest, ``alpha·(1-alpha)^k`` on the k-th older (weights renormalised over the
  W windows, then scaled to W).
- ``"share_ema"``: the EMA of each window's per-layer *shares* (load / layer
  total), times the layer's total over the windows. A window with a big batch
  does not outweigh the others, so the expert mix is followed, not the volume.
- ``"trend"``: Holt's linear smoothing of per-layer shares (level ``alpha``,
  slope ``beta``), extrapolated ``horizon`` windows ahead, clipped at 0 and
  renormalised: follows loads that drift steadily in one direction.
- ``"auto"``: per layer, picks the smoothing factor (from ``alphas``, 0 meaning
  the plain mean) whose share forecasts had the least squared error predicting
  each window from the ones before it, within the given windows, then forecasts
  shares with it. Noisy but stationary loads get the mean (like "sum"), drifting
  ones a fast EMA: no tuning per workload. Recursion: ``m_0 = s_0``,
  ``m_t = a_t·s_t + (1 - a_t)·m_(t-1)`` with ``a_t = max(alpha, 1/(t+1))``.

Bad input — NaN/inf or negative counts, a wrong number of dimensions, no
windows, an unknown method, out-of-range parameters — raises ValueError naming
the problem.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["METHODS", "DEFAULT_METHOD", "AUTO_ALPHAS", "forecast", "validate_windows", "auto_alpha"]

METHODS = ("sum", "ema", "share_ema", "trend", "auto")
#: smoothing factors "auto" chooses from, smoothest first (0 = running mean).
AUTO_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
DEFAULT_METHOD = "ema"


def validate_windows(
    windows: np.ndarray | Sequence[np.ndarray], name: str = "windows", shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Check windows [W, L, E] (W >= 1, finite, >= 0, optional [L, E] ``shape``);
    return them as float64."""
    try:
        a = np.asarray(windows)
    except ValueError as exc:  # ragged sequence
        raise ValueError(f"{name}: windows of different shapes ({exc})") from None
    if a.ndim != 3:
        raise ValueError(f"{name}: expected [windows, layers, experts] (3 dims), got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: no windows")
    if shape is not None and a.shape[1:] != tuple(shape):
        raise ValueError(f"{name}: window shape {a.shape[1:]} != (layers, experts) = {tuple(shape)}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name}: dtype {a.dtype} is not numeric")
    a = a.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        w, l, e = np.argwhere(~finite)[0]
        raise ValueError(f"{name}: non-finite value {a[w, l, e]} in window {w}, layer {l}, expert {e}")
    if (a < 0).any():
        w, l, e = np.argwhere(a < 0)[0]
        raise ValueError(f"{name}: negative value {a[w, l, e]} in window {w}, layer {l}, expert {e}")
    return a


def _unit_interval(v: float, name: str, *, closed_low: bool = False) -> float:
    v = float(v)
    ok = (0.0 <= v <= 1.0) if closed_low else (0.0 < v <= 1.0)
    if not ok:
        lo = "[0" if closed_low else "(0"
        raise ValueError(f"forecast: {name} must be in {lo}, 1], got {v}")
    return v


def _ema_weights(W: int, alpha: float) -> np.ndarray:
    """[W] weights, oldest first, newest = alpha, summing to W."""
    age = np.arange(W - 1, -1, -1, dtype=np.float64)
    w = alpha * (1.0 - alpha) ** age
    return w * (W / w.sum())


def _shares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[W, L, E] -> (shares [W, L, E] of each window's layer total, totals [W, L]).

    An idle (window, layer) gets the mean share of that layer's busy windows, or
    uniform shares if the layer never had load, so it neither pulls nor pushes.
    """
    tot = x.sum(axis=2)  # [W, L]
    busy = tot > 0
    s = np.divide(x, tot[:, :, None], out=np.zeros_like(x), where=busy[:, :, None])
    nb = busy.sum(axis=0)  # [L]
    fill = np.where(nb[:, None] > 0, s.sum(axis=0) / np.maximum(nb, 1)[:, None], 1.0 / x.shape[2])
    s = np.where(busy[:, :, None], s, fill[None])
    return s, tot


def forecast(
    windows: np.ndarray | Sequence[np.ndarray],
    method: str = DEFAULT_METHOD,
    *,
    alpha: float = 0.3,
    beta: float = 0.1,
    horizon: float = 1.0,
    history: int | None = None,
    alphas: Sequence[float] = AUTO_ALPHAS,
) -> np.ndarray:
    """Predict the load of each expert [L, E] float64 from windows [W, L, E] (oldest first).

    ``method``: one of :data:`METHODS` (see the module docstring). ``alpha`` in
    (0, 1]: EMA/level weight of the newest window (``alpha=1`` is "last window
    only"). ``beta`` in [0, 1]: trend smoothing ("trend" only). ``horizon`` >= 0:
    windows ahead to extrapolate ("trend" only). ``history``: use only the
    newest ``history`` windows (default all). ``alphas``: candidates of "auto"
    (each in [0, 1]). The result is on the scale of the sum of the windows used.
    """
    if method not in METHODS:
        raise ValueError(f"forecast: unknown method {method!r}; choose one of {list(METHODS)}")
    x = validate_windows(windows)
    if history is not None:
        if isinstance(history, bool) or not isinstance(history, int | np.integer) or history < 1:
            raise ValueError(f"forecast: history must be an int >= 1, got {history!r}")
        x = x[-int(history) :]
    alpha = _unit_interval(alpha, "alpha")
    W = x.shape[0]
    if method == "sum":
        return x.sum(axis=0)
    if method == "ema":
        return np.tensordot(_ema_weights(W, alpha), x, axes=1)
    s, tot = _shares(x)
    layer_total = tot.sum(axis=0)  # [L]
    if method == "share_ema":
        share = np.tensordot(_ema_weights(W, alpha) / W, s, axes=1)
    elif method == "auto":
        share = _auto(s, _alphas(alphas))[0]
    else:  # trend
        beta = _unit_interval(beta, "beta", closed_low=True)
        horizon = float(horizon)
        if not (np.isfinite(horizon) and horizon >= 0):
            raise ValueError(f"forecast: horizon must be a finite number >= 0, got {horizon}")
        level, slope = s[0].copy(), np.zeros_like(s[0])
        for w in range(1, W):
            prev = level
            level = alpha * s[w] + (1.0 - alpha) * (level + slope)
            slope = beta * (level - prev) + (1.0 - beta) * slope
        share = np.maximum(level + horizon * slope, 0.0)
        z = share.sum(axis=1, keepdims=True)
        # All shares clipped away cannot happen for a busy layer (shares sum to 1
        # and the slopes sum to 0), but guard the division anyway.
        share = np.divide(share, z, out=np.full_like(share, 1.0 / share.shape[1]), where=z > 0)
    return share * layer_total[:, None]


def _alphas(alphas: Sequence[float]) -> np.ndarray:
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all() or (a < 0).any() or (a > 1).any():
        raise ValueError(f"forecast: alphas must be a non-empty list of numbers in [0, 1], got {alphas!r}")
    return a


def _auto(s: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shares [W, L, E] -> (forecast shares [L, E], chosen alpha index [L]).

    Vectorised over candidates: m [C, L, E]; the squared one-step error of each
    candidate is summed over windows 1..W-1 per layer; ties go to the first
    (smoothest) candidate, so the choice is deterministic.
    """
    W = s.shape[0]
    m = np.broadcast_to(s[0], (alphas.size, *s.shape[1:])).copy()
    err = np.zeros((alphas.size, s.shape[1]))
    # Same operations as err += ((s_t - m) ** 2).sum(-1); m = a s_t + (1 - a) m,
    # into two reused [C, L, E] buffers (a [7, 58, 256] temporary is 0.8 MB).
    d, tmp = np.empty_like(m), np.empty_like(m)
    for t in range(1, W):
        np.subtract(s[t][None], m, out=d)
        np.square(d, out=d)
        err += d.sum(axis=2)
        a = np.maximum(alphas, 1.0 / (t + 1))[:, None, None]
        np.multiply(a, s[t][None], out=tmp)
        np.multiply(1.0 - a, m, out=m)
        np.add(tmp, m, out=m)
    best = np.argmin(err, axis=0)  # [L]
    return m[best, np.arange(s.shape[1])], best


def auto_alpha(
    windows: np.ndarray | Sequence[np.ndarray], alphas: Sequence[float] = AUTO_ALPHAS
) -> np.ndarray:
    """The smoothing factor ``"auto"`` picks for each layer, [L] float64 (for logs/metrics)."""
    s, _ = _shares(validate_windows(windows))
    a = _alphas(alphas)
    return a[_auto(s, a)[1]]
