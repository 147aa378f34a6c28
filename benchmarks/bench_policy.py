"""Placement-policy benchmark: greedy (DeepSeek-style) vs moveaware, held-out replay and speed.

    .venv/bin/python benchmarks/bench_policy.py [TRACE.npy ...] [--json] [--quick] [--tradeoff]
                                                [--variant KEY=VALUE[,KEY=VALUE]]

1. **Held-out replay** (``eplbd.replay.replay``: window t is served by the plan
   made from the windows before it) on the DeepSeek-V3 shape with the
   synthetic drifting trace (``eplbd.synthetic.DEEPSEEK_LIKE``), and on every
   trace given (e.g. /work/shared/traces/*/loads.npy; nothing is copied). For
   a trace with E experts the geometry is chosen like DeepSeek-V3's (~12.5%
   redundant slots): R = 8 ranks for E <= 64, 16 for E = 128, 32 for E >= 256,
   S = ceil(E / R) + max(1, ceil(E / R / 8)), 2 nodes when R >= 8, 1 group.
   Plans every 10 windows from the last 10 (traces with < 40 windows: every 5
   from 5; whole-workload traces with <= 6 windows: every window from the
   previous one). Traces with a single window are skipped (nothing held out).
2. **Speed** on the DeepSeek-V3 shape, one core (thread pools pinned to 1):
   median wall time of one ``rebalance`` call for all 58 layers, steady state
   (moveaware: from its own previous placement; greedy: from scratch), and of
   the same code called layer by layer in a Python loop (the speed-up figure);
   and the median plan time over the synthetic replay's steady plans (the
   first plan left out), which is what the daemon spends per plan.

Columns: held-out β (mean over windows of Σ_l mean/Σ_l max rank load), the
static (engine default placement) β, ``hindsight``: β of greedy fitted to each
window itself (an oracle with free moves; not a bound), remote moves per plan at steady state
and in the first plan, policy ms per plan (median), and ``gap``: mean over
windows of Σ_l peak_l / Σ_l bound_l - 1 where bound_l =
max(mean rank load, min over replica counts of the largest per-replica load)
of that very window (:func:`eplbd.placement.peak_lower_bound`): how far the
held-out peak is above what any placement, even one fitted in hindsight, must
carry.

Reference rows (synthetic trace only; ``--no-references`` skips them): the
from-scratch greedy as the field runs it, β measured on the same geometry
(β depends only on the ranks): ``greedy-hier/sum`` (DeepSeek's hierarchical
algorithm on the sum of the windows, as vLLM's default), ``greedy-global/sum``
(one global packing over all ranks, as SGLang's global variant) and
``greedy-global/<forecast>`` (the same with the forecast the other rows use).
``--tradeoff`` adds moveaware rows at fixed (``slack``, ``repair_tolerance``)
pairs instead of the fitted slack (β against moves, :data:`TRADEOFF`).
``--variant`` replays moveaware with other options on every trace and compares
it with the default, paired (:func:`paired_ci`): the check a tuning change needs.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from eplbd.forecast import forecast  # noqa: E402
from eplbd.geometry import Geometry  # noqa: E402
from eplbd.placement import default_phy2log  # noqa: E402
from eplbd.policy import rebalance  # noqa: E402
from eplbd.policy.pipeline import DEFAULT_FORECAST, DEFAULT_MIN_GAIN, propose  # noqa: E402
from eplbd.replay import replay, validate_trace  # noqa: E402
from eplbd.synthetic import DEEPSEEK_LIKE, drifting_trace  # noqa: E402

POLICIES = ("greedy", "moveaware")
#: (row name, forecast or None for the run's own, greedy options): the field's from-scratch baselines.
REFERENCES: tuple[tuple[str, str | None, dict], ...] = (
    ("greedy-hier/sum", "sum", {}),
    ("greedy-global/sum", "sum", {"hierarchical": False}),
    ("greedy-global/{fc}", None, {"hierarchical": False}),
)
#: moveaware (``slack``, ``repair_tolerance``) of the ``--tradeoff`` rows (fixed, not fitted to the
#: history): the repair's local search stops at max((1 + slack) x mean, (1 + repair_tolerance) x bound).
TRADEOFF = ((0.08, 0.04), (0.06, 0.04), (0.045, 0.04), (0.03, 0.04), (0.02, 0.02), (0.0, 0.01), (0.0, 0.0))


def geometry_for(L: int, E: int) -> Geometry:
    R = 8 if E <= 64 else 16 if E <= 128 else 32
    R = min(R, E)
    S = math.ceil(E / R) + max(1, math.ceil(E / R / 8))
    S = min(S, E)
    return Geometry(L, E, R, S, num_nodes=2 if R >= 8 else 1)


def cadence(T: int) -> tuple[int, int]:
    if T <= 6:
        return 1, 1
    if T < 40:
        return 5, 5
    return 10, 10


def run_replays(
    name: str, trace: np.ndarray, g: Geometry, interval: int, history: int, fc: str, **kw: object
) -> list[dict]:
    rows = []
    for pol in POLICIES:
        kwp = dict(kw)
        if pol != "moveaware":
            kwp.pop("options", None)
        rows.append(_replay_row(name, trace, g, pol, interval, history, fc, **kwp))
    return rows


def reference_rows(name: str, trace: np.ndarray, g: Geometry, interval: int, history: int, fc: str,
                   min_gain: float) -> list[dict]:  # fmt: skip
    """The :data:`REFERENCES` rows: greedy from scratch as the field runs it, on geometry ``g``."""
    rows = []
    for label, rfc, opts in REFERENCES:
        f = fc if rfc is None else rfc
        r = _replay_row(name, trace, g, "greedy", interval, history, f, options=opts, min_gain=min_gain)
        r["policy"] = label.format(fc=f)
        rows.append(r)
    return rows


def tradeoff_rows(name: str, trace: np.ndarray, g: Geometry, interval: int, history: int, fc: str,
                  min_gain: float, options: dict) -> list[dict]:  # fmt: skip
    """moveaware at each fixed (slack, repair_tolerance) of :data:`TRADEOFF`: held-out β against moves."""
    rows = []
    for sl, rt in TRADEOFF:
        opts = {**options, "slack": sl, "repair_tolerance": rt}
        r = _replay_row(name, trace, g, "moveaware", interval, history, fc, options=opts, min_gain=min_gain)
        r["policy"] = f"moveaware s={sl:g} rt={rt:g}"
        rows.append(r)
    return rows


def _replay_row(
    name: str, trace: np.ndarray, g: Geometry, pol: str, interval: int, history: int, fc: str, **kwp: object
) -> dict:
    """One held-out replay's summary with the bench's extra figures."""
    opts = kwp.get("options") or {}
    assert isinstance(opts, dict)
    label = pol + "".join(f" {k}={v}" for k, v in opts.items())
    print(f"bench_policy: replaying {name} ({trace.shape[0]} windows), {label}, forecast {fc}",
          file=sys.stderr, flush=True)  # fmt: skip  # progress: a full run takes minutes
    res = replay(trace, g, pol, interval, history, fc, **kwp)  # type: ignore[arg-type]
    s = res.summary()
    # Split check against tuning on the figures reported: β over the first
    # and the second half of the held-out windows, separately.
    held = res.beta[res.first_window :]
    h = held.size // 2
    s["beta_half1"], s["beta_half2"] = float(held[:h].mean()), float(held[h:].mean())
    s["beta_held_out"] = [round(float(x), 6) for x in held]  # per window, for the paired comparison
    # Policy wall time per plan at steady state (the first plan, which places
    # every layer from scratch, left out).
    steady = res.plan_ms[1:]
    s["plan_ms_steady_median"] = float(np.median(steady)) if steady else float("nan")
    s.update(trace=name, geometry=f"L{g.num_layers} E{g.num_experts} R{g.num_ranks} S{g.slots_per_rank} "
             f"N{g.num_nodes} G{g.num_groups}", windows=int(trace.shape[0]))  # fmt: skip
    return s


#: Student t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95%); beyond 30 the normal's 1.96
#: is within 2% (2.04 at 30).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def paired_ci(a: np.ndarray, b: np.ndarray, block: int) -> tuple[float, float, int]:
    """95% interval of mean(a - b) for held-out β series a, b [n] of one trace, and the number of blocks.

    Windows served by one plan share a placement, so their differences are
    correlated; the blocks of ``block`` consecutive windows (one plan
    interval each; a shorter last one is dropped) are taken as the
    independent samples, and the interval is Student's t on their means:
    mean ± t(0.975, k - 1) · sd / √k over k blocks. With few blocks (the
    whole-workload traces: 3-5) the interval is wide, as it should be.
    (nan, nan, k) when k < 2.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    k = d.size // max(block, 1)
    if k < 2:
        return float("nan"), float("nan"), k
    m = d[: k * block].reshape(k, block).mean(axis=1)
    t = _T975[k - 2] if k - 1 <= len(_T975) else 1.96
    half = t * float(m.std(ddof=1)) / math.sqrt(k)
    return float(m.mean()) - half, float(m.mean()) + half, k


def compare(a: dict, b: dict) -> dict:
    """Row ``a`` against row ``b`` (same trace and cadence): Δβ over all held-out windows and each
    half, its :func:`paired_ci` interval (lo, hi, k) and the ratio of steady remote moves."""
    lo, hi, k = paired_ci(np.array(a["beta_held_out"]), np.array(b["beta_held_out"]), a["interval"])
    moves = a["moves_remote_steady_per_plan"] / max(b["moves_remote_steady_per_plan"], 1e-9)
    return {"trace": a["trace"], "d_beta": a["beta_mean"] - b["beta_mean"],
            "d_half1": a["beta_half1"] - b["beta_half1"], "d_half2": a["beta_half2"] - b["beta_half2"],
            "lo": lo, "hi": hi, "k": k, "moves_ratio": moves}  # fmt: skip


def _line(c: dict) -> str:
    return (f"beta {c['d_beta']:+.4f} / {c['d_half1']:+.4f} / {c['d_half2']:+.4f}  "
            f"95% [{c['lo']:+.4f}, {c['hi']:+.4f}] k={c['k']}")  # fmt: skip


def comparisons(rows: list[dict]) -> list[dict]:
    """:func:`compare` of moveaware against greedy on each trace that has both rows."""
    by = {(r["trace"], r["policy"]): r for r in rows}
    traces = dict.fromkeys(r["trace"] for r in rows)
    pairs = ((by.get((t, "moveaware")), by.get((t, "greedy"))) for t in traces)
    return [compare(a, b) for a, b in pairs if a is not None and b is not None]


def plot(rows: list[dict], path: str) -> None:
    """Forest plot of moveaware − greedy held-out β per trace with 95% intervals, and the moves ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmp = comparisons(rows)
    if not cmp:
        raise SystemExit("--plot: no trace has both a greedy and a moveaware row")
    y = np.arange(len(cmp))[::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.42 * len(cmp) + 1.6), sharey=True,
                                   width_ratios=[3, 2])  # fmt: skip
    for yi, c in zip(y, cmp, strict=True):
        color = "C2" if c["lo"] > 0 else "C3" if c["hi"] < 0 else "C7"
        if np.isfinite(c["lo"]):
            ax1.plot([c["lo"], c["hi"]], [yi, yi], color=color, lw=2)
        ax1.plot(c["d_beta"], yi, "o", color=color)
    ax1.axvline(0, color="k", lw=0.8)
    ax1.set_yticks(y, [f"{c['trace'][:38]} (k={c['k']})" for c in cmp], fontsize=8)
    ax1.set_xlabel("held-out β: moveaware − greedy (95% interval over k plan intervals)")
    ax1.set_title("balance: green ahead, red behind, grey within the noise")
    ratio = np.array([c["moves_ratio"] for c in cmp]) * 100
    ax2.barh(y, ratio, color=["C0" if r <= 10 else "C1" for r in ratio])
    ax2.axvline(10, color="k", lw=0.8, ls="--")
    ax2.set_xlabel("steady remote moves per plan, % of greedy's (≤ 10%)")
    ax2.set_title("moves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed(g: Geometry, repeats: int, fc: str, loop_repeats: int, adaptive: bool = True) -> dict:
    tr = drifting_trace(40, g.num_layers, g.num_experts, 0, **DEEPSEEK_LIKE)  # type: ignore[arg-type]
    out: dict = {"geometry": g.to_dict(), "repeats": repeats}
    for pol in POLICIES:
        msg = f"bench_policy: timing {pol} ({repeats} calls + {loop_repeats} per-layer loops)"
        print(msg, file=sys.stderr, flush=True)
        cur = default_phy2log(g)
        for t in (10, 20):  # reach a steady state
            cur = propose(tr[t - 10 : t], cur, g, policy=pol, forecast=fc, adaptive=adaptive).phy2log
        w = forecast(tr[20:30], fc)
        opts = propose(tr[20:30], cur, g, policy=pol, forecast=fc, adaptive=adaptive).options
        ts, cpu = [], []
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            rebalance(w, cur, g, pol, **opts)
            ts.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        g1 = Geometry(1, g.num_experts, g.num_ranks, g.slots_per_rank, num_nodes=g.num_nodes,
                      num_groups=g.num_groups)  # fmt: skip
        tl = []
        for _ in range(loop_repeats):
            t0 = time.perf_counter()
            for layer in range(g.num_layers):
                rebalance(w[layer : layer + 1], cur[layer : layer + 1], g1, pol, **opts)
            tl.append(time.perf_counter() - t0)
        vec, loop = float(np.median(ts)) * 1e3, float(np.median(tl)) * 1e3
        out[pol] = {"ms_median": vec, "ms_min": float(np.min(ts)) * 1e3,
                    "cpu_ms_median": float(np.median(cpu)) * 1e3, "per_layer_loop_ms_median": loop,
                    "speedup": loop / vec}  # fmt: skip
    return out


def table(rows: list[dict]) -> str:
    hdr = ("trace", "geometry", "T", "I/W", "policy", "beta", "static", "hindsight", "steady mv", "first mv",
           "ms", "gap")  # fmt: skip
    lines = []
    for r in rows:
        cad = f"{r['interval']}/{r['history']}"
        lines.append((r["trace"], r["geometry"], str(r["windows"]), cad, r["policy"],
                      f"{r['beta_mean']:.3f}", f"{r['beta_static']:.3f}", f"{r['beta_hindsight']:.3f}",
                      f"{r['moves_remote_steady_per_plan']:.0f}", str(r["moves_remote_first"]),
                      f"{r['plan_ms_median']:.2f}", f"{r['peak_gap']:.3f}"))  # fmt: skip
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(hdr)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    head = [fmt.format(*hdr), fmt.format(*("-" * w for w in widths))]
    return "\n".join(head + [fmt.format(*x) for x in lines])


def _options(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--option {it!r}: expected KEY=VALUE")
        out[k] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="*", help="trace files loads.npy [T, L, E]")
    ap.add_argument("--windows", type=int, default=200, help="synthetic trace windows (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--forecast",
        default=DEFAULT_FORECAST,
        help=f"forecast method for both policies (default {DEFAULT_FORECAST}, the daemon's)",
    )
    ap.add_argument("--repeats", type=int, default=30, help="speed: timed calls per policy")
    ap.add_argument("--quick", action="store_true", help="60 synthetic windows, 5 timed calls")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument(
        "--fixed-slack",
        action="store_true",
        help="moveaware: fixed default slack, not one fitted to each history",
    )
    ap.add_argument(
        "--min-gain",
        type=float,
        default=DEFAULT_MIN_GAIN,
        help="the daemon's publish gate replay applies (default %(default)s, the daemon's)",
    )
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="moveaware option for the replays (repeatable), e.g. first_scenario_rounds=0",
    )
    ap.add_argument(
        "--only", default="", help="replay only traces whose name contains this (and the synthetic one)"
    )
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic DeepSeek-like replay")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    ap.add_argument(
        "--no-references",
        action="store_true",
        help="skip the synthetic reference rows (greedy hierarchical/global, sum/forecast)",
    )
    ap.add_argument(
        "--tradeoff",
        action="store_true",
        help="synthetic: add moveaware rows at fixed (slack, repair_tolerance) pairs (β against moves)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also replay moveaware with these options on every trace and compare it with the default "
        "moveaware, paired (repeatable), e.g. count_ratio=1.1",
    )
    ap.add_argument(
        "--plot", metavar="PNG", help="draw moveaware vs greedy per trace (Δβ with intervals, moves ratio)"
    )
    args = ap.parse_args(argv)
    variants = [_options(v.split(",")) for v in args.variant]
    if args.quick:
        args.windows, args.repeats = 60, 5
    g = Geometry.deepseek_v3()
    synth = drifting_trace(args.windows, g.num_layers, g.num_experts, args.seed, **DEEPSEEK_LIKE)  # type: ignore[arg-type]
    kw = {"adaptive": not args.fixed_slack, "min_gain": args.min_gain, "options": _options(args.option)}
    sname = "synthetic-deepseek-v3"
    rows = [] if args.no_synthetic else run_replays(sname, synth, g, 10, 10, args.forecast, **kw)
    cases = [] if args.no_synthetic else [(sname, synth, g, 10, 10)]  # what --variant replays
    if not args.no_synthetic and not args.no_references:
        rows += reference_rows(sname, synth, g, 10, 10, args.forecast, args.min_gain)
    if not args.no_synthetic and args.tradeoff:
        rows += tradeoff_rows(sname, synth, g, 10, 10, args.forecast, args.min_gain, kw["options"])
    skipped = []
    for path in args.traces:
        name = Path(path).parent.name or Path(path).stem
        if args.only not in name:
            continue
        tr = validate_trace(np.load(path, allow_pickle=False), path)
        T, L, E = tr.shape
        if T < 2:
            skipped.append(f"{name}: T={T}, nothing to hold out")
            continue
        interval, history = cadence(T)
        geo = geometry_for(L, E)
        rows += run_replays(name, tr, geo, interval, history, args.forecast, **kw)
        cases.append((name, tr, geo, interval, history))
    for v in variants:
        for name, tr, geo, interval, history in cases:
            r = _replay_row(name, tr, geo, "moveaware", interval, history, args.forecast,
                            **{**kw, "options": {**kw["options"], **v}})  # fmt: skip
            r["policy"] = "moveaware " + ",".join(f"{k}={x:g}" for k, x in v.items())
            rows.append(r)
    sp = {} if args.no_speed else speed(g, args.repeats, args.forecast, max(1, args.repeats // 10),
                                        not args.fixed_slack)  # fmt: skip
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps({"replay": rows, "speed": sp, "skipped": skipped}, indent=2))
        return 0
    if rows:
        print(table(rows))
    for s in skipped:
        print("skipped:", s)
    if sp:
        print("\nspeed, DeepSeek-V3 shape (58 layers), one core:")
    for pol in POLICIES if sp else ():
        x = sp[pol]
        print(f"  {pol:<10} {x['ms_median']:.2f} ms median (min {x['ms_min']:.2f}, CPU time median "
              f"{x['cpu_ms_median']:.2f}); per-layer Python loop {x['per_layer_loop_ms_median']:.1f} ms "
              f"-> {x['speedup']:.1f}x")  # fmt: skip
    for r in rows:
        if r["trace"] == sname and r["policy"] in POLICIES:
            print(f"  synthetic replay, steady plans: {r['policy']:<10} {r['plan_ms_steady_median']:.2f} ms "
                  "median (policy call incl. the adaptive slack estimate, wall time)")  # fmt: skip
    by = {(r["trace"], r["policy"]): r for r in rows}
    if rows:
        print(
            "\nmoveaware vs greedy (steady remote moves ratio; beta difference: all / 1st / 2nd half of the "
            "held-out windows, and its 95% interval over k plan intervals, see paired_ci):"
        )
    for c in comparisons(rows):
        first = by[(c["trace"], "moveaware")]["plan_ms_max"]
        print(f"  {c['trace']:<42} moves {c['moves_ratio']:6.1%}  {_line(c)}  first plan {first:.0f} ms")
    alts = [r for r in rows if r["policy"].startswith("moveaware ")]
    if alts:
        print("\nvariants vs the default moveaware (steady remote moves per plan: default -> variant; beta "
              "difference as above):")  # fmt: skip
    for r in alts:
        a = by[(r["trace"], "moveaware")]
        mv = f"{a['moves_remote_steady_per_plan']:.1f} -> {r['moves_remote_steady_per_plan']:.1f}"
        print(f"  {r['trace'][:30]:<30} {r['policy'][10:]:<36} moves {mv:<18} {_line(compare(r, a))}")
    refs = [r for r in rows if r["trace"] == sname and r["policy"].startswith("greedy-")]
    if refs:
        a = by[(sname, "moveaware")]
        print("\nsynthetic: moveaware vs each reference (same line format; moves: moveaware / reference):")
        for b in refs:
            c = compare(a, b)
            print(f"  {b['policy']:<42} moves {c['moves_ratio']:6.1%}  {_line(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
