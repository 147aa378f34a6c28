"""End-to-end benchmark: `eplbd demo` (live daemon + 4 gloo ranks, eplbd vs stop-the-world), repeated.

Run: ``.venv/bin/python benchmarks/bench_demo.py [--runs 3] [--json] [-- <eplbd demo options>]``

Each run is ``python -m eplbd.cli demo --json --quiet <options>`` in a fresh
process (defaults: what ``make demo`` runs). Step-time percentiles on a shared
CPU machine move from run to run with whatever else runs there, so the report
gives the median and the range over the runs of every figure, and the load
average seen at the start and end of each run. Routing is deterministic for a
seed, so β, plans and moves vary little (only with the sync at which a plan
happens to land); step times vary with the machine's load.

Figures reported (see ``eplbd demo --help`` and the eplbd.demo docstring):
β before/after balancing and without it, plans applied, remote moves, MiB moved,
step time p50/p99 for eplbd and stop-the-world, eplbd's p99 with a plan in
flight vs with none, stop-the-world's longest pause, whether outputs matched the
unbalanced model, the wall time of a whole demo (both modes, start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

FIGURES: list[tuple[str, str]] = [
    ("beta_before", "{:.3f}"),
    ("beta_after", "{:.3f}"),
    ("beta_unbalanced_after", "{:.3f}"),
    ("stw_beta_after", "{:.3f}"),
    ("plans_applied", "{:.0f}"),
    ("stw_plans_applied", "{:.0f}"),
    ("moves_remote", "{:.0f}"),
    ("mib_moved", "{:.1f}"),
    ("step_ms_p50", "{:.1f}"),
    ("step_ms_p99", "{:.1f}"),
    ("step_ms_p99_in_flight", "{:.1f}"),
    ("step_ms_p99_idle", "{:.1f}"),
    ("in_flight_vs_idle_pct", "{:+.1f}"),
    ("stw_step_ms_p50", "{:.1f}"),
    ("stw_step_ms_p99", "{:.1f}"),
    ("stw_pause_ms_max", "{:.0f}"),
    ("wall_s_total", "{:.1f}"),
    ("loadavg_before", "{:.1f}"),
]


def one_run(demo_args: list[str], timeout: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "eplbd.cli", "demo", "--json", "--quiet", *demo_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"eplbd demo failed (status {r.returncode}):\n{r.stderr}")
    s = json.loads(r.stdout)
    s["wall_s_process"] = wall
    s["mib_moved"] = s["bytes_moved"] / 2**20
    s["loadavg_before"] = s["machine"]["loadavg_before"]
    a_in, a_idle = s["step_ms_p99_in_flight"], s["step_ms_p99_idle"]
    s["in_flight_vs_idle_pct"] = 100 * (a_in / a_idle - 1) if a_in is not None and a_idle else None
    return s


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        i = argv.index("--")
        argv, demo_args = argv[:i], argv[i + 1 :]
    else:
        demo_args = []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="demo runs (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run before giving up")
    p.add_argument("--json", action="store_true", help="print the runs and the medians as JSON")
    args = p.parse_args(argv)
    runs = []
    for i in range(args.runs):
        s = one_run(demo_args, args.timeout)
        runs.append(s)
        print(
            f"run {i + 1}/{args.runs}: {s['wall_s_total']:.1f} s, load {s['loadavg_before']:.1f}, "
            f"outputs_match={s['outputs_match']}",
            file=sys.stderr,
            flush=True,
        )
    table: dict[str, dict[str, float | None]] = {}
    for key, _ in FIGURES:
        vals = [r[key] for r in runs if r.get(key) is not None]
        table[key] = {
            "median": statistics.median(vals) if vals else None,
            "min": min(vals) if vals else None,
            "max": max(vals) if vals else None,
        }
    cfg = runs[0]["config"]
    machine = f"{os.cpu_count()} CPUs, {os.uname().machine}, {os.uname().sysname} {os.uname().release}"
    if args.json:
        print(
            json.dumps(
                {"machine": machine, "demo_args": demo_args, "config": cfg, "figures": table, "runs": runs},
                default=str,
            )
        )
        return 0
    print(f"eplbd demo x{args.runs}  (args: {' '.join(demo_args) or 'defaults'})  machine: {machine}")
    print(
        f"  {cfg['ranks']} ranks, L={cfg['layers']} E={cfg['experts']} S={cfg['slots_per_rank']}, "
        f"{cfg['expert_bytes'] / 2**20:.2f} MiB/expert, {cfg['steps']} steps, K={cfg['sync_interval']}"
    )
    print(f"  {'figure':26} {'median':>10} {'min':>10} {'max':>10}")
    for key, fmt in FIGURES:
        t = table[key]

        def f(v: float | None, fmt: str = fmt) -> str:
            return "-" if v is None else fmt.format(v)

        print(f"  {key:26} {f(t['median']):>10} {f(t['min']):>10} {f(t['max']):>10}")
    print(f"  outputs_match in every run: {all(r['outputs_match'] for r in runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
