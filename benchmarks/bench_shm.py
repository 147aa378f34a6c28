"""Shared-memory hot paths at DeepSeek-V3 shape (58 layers, 256 experts, 32 ranks x 9 slots).

    .venv/bin/python benchmarks/bench_shm.py [--runs N] [--json]

Measures, in one process against a real /dev/shm segment (owner writes, a
separate read-only attachment reads, as a rank would):

- poll:          ``latest_plan_id()`` (one aligned word)
- write_window:  ``write_window`` of one [L, E] int64 window (validation included)
- read_window:   ``read_window`` of that window (seqlock + CRC32, private copy)
- publish_read:  ``publish_plan`` + ``read_plan`` of a realistic plan

The plan comes from ``eplbd.planner.build_plan`` when that module is present
(a rebalance that moves ~20% of the slots of every layer), otherwise from a
hand-built op list of the same size. Prints median and p99 per operation and
the target; ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable

import numpy as np

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, log2phy_compact, replica_count
from eplbd.plan import OP_DTYPE, RECV, SEND, Plan
from eplbd.shm import Domain

TARGETS_US = {"poll": 2.0, "write_window": 200.0, "read_window": 200.0, "publish_read": 2000.0}


def _moved_placement(g: Geometry, rng: np.random.Generator, frac: float) -> np.ndarray:
    """A valid placement that differs from the default in about ``frac`` of the slots:
    swap the experts of random slot pairs on different ranks (keeps every invariant
    of the default placement: one replica per rank, every expert present)."""
    p = default_phy2log(g)
    L, P, S = g.num_layers, g.num_slots, g.slots_per_rank
    for l in range(L):  # per-layer setup only; not part of any timed path
        row = p[l]
        swaps = int(frac * P / 2)
        done = 0
        while done < swaps:
            a, b = rng.integers(0, P, size=2)
            ra, rb = a // S, b // S
            if ra == rb or row[a] == row[b]:
                continue
            ea, eb = row[a], row[b]
            rank_a = row[ra * S : (ra + 1) * S]
            rank_b = row[rb * S : (rb + 1) * S]
            if eb in rank_a or ea in rank_b:
                continue
            row[a], row[b] = eb, ea
            done += 1
    return p


def _synthetic_plan(plan_id: int, old: np.ndarray, new: np.ndarray, g: Geometry) -> Plan:
    """One SEND + one RECV per changed slot (the source is any old replica), CSR by (layer, rank)."""
    L, R, S = g.num_layers, g.num_ranks, g.slots_per_rank
    l_idx, p_idx = np.nonzero(old != new)
    e = new[l_idx, p_idx]
    # first old slot holding e in that layer
    order = np.argsort(old, axis=1, kind="stable")
    srt = np.take_along_axis(old, order, axis=1)
    pos = np.array([np.searchsorted(srt[l], x) for l, x in zip(l_idx, e, strict=True)], dtype=np.int64)
    src = order[l_idx, pos]
    dst_rank, src_rank = p_idx // S, src // S
    n = l_idx.size
    ops = np.zeros(2 * n, dtype=OP_DTYPE)
    ops["kind"][:n], ops["kind"][n:] = SEND, RECV
    ops["peer"][:n], ops["peer"][n:] = dst_rank, src_rank
    ops["src_slot"][:n], ops["src_slot"][n:] = src % S, src % S
    ops["dst_slot"][:n], ops["dst_slot"][n:] = p_idx % S, p_idx % S
    ops["expert"][:n], ops["expert"][n:] = e, e
    rows = np.concatenate([l_idx * R + src_rank, l_idx * R + dst_rank])
    srt_rows = np.argsort(rows, kind="stable")
    ops, rows = ops[srt_rows], rows[srt_rows]
    indptr = np.zeros(L * R + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=L * R), out=indptr[1:])
    return Plan(plan_id, 0, new, log2phy_compact(new), replica_count(new, g), indptr, ops)


def make_plan(g: Geometry, frac: float = 0.2, seed: int = 0) -> tuple[Plan, str]:
    rng = np.random.default_rng(seed)
    old = default_phy2log(g)
    new = _moved_placement(g, rng, frac)
    try:
        from eplbd.planner import build_plan  # written by the planner helper
    except ImportError:
        return _synthetic_plan(1, old, new, g), "synthetic SEND/RECV per moved slot"
    return build_plan(1, 0, old, new, g), "eplbd.planner.build_plan"


def _time(fn: Callable[[], object], runs: int, inner: int = 1) -> np.ndarray:
    """Per-call times in µs; ``inner`` calls per sample for sub-µs operations."""
    out = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        out[i] = (time.perf_counter_ns() - t0) / 1e3 / inner
    return out


def run(runs: int) -> dict[str, object]:
    g = Geometry.deepseek_v3()
    L, E = g.num_layers, g.num_experts
    name = f"eplbd.bench.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    owner = Domain.create(name, g)
    reader = Domain.attach(name, geometry=g)
    try:
        rng = np.random.default_rng(1)
        loads = rng.integers(0, 5000, size=(L, E), dtype=np.int64)
        wid = [0]

        def write_window() -> None:
            owner.write_window(wid[0], loads, epoch=0, step_begin=wid[0] * 32, step_end=wid[0] * 32 + 32)
            wid[0] += 1

        for _ in range(8):  # warm the ring pages
            write_window()
        t_write = _time(write_window, runs)
        last = wid[0] - 1
        t_read = _time(lambda: reader.read_window(last), runs)
        assert np.array_equal(reader.read_window(last).loads, loads)

        plan, plan_src = make_plan(g)
        pid = [plan.plan_id]

        def publish_read() -> None:
            p = Plan(pid[0], plan.base_epoch, plan.phy2log, plan.log2phy, plan.replica_count,
                     plan.op_indptr, plan.ops)
            owner.publish_plan(p)
            got = reader.read_plan()
            assert got is not None and got.plan_id == pid[0]
            pid[0] += 1

        for _ in range(4):
            publish_read()
        t_plan = _time(publish_read, max(runs // 4, 50))
        t_poll = _time(reader.latest_plan_id, runs, inner=100)
        results = {}
        for key, t in (("poll", t_poll), ("write_window", t_write), ("read_window", t_read),
                       ("publish_read", t_plan)):
            results[key] = {
                "median_us": float(np.median(t)),
                "p99_us": float(np.percentile(t, 99)),
                "samples": int(t.size),
                "target_us": TARGETS_US[key],
                "meets_target": bool(np.median(t) <= TARGETS_US[key]),
            }
        return {
            "geometry": g.to_dict(),
            "plan": {"source": plan_src, "n_ops": plan.num_ops, "ops_capacity": owner.layout.ops_capacity},
            "segment_bytes": owner.layout.total_size,
            "python": sys.version.split()[0],
            "results": results,
        }
    finally:
        reader.close()
        owner.close()
        owner.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000, help="samples per operation (default 2000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    res = run(args.runs)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    g = res["geometry"]
    print(f"shm benchmark, DeepSeek-V3 shape L={g['num_layers']} E={g['num_experts']} "
          f"R={g['num_ranks']} S={g['slots_per_rank']}; segment {res['segment_bytes'] / 1e6:.1f} MB")
    pl = res["plan"]
    print(f"plan: {pl['n_ops']} ops (capacity {pl['ops_capacity']}) from {pl['source']}")
    print(f"{'operation':<16}{'median µs':>12}{'p99 µs':>12}{'target µs':>12}  ok")
    for k, r in res["results"].items():
        print(f"{k:<16}{r['median_us']:>12.2f}{r['p99_us']:>12.2f}{r['target_us']:>12.0f}  "
              f"{'yes' if r['meets_target'] else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
