"""Benchmark of the transfer planner on the DeepSeek-V3 shape.

Two cases, each (old placement -> new placement):

- ``scratch``: a from-scratch reshuffle (random expert relabelling, rank and
  slot shuffle per layer), so nearly every slot changes;
- ``steady``: a steady-state rebalance, ``--changes`` redundant replicas
  re-pointed at other experts (what a move-aware policy emits per plan).

Reports the median (and min) time of ``build_plan`` and ``validate_plan``, the number of
ops, transfers, cross-node transfers, and rounds against the lower bound
(Σ over layers of the max number of distinct peers of a rank).

    .venv/bin/python benchmarks/bench_planner.py [--repeat 30] [--changes 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

from eplbd.geometry import Geometry
from eplbd.placement import count_moves, default_phy2log, replica_count, validate_phy2log
from eplbd.planner import build_plan, plan_stats, validate_plan


def scratch_placement(g: Geometry, rng: np.random.Generator) -> np.ndarray:
    """A random valid placement [L, P] far from the default one.

    Relabel experts of the default placement by a random permutation per layer
    (keeps "no two replicas on one rank"), then shuffle ranks and slots.
    """
    L, E, R, S = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank
    base = default_phy2log(g)
    perm = np.argsort(rng.random((L, E)), axis=1)
    out = np.take_along_axis(perm, base.astype(np.int64), axis=1).reshape(L, R, S)
    out = np.take_along_axis(out, np.argsort(rng.random((L, R)), axis=1)[:, :, None], axis=1)
    out = np.take_along_axis(out, np.argsort(rng.random((L, R, S)), axis=2), axis=2)
    return out.reshape(L, R * S).astype(np.int32)


def steady_placement(old: np.ndarray, g: Geometry, changes: int, rng: np.random.Generator) -> np.ndarray:
    """``old`` with ``changes`` slots re-pointed: a replica of an expert that has
    >= 2 replicas is replaced by an expert its rank lacks (placement stays valid)."""
    new = old.copy()
    L, E, S = g.num_layers, g.num_experts, g.slots_per_rank
    rc = replica_count(new, g)
    done = 0
    while done < changes:
        layer = int(rng.integers(L))
        p = int(rng.integers(g.num_slots))
        x = new[layer, p]
        if rc[layer, x] < 2:
            continue
        r = p // S
        y = int(rng.integers(E))
        if (new[layer, r * S : (r + 1) * S] == y).any():
            continue
        new[layer, p] = y
        rc[layer, x] -= 1
        rc[layer, y] += 1
        done += 1
    return new


def _times_ms(fn, repeat: int) -> tuple[float, float]:
    """(median, min) wall time in ms over ``repeat`` calls, after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def run_case(name: str, old: np.ndarray, new: np.ndarray, g: Geometry, repeat: int) -> dict:
    validate_phy2log(old, g)
    validate_phy2log(new, g)
    plan = build_plan(1, 0, old, new, g)
    validate_plan(plan, old, g)
    st = plan_stats(plan, g)
    mv = count_moves(old, new, g)
    out: dict = {
        "case": name,
        "changed_slots": int((old != new).sum()),
        "moves_remote": mv.remote,
        "moves_local": mv.local,
        "ops": st.ops,
        "transfers": st.transfers,
        "cross_node_transfers": st.cross_node,
        "copies": st.copies,
        "layers": st.layers,
        "rounds_total": st.rounds_total,
        "rounds_lower_bound_total": st.rounds_lower_bound_total,
        "rounds_max": st.rounds_max,
        "sends_max_per_rank_layer": st.sends_max,
        "staging_max": st.staging_max,
    }
    out["build_ms_median"], out["build_ms_min"] = _times_ms(lambda: build_plan(1, 0, old, new, g), repeat)
    out["validate_ms_median"], out["validate_ms_min"] = _times_ms(lambda: validate_plan(plan, old, g), repeat)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--changes", type=int, default=300, help="changed slots in the steady case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    g = Geometry.deepseek_v3()
    rng = np.random.default_rng(a.seed)
    start = scratch_placement(g, rng)
    results = [
        run_case("scratch", default_phy2log(g), start, g, a.repeat),
        run_case("steady", start, steady_placement(start, g, a.changes, rng), g, a.repeat),
    ]
    out = {"geometry": g.to_dict(), "python": platform.python_version(), "results": results}
    if a.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(f"planner on {g}")
    cols = [
        ("case", "case", 8),
        ("changed_slots", "changed", 8),
        ("transfers", "xfers", 6),
        ("cross_node_transfers", "xnode", 6),
        ("copies", "copies", 6),
        ("rounds_total", "rounds", 7),
        ("rounds_lower_bound_total", "lb", 6),
        ("sends_max_per_rank_layer", "maxsend", 7),
        ("build_ms_median", "build ms", 9),
        ("build_ms_min", "(min)", 7),
        ("validate_ms_median", "valid ms", 9),
        ("validate_ms_min", "(min)", 7),
    ]
    print(" ".join(f"{h:>{w}}" for _, h, w in cols))
    for r in results:
        print(" ".join(f"{r[k]:>{w}.2f}" if isinstance(r[k], float) else f"{r[k]:>{w}}" for k, _, w in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
