"""Rank-client benchmark: forward-thread overhead, sync bytes, step time with a rebalance in flight.

Run: ``.venv/bin/python benchmarks/bench_client.py [--json] [--quick]``

1. **Overhead** (4 gloo ranks, no model): per step, the wall time and the
   forward thread's CPU time (``time.thread_time_ns``) of the L ``record``
   calls (or one ``recorder.record_all``) plus ``step()``, minus the time spent
   waiting for collectives on sync steps. With the sync thread (default) the
   forward thread makes no collective call; it can only wait for the sync
   thread to finish the previous sync, which in practice means waiting for the
   all-gather, i.e. for a rank whose forward loop is behind (nothing else
   synchronises the ranks here: no model, no all-to-all): that wall wait
   (``ClientStats.last_collective_ns``) is subtracted. Without the sync thread
   (``sync_thread=False``, one row for comparison) the all-gather launch and
   the wait for the previous one run on the forward thread: their wall time
   and, for the CPU figure, their CPU time (measured by wrapping the client's
   gather function and its work handle) are subtracted. Median and p99 over
   all steps (sync steps included), and the sync steps alone; the sync
   thread's CPU per sync and the number of syncs at which the forward thread
   found it busy. Geometries: the test model's (L=4, S=6) and DeepSeek-V3's
   layer count and total slots on 4 ranks (L=58, E=256, S=72, P=288).
   ``timer_overhead_us``: the cost of the four clock reads around each step,
   included in every figure.
2. **Bytes per sync** (computed, not measured): what each rank contributes to
   and receives from the all-gather of ``[L*S counts | control words]`` int64,
   against a ring all-reduce of logical loads [L, E] int64 (the ring moves
   2(R-1)/R of the buffer per rank) and of physical counts [L, P].
3. **Step time** (4 gloo ranks, the tiny EP MoE model with 1 MiB experts):
   p50/p99 of rank 0's step (forward + record + step) while no plan is in
   flight vs while one is, for the asynchronous client with and without the
   sync thread and the stop-the-world mode. Plans (random placements, many moves) come from a driver thread of
   this process standing in for the daemon.

Figures depend on the machine; the report prints the CPU count and load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplbd.geometry import Geometry
from eplbd.shm import remove_prefix
from eplbd_client import ClientConfig, EplbClient
from eplbd_client import control as C
from eplbd_client.testing import NullHost, PlanDriver, TinyMoE, launch, launch_with_driver


class _TimedWork:
    """A collective's work handle whose ``wait`` adds its thread CPU time to ``acc[0]``."""

    def __init__(self, work: Any, acc: list[int]) -> None:
        self._work, self._acc = work, acc

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        tt = time.thread_time_ns
        c0 = tt()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._acc[0] += tt() - c0


def _time_collectives(client: EplbClient) -> list[int]:
    """Wrap the client's all-gather so that the forward thread's CPU time inside the
    collective calls (launch and wait) accumulates in the returned one-element list."""
    acc = [0]
    gather = client._gather

    def timed(*args: Any, **kwargs: Any) -> Any:
        tt = time.thread_time_ns
        c0 = tt()
        work = gather(*args, **kwargs)
        acc[0] += tt() - c0
        return _TimedWork(work, acc)

    client._gather = timed
    return acc


def _timer_overhead_ns(n: int = 2000) -> float:
    """Median cost of the clock reads that bracket each measured step."""
    pc, tt = time.perf_counter_ns, time.thread_time_ns
    d = np.zeros(n, dtype=np.int64)
    for i in range(n):
        t0, c0 = pc(), tt()
        t1, c1 = pc(), tt()
        d[i] = (t1 - t0 + c1 - c0) // 2
    return float(np.median(d))


def _overhead_rank(
    rank: int,
    world: int,
    g: Geometry,
    name: str,
    steps: int,
    k: int,
    how: str,
    sync_thread: bool,
    lockstep: bool = True,
) -> dict[str, Any]:
    host = NullHost(g)
    client = EplbClient(host, g, name, config=ClientConfig(sync_interval=k, sync_thread=sync_thread))
    # With a sync thread the forward thread makes no collective call: nothing to
    # subtract. Without, the collective calls' own time is taken out of the step.
    coll_cpu = [0] if sync_thread else _time_collectives(client)
    counts = [torch.randint(0, 50, (g.slots_per_rank,)) for _ in range(g.num_layers)]
    stacked = torch.stack(counts)
    record = client.record
    record_all = client.recorder.record_all
    deferred = client.record_deferred
    bare = torch.zeros_like(stacked)
    pc = time.perf_counter_ns
    tt = time.thread_time_ns
    tick = torch.zeros(1)
    wall = np.zeros(steps, dtype=np.int64)
    cpu = np.zeros(steps, dtype=np.int64)
    step_cpu = np.zeros(steps, dtype=np.int64)  # step() alone: what the client adds to torch's adds
    sync = np.zeros(steps, dtype=bool)
    for i in range(steps):
        coll_cpu[0] = 0
        t0, c0 = pc(), tt()
        if how == "bare":
            bare.add_(stacked)  # baseline: torch's own add_ in the same loop, no client
        elif how == "all":
            record_all(stacked)  # engines that count all layers in one tensor
        elif how == "deferred":
            for layer in range(g.num_layers):
                deferred(layer, counts[layer])  # added by step(): one stack + one add
        else:
            for layer in range(g.num_layers):
                record(layer, counts[layer])
        cm = tt()
        if how != "bare":
            client.step()
        t1, c1 = pc(), tt()
        step_cpu[i] = c1 - cm - coll_cpu[0]
        is_sync = (i + 1) % k == 0
        coll = client.stats.last_collective_ns if is_sync else 0
        wall[i] = t1 - t0 - coll
        cpu[i] = c1 - c0 - coll_cpu[0]
        sync[i] = is_sync
        # Stands in for the forward: its MoE all-to-alls keep the ranks in step (here one
        # tiny all-reduce over the EP group), then some compute (a sleep).
        if lockstep and world > 1:  # one rank has no peers to keep in step
            dist.all_reduce(tick, group=client.group)
        time.sleep(0.0002)
    timer = _timer_overhead_ns()
    client.close()
    s = client.stats
    return {
        "wall": wall,
        "cpu": cpu,
        "step_cpu": step_cpu,
        "sync": sync,
        "timer": timer,
        "sync_thread_cpu_per_sync_ns": s.sync_thread_cpu_ns / max(s.syncs, 1),
        "sync_thread_waits": s.sync_thread_waits,
    }


def _pct(a: np.ndarray) -> dict[str, float]:
    return {"p50_us": float(np.percentile(a, 50)) / 1e3, "p99_us": float(np.percentile(a, 99)) / 1e3}


def bench_overhead(steps: int, raw: dict[str, Any] | None = None, ranks: int = 4) -> dict[str, Any]:
    """Part 1 on ``ranks`` ranks (the per-rank shapes stay; E shrinks to fit R * S if
    needed). ``raw`` (optional) receives each case's per-step CPU arrays for the plot."""

    def geo(L: int, E: int, S: int) -> Geometry:
        return Geometry(L, min(E, ranks * S), ranks, S)

    out: dict[str, Any] = {}
    for label, g, how, threaded in (
        ("L=4 S=6, record per layer", geo(4, 16, 6), "layer", True),
        ("L=58 S=72, record per layer", geo(58, 256, 72), "layer", True),
        ("L=58 S=72, record_deferred per layer", geo(58, 256, 72), "deferred", True),
        ("L=58 S=72, record_all", geo(58, 256, 72), "all", True),
        ("L=58 S=72, torch add_ alone (no client)", geo(58, 256, 72), "bare", True),
        ("L=58 S=72, record_all, no sync thread", geo(58, 256, 72), "all", False),
    ):
        prefix = f"eplbdbench{uuid.uuid4().hex[:8]}."
        try:
            res = launch(_overhead_rank, ranks, g, prefix + "ovh", steps, 16, how, threaded, timeout=300)
        finally:
            remove_prefix(prefix)
        wall = np.concatenate([r["wall"][steps // 10 :] for r in res])  # skip warm-up
        cpu = np.concatenate([r["cpu"][steps // 10 :] for r in res])
        step_cpu = np.concatenate([r["step_cpu"][steps // 10 :] for r in res])
        sync = np.concatenate([r["sync"][steps // 10 :] for r in res])
        if raw is not None:
            raw[label] = {"cpu": cpu, "step_cpu": step_cpu, "sync": sync}
        out[label] = {
            "steps_per_rank": steps,
            "sync_interval": 16,
            "all_steps_wall": _pct(wall),
            "all_steps_cpu": _pct(cpu),
            "sync_steps_wall": _pct(wall[sync]),
            "sync_steps_cpu": _pct(cpu[sync]),
            # step() alone, forward-thread CPU (the record calls are torch's own dispatch)
            "step_only_all_steps_cpu": _pct(step_cpu),
            "step_only_sync_steps_cpu": _pct(step_cpu[sync]),
            "mean_per_step_wall_us": float(wall.mean()) / 1e3,
            "timer_overhead_us": float(np.median([r["timer"] for r in res])) / 1e3,
            "sync_thread": threaded,
            "sync_thread_cpu_per_sync_us": (
                float(np.median([r["sync_thread_cpu_per_sync_ns"] for r in res])) / 1e3 if threaded else None
            ),
            "sync_thread_waits": int(sum(r["sync_thread_waits"] for r in res)),
        }
    return out


def bytes_per_sync(g: Geometry) -> dict[str, int]:
    L, E, R, S, P = g.num_layers, g.num_experts, g.num_ranks, g.slots_per_rank, g.num_slots
    row = (L * S + C.NUM_WORDS) * 8
    ring = 2 * (R - 1) / R
    return {
        "allgather_sent_per_rank": row,
        "allgather_received_per_rank": row * (R - 1),
        "allgather_result_bytes": row * R,
        "allreduce_LxE_buffer": L * E * 8,
        "allreduce_LxE_ring_traffic_per_rank": int(ring * L * E * 8),
        "allreduce_LxP_buffer": L * P * 8,
        "allreduce_LxP_ring_traffic_per_rank": int(ring * L * P * 8),
    }


def _steptime_rank(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    g = spec["g"]
    model = TinyMoE(g, rank, hidden=spec["hidden"], ffn=spec["ffn"], tokens=spec["tokens"], seed=3)
    cfg = ClientConfig(
        sync_interval=spec["k"],
        mode=spec["mode"],
        max_staged_experts=spec["staged"],
        sync_thread=spec["sync_thread"],
    )
    client = EplbClient(model, g, spec["name"], config=cfg)
    n = spec["steps"]
    dt = np.zeros(n, dtype=np.int64)
    inflight = np.zeros(n, dtype=bool)
    for i in range(n):
        started = client.stats.plans_started
        active = client.active_plan >= 0
        t0 = time.perf_counter_ns()
        model.forward(i, client.record)
        client.step()
        dt[i] = time.perf_counter_ns() - t0
        inflight[i] = active or client.active_plan >= 0 or client.stats.plans_started != started
    ok = model.weight_mismatches() == []
    stats = dict(vars(client.stats))
    client.close()
    return {
        "dt": dt,
        "inflight": inflight,
        "ok": ok,
        "committed": stats["plans_committed"],
        "aborted": stats["plans_aborted"],
        "stw_seconds": stats["stw_seconds"],
    }


#: (label, mode, sync_thread) of the step-time runs.
STEP_MODES = (("async", "async", True), ("async-inline", "async", False), ("stw", "stw", False))


def bench_steptime(steps: int, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    g = Geometry(4, 16, 4, 6)
    out: dict[str, Any] = {"expert_bytes": 2 * 256 * 512 * 4, "tokens": 256, "sync_interval": 4}
    for label, mode, threaded in STEP_MODES:
        prefix = f"eplbdbench{uuid.uuid4().hex[:8]}."
        name = prefix + "step"
        spec = {
            "g": g,
            "hidden": 256,
            "ffn": 512,
            "tokens": 256,
            "k": 4,
            "mode": mode,
            "sync_thread": threaded,
            "staged": 24,
            "name": name,
            "steps": steps,
        }
        driver = PlanDriver(
            name,
            g,
            plans=10_000,
            source="random",
            gap_windows=3,
            seed=1,
            first_window=steps // 8,
            timeout=600,
        )
        try:
            res = launch_with_driver(_steptime_rank, 4, spec, driver=driver, timeout=600)
        finally:
            remove_prefix(prefix)
        r0 = res[0]
        warm = 10
        dt, fl = r0["dt"][warm:], r0["inflight"][warm:]
        if raw is not None:
            raw[label] = {"dt": dt, "inflight": fl}
        out[label] = {
            "no_plan": {**_pct(dt[~fl]), "steps": int((~fl).sum())},
            "plan_in_flight": {**_pct(dt[fl]), "steps": int(fl.sum())} if fl.any() else None,
            "max_step_us": float(dt.max()) / 1e3,
            "plans_committed": r0["committed"],
            "plans_aborted": r0["aborted"],
            "weights_exact_all_ranks": all(r["ok"] for r in res),
            "stw_forward_seconds": r0["stw_seconds"],
        }
    return out


def plot(
    raw_ovh: dict[str, Any], raw_step: dict[str, Any], path: str, machine: dict[str, Any], ranks: int = 4
) -> None:
    """Left: CDF of the forward thread's CPU per step (record + step) for each overhead case,
    and of step() alone at sync steps (dashed). Right: CDF of rank 0's step time per mode,
    plan in flight dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if raw_step else 1, figsize=(13 if raw_step else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    for i, (label, v) in enumerate(raw_ovh.items()):
        color = f"C{i}"
        sync = v["sync"]
        for x, style, what in (
            (v["cpu"], "-", "record + step, all steps"),
            (v["step_cpu"][sync], "--", "step() alone, sync steps"),
        ):
            x = np.sort(x) / 1e3
            ax.plot(x, np.arange(1, x.size + 1) / x.size, style, color=color, label=f"{label}: {what}")
    ax.axvline(20, color="grey", lw=0.8)
    ax.text(20, 0.02, " 20 µs target", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("forward-thread CPU per step (µs)")
    ax.set_ylabel("fraction of steps")
    ax.set_title(f"client cost on the forward thread ({ranks} ranks, K=16)")
    ax.legend(fontsize=6.5, loc="lower right")
    if raw_step:
        ax = axes[0][1]
        for i, (label, v) in enumerate(raw_step.items()):
            fl = v["inflight"]
            for sel, style, what in ((~fl, "-", "no plan"), (fl, "--", "plan in flight")):
                x = np.sort(v["dt"][sel]) / 1e6
                if x.size:
                    y = np.arange(1, x.size + 1) / x.size
                    ax.plot(x, y, style, color=f"C{i}", label=f"{label}, {what}")
        ax.set_xlabel("rank 0 step time (ms)")
        ax.set_title("tiny EP MoE, 4 ranks: step time")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"bench_client.py — {machine['cpus']} CPUs, load {machine['loadavg_1m']:.1f}, "
        f"torch {machine['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(us: float) -> str:
    return f"{us / 1e3:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--json-out", metavar="PATH", help="also write the JSON report to PATH")
    ap.add_argument("--overhead-only", action="store_true", help="only part 1 (and the computed bytes)")
    ap.add_argument(
        "--ranks",
        type=int,
        default=4,
        choices=(1, 2, 3, 4),
        help="ranks of part 1 (default 4; 1: no contention)",
    )
    ap.add_argument("--steptime-only", action="store_true", help="only part 3 (and the computed bytes)")
    ap.add_argument("--plot", metavar="PNG", help="draw the per-step distributions of parts 1 and 3 into PNG")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n_ovh, n_step = (800, 160) if args.quick else (4000, 400)
    raw_ovh: dict[str, Any] = {}
    raw_step: dict[str, Any] = {}
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "torch": torch.__version__},
        "overhead_record_plus_step": None
        if args.steptime_only
        else bench_overhead(n_ovh, raw_ovh, args.ranks),
        "bytes_per_sync": {
            "deepseek_v3 (L=58 E=256 R=32 S=9)": bytes_per_sync(Geometry.deepseek_v3()),
            "test model (L=4 E=16 R=4 S=6)": bytes_per_sync(Geometry(4, 16, 4, 6)),
        },
        "step_time": None if args.overhead_only else bench_steptime(n_step, raw_step),
    }
    report["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    if args.plot:
        plot(raw_ovh, raw_step, args.plot, report["machine"], args.ranks)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        m = report["machine"]
        print(
            f"machine: {m['cpus']} CPUs, load {m['loadavg_1m']:.1f} -> {m['loadavg_1m_end']:.1f}, "
            f"torch {m['torch']}"
        )
        print(
            f"forward-thread overhead of record (L calls) + step(), {args.ranks} rank(s), "
            "excluding the collective (µs):"
        )
        for label, v in (report["overhead_record_plus_step"] or {}).items():
            a, s = v["all_steps_wall"], v["sync_steps_wall"]
            ac, sc = v["all_steps_cpu"], v["sync_steps_cpu"]
            print(
                f"  {label:28s} all steps wall p50 {a['p50_us']:.1f} p99 {a['p99_us']:.1f} "
                f"mean {v['mean_per_step_wall_us']:.1f} | cpu p50 {ac['p50_us']:.1f} p99 {ac['p99_us']:.1f} "
                f"| sync steps wall p50 {s['p50_us']:.1f} p99 {s['p99_us']:.1f} "
                f"cpu p50 {sc['p50_us']:.1f} p99 {sc['p99_us']:.1f} "
                f"(timer {v['timer_overhead_us']:.1f}) | step() alone cpu all p50 "
                f"{v['step_only_all_steps_cpu']['p50_us']:.1f} "
                f"p99 {v['step_only_all_steps_cpu']['p99_us']:.1f}, "
                f"sync p50 {v['step_only_sync_steps_cpu']['p50_us']:.1f} "
                f"p99 {v['step_only_sync_steps_cpu']['p99_us']:.1f}"
                + (
                    f" | sync thread cpu/sync {v['sync_thread_cpu_per_sync_us']:.1f}, "
                    f"waits {v['sync_thread_waits']}"
                    if v["sync_thread"]
                    else ""
                )
            )
        print("bytes per sync per rank (computed):")
        for label, v in report["bytes_per_sync"].items():
            print(
                f"  {label}: all-gather sends {v['allgather_sent_per_rank']} B, receives "
                f"{v['allgather_received_per_rank']} B; ring all-reduce moves "
                f"{v['allreduce_LxE_ring_traffic_per_rank']} B for [L,E], "
                f"{v['allreduce_LxP_ring_traffic_per_rank']} B for [L,P]"
            )
        st = report["step_time"]
        if st is not None:
            print("step time, rank 0 (ms):")
        for mode, _, _ in STEP_MODES if st is not None else ():
            v = st[mode]
            a, b = v["no_plan"], v["plan_in_flight"]
            line = f"  {mode:12s} no plan p50 {_ms(a['p50_us'])} p99 {_ms(a['p99_us'])} ({a['steps']} steps)"
            if b:
                line += f" | in flight p50 {_ms(b['p50_us'])} p99 {_ms(b['p99_us'])} ({b['steps']} steps)"
            line += f" | max {_ms(v['max_step_us'])} | plans {v['plans_committed']}"
            print(line + f" | exact {v['weights_exact_all_ranks']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
