"""Synthetic expert-load traces [T, L, E]: skewed, drifting, noisy; deterministic from a seed.

The model, per layer:

- **Skew**: expert popularity is ``softmax(z)`` with log-popularities z drawn
  from N(0, ``skew``^2) (log-normal loads: a few hot experts, a long tail, as
  routing statistics of DeepSeek/Qwen-style MoE models show).
- **Drift**: z follows a mean-reverting random walk (AR(1) with coefficient
  ``1 - 1/drift_windows``), so hot experts cool down and others heat up over
  tens of windows.
- **Shifts**: every ``shift_every`` windows (0: never) the workload changes:
  a fraction ``shift_fraction`` of the experts get fresh base popularities.
- **Sampling noise**: each window routes ``tokens x top_k`` assignments,
  drawn multinomially from the popularity of that window.

Only numpy's PCG64 generator seeded with ``seed`` is used, so a (seed, shape,
parameters) tuple always gives the same trace.
"""

from __future__ import annotations

import numpy as np

__all__ = ["drifting_trace", "DEEPSEEK_LIKE"]

#: Parameters of the DeepSeek-V3-like trace the benchmarks and ``eplbd replay --synthetic`` use.
#: Calibrated (seed 0, 100 windows, Geometry.deepseek_v3(), plan every 10 windows from the
#: sum of the last 10) to the reference points the issue quotes for such a trace: no
#: balancing β 0.414 (quoted 0.41) and the DeepSeek-style greedy β 0.778 (quoted 0.776).
DEEPSEEK_LIKE: dict[str, float | int] = {
    "skew": 0.9,
    "drift_windows": 60,
    "drift_scale": 0.5,
    "shift_every": 60,
    "shift_fraction": 0.25,
    "tokens": 4096,
    "top_k": 8,
}


def drifting_trace(
    num_windows: int,
    num_layers: int,
    num_experts: int,
    seed: int = 0,
    *,
    skew: float = 1.0,
    drift_windows: float = 40.0,
    drift_scale: float = 0.5,
    shift_every: int = 60,
    shift_fraction: float = 0.25,
    tokens: int = 4096,
    top_k: int = 8,
) -> np.ndarray:
    """Token counts [T, L, E] int64 (each window and layer sums to ``tokens * top_k``).

    ``skew``: std of the base log-popularity. ``drift_windows``: time scale of
    the drift (AR(1) coefficient 1 - 1/drift_windows). ``drift_scale``: std of
    the drifting part relative to ``skew``. ``shift_every``/``shift_fraction``:
    workload shifts. ``tokens``/``top_k``: assignments per window and layer.
    """
    T, L, E = int(num_windows), int(num_layers), int(num_experts)
    if min(T, L, E) < 1:
        raise ValueError(f"drifting_trace: shape ({T}, {L}, {E}) must be positive")
    if tokens < 0 or top_k < 1 or drift_windows < 1:
        raise ValueError("drifting_trace: tokens >= 0, top_k >= 1, drift_windows >= 1 required")
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, skew, (L, E))
    rho = 1.0 - 1.0 / float(drift_windows)
    sd = skew * drift_scale
    dev = rng.normal(0.0, sd, (L, E))
    out = np.empty((T, L, E), dtype=np.int64)
    n = int(tokens) * int(top_k)
    for t in range(T):
        if shift_every and t and t % shift_every == 0:
            k = max(1, int(round(shift_fraction * E)))
            which = np.argsort(rng.random((L, E)), axis=1)[:, :k]
            np.put_along_axis(base, which, rng.normal(0.0, skew, (L, k)), axis=1)
        dev = rho * dev + np.sqrt(1.0 - rho * rho) * rng.normal(0.0, sd, (L, E))
        z = base + dev
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[t] = rng.multinomial(n, p)
    return out
