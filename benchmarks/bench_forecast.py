"""Which load forecast gives the best held-out balance on a drifting trace?

Replays a synthetic drifting, skewed trace [T, L, E] (or ``--trace X.npy``) on
the DeepSeek-V3 shape: at each window β is measured under the placement in
force; every ``--interval`` windows the loads are forecast from the previous
``--history`` windows (never the window being measured) and the placement is
recomputed with ``eplbd.policy.rebalance``. Reports per forecast method the
mean held-out β, remote moves per plan and the forecast error (L1 distance of
predicted per-layer shares to the shares of the next ``interval`` windows).
``oracle`` plans from the true loads of the next interval (an upper reference).

    .venv/bin/python benchmarks/bench_forecast.py [--windows 200] [--layers 58] [--json]
    .venv/bin/python benchmarks/bench_forecast.py --trace T.npy --ranks 16 --slots-per-rank 9 --nodes 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from eplbd.forecast import forecast
from eplbd.geometry import Geometry
from eplbd.placement import balancedness, count_moves, default_phy2log


def drifting_trace(
    g: Geometry,
    windows: int,
    rng: np.random.Generator,
    *,
    tokens: int = 8192,
    top_k: int = 8,
    skew: float = 1.1,
    drift: float = 0.12,
    rho: float = 0.985,
) -> np.ndarray:
    """Synthetic token counts [T, L, E] int64: Zipf-skewed expert popularity per
    layer (random order) plus an AR(1) random walk on the logits (``drift`` per
    window, mean reversion ``rho``), batch size varying ±50% per window."""
    L, E = g.num_layers, g.num_experts
    base = -skew * np.log(np.arange(1, E + 1, dtype=np.float64))
    base = np.take_along_axis(np.broadcast_to(base, (L, E)), np.argsort(rng.random((L, E)), axis=1), axis=1)
    out = np.empty((windows, L, E), dtype=np.int64)
    stat_sd = drift / np.sqrt(1 - rho**2)
    d = rng.normal(0.0, stat_sd, (L, E))
    for t in range(windows):
        d = rho * d + rng.normal(0.0, drift, (L, E))
        logit = base + d
        p = np.exp(logit - logit.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        n = int(tokens * top_k * rng.uniform(0.5, 1.5))
        out[t] = rng.poisson(p * n)
    return out


def replay(
    trace: np.ndarray, g: Geometry, method: str, interval: int, history: int, policy: str, **fopts: Any
) -> dict[str, Any]:
    from eplbd.policy import rebalance

    T = trace.shape[0]
    cur = default_phy2log(g)
    betas, moves, errs, ms = [], [], [], []
    for t in range(T):
        if t >= history and (t - history) % interval == 0:
            nxt = trace[t : t + interval].sum(axis=0).astype(np.float64)
            pred = nxt if method == "oracle" else forecast(trace[t - history : t], method, **fopts)
            share = pred / np.maximum(pred.sum(axis=1, keepdims=True), 1e-300)
            true = nxt / np.maximum(nxt.sum(axis=1, keepdims=True), 1e-300)
            errs.append(float(np.abs(share - true).sum(axis=1).mean()))
            t0 = time.perf_counter()
            new = rebalance(pred, cur, g, policy)
            ms.append((time.perf_counter() - t0) * 1e3)
            moves.append(count_moves(cur, new, g).remote)
            cur = new
        if t >= history:
            betas.append(balancedness(trace[t], cur, g))
    return {
        "method": method,
        "options": fopts,
        "beta_mean": float(np.mean(betas)),
        "moves_remote_per_plan_steady": float(np.mean(moves[1:])) if len(moves) > 1 else 0.0,
        "share_l1_error": float(np.mean(errs)),
        "plans": len(moves),
        "policy_ms_median": float(np.median(ms)),
    }


CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    ("oracle", {}),
    ("sum", {}),
    ("ema", {"alpha": 0.3}),
    ("ema", {"alpha": 0.5}),
    ("ema", {"alpha": 0.8}),
    ("share_ema", {"alpha": 0.5}),
    ("trend", {"alpha": 0.5, "beta": 0.1, "horizon": 3.0}),
    ("auto", {}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--policy", default="moveaware")
    ap.add_argument("--layers", type=int, default=58, help="MoE layers (DeepSeek-V3 has 58)")
    ap.add_argument("--trace", help="replay this [T, L, E] .npy instead of the synthetic trace")
    ap.add_argument("--ranks", type=int, default=32)
    ap.add_argument("--slots-per-rank", type=int, default=9)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--drift", type=float, default=0.12, help="synthetic: logit random-walk step")
    ap.add_argument(
        "--deepseek-like",
        action="store_true",
        help="use eplbd.synthetic.drifting_trace with its DEEPSEEK_LIKE parameters instead",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.trace:
        trace = np.load(a.trace)
        g = Geometry(trace.shape[1], trace.shape[2], a.ranks, a.slots_per_rank, a.nodes)
    else:
        g = Geometry(a.layers, 256, a.ranks, a.slots_per_rank, a.nodes, num_groups=8)
        if a.deepseek_like:
            from eplbd.synthetic import DEEPSEEK_LIKE
            from eplbd.synthetic import drifting_trace as shared_trace

            trace = shared_trace(a.windows, g.num_layers, g.num_experts, a.seed, **DEEPSEEK_LIKE)  # type: ignore[arg-type]
        else:
            trace = drifting_trace(g, a.windows, np.random.default_rng(a.seed), drift=a.drift)
    rows = [replay(trace, g, m, a.interval, a.history, a.policy, **o) for m, o in CANDIDATES]
    out = {
        "geometry": g.to_dict(),
        "trace": a.trace
        or (
            f"eplbd.synthetic DEEPSEEK_LIKE seed={a.seed} windows={a.windows}"
            if a.deepseek_like
            else f"synthetic drifting seed={a.seed} windows={a.windows} drift={a.drift}"
        ),
        "interval": a.interval,
        "history": a.history,
        "policy": a.policy,
        "results": rows,
    }
    if a.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(f"{out['trace']}, interval {a.interval}, history {a.history}, policy {a.policy}")
    print(f"{'method':<10} {'options':<40} {'beta':>7} {'moves/plan':>10} {'share L1':>9}")
    for r in rows:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items())
        print(
            f"{r['method']:<10} {opts:<40} {r['beta_mean']:>7.4f} "
            f"{r['moves_remote_per_plan_steady']:>10.1f} {r['share_l1_error']:>9.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
