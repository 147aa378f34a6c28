"""``eplbd replay``: run a load trace [T, L, E] through a placement policy, held out.

At window t the β of that window is measured under the placement in force.
Every ``interval`` windows (t = I, 2I, ...) a plan is made *before* window t is
measured, from windows [t - history, t) by :func:`eplbd.policy.propose` (the
daemon's pipeline: forecast, policy, β gate): the window being measured is
never seen by the plan that serves it. The first placement is the
engine default (slot p holds expert p mod E), which is also the static baseline.

Summary figures (held-out windows = t >= the first plan window, or all windows
when the trace is too short for a plan):

- ``beta_mean`` / ``beta_static`` / ``beta_min``: mean (min) over held-out
  windows of that window's β (DESIGN.md definition), under the policy / under
  the default placement.
- ``beta_hindsight``: mean over held-out windows of that window's β under the
  greedy (DeepSeek-style) from-scratch placement fitted to that very window:
  an oracle that re-places every window with perfect knowledge and free moves.
  Not a bound (a better packing can beat it), but a meaningful reference; the
  trivial upper bound Σ_l mean / Σ_l bound_l is 1.000 whenever the largest
  per-replica share is below the mean rank load (DeepSeek-like shapes: always),
  so it is not reported. ``peak_gap``: mean of Σ_l peak_l / Σ_l bound_l - 1 with
  :func:`eplbd.placement.peak_lower_bound` (how far the held-out peak is above
  what any placement, even one fitted in hindsight, must carry).
- ``moves_*``: slots whose expert changed (remote: weights from another rank;
  cross-node: from another node), ``moves_remote_first`` for the first plan and
  ``moves_remote_steady_per_plan`` the mean over the later ones.
- ``plan_ms_median``: wall time of the policy call (all layers) per plan.

Progress: the CLI prints a line to stderr at most every
:data:`PROGRESS_EVERY_S` seconds while it replays (window, plans, β so far),
so a long trace is never silent; the summary goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from eplbd.forecast import METHODS
from eplbd.geometry import Geometry
from eplbd.placement import count_moves, default_phy2log, peak_lower_bound, rank_loads
from eplbd.policy import DEFAULT_POLICY, POLICIES, gate, propose, rebalance
from eplbd.policy.pipeline import DEFAULT_ADAPTIVE, DEFAULT_FORECAST, DEFAULT_FORECAST_ALPHA, DEFAULT_MIN_GAIN
from eplbd.synthetic import DEEPSEEK_LIKE, drifting_trace

__all__ = ["TraceError", "ReplayResult", "validate_trace", "replay", "configure_parser", "run_cli"]

#: seconds between two progress lines of the CLI (stderr)
PROGRESS_EVERY_S = 2.0

#: progress(windows done, windows in all, held-out β so far or nan, plans so far)
Progress = Callable[[int, int, float, int], None]


class TraceError(ValueError):
    """A trace cannot be replayed; the message says why."""


@dataclasses.dataclass
class ReplayResult:
    """Per-window and per-plan series of one replay, plus the summary (:meth:`summary`)."""

    policy: str
    interval: int
    history: int
    forecast: str
    first_window: int  # first held-out window (the first plan's), 0 without plans
    beta: np.ndarray  # [T] β of each window under the placement in force
    beta_static: np.ndarray  # [T] under the default placement
    beta_hindsight: np.ndarray  # [T] β under greedy fitted to that very window
    peak_gap: np.ndarray  # [T] Σ peak / Σ lower bound - 1
    plan_windows: list[int]
    moves_remote: list[int]
    moves_cross_node: list[int]
    moves_local: list[int]
    layers_changed: list[int]
    plan_ms: list[float]
    forecast_ms: list[float]

    def summary(self) -> dict[str, Any]:
        h = slice(self.first_window, None)
        n = len(self.plan_windows)
        steady = self.moves_remote[1:]
        return {
            "policy": self.policy,
            "interval": self.interval,
            "history": self.history,
            "forecast": self.forecast,
            "windows": int(self.beta.size),
            "held_out_from": self.first_window,
            "beta_mean": float(self.beta[h].mean()),
            "beta_min": float(self.beta[h].min()),
            "beta_static": float(self.beta_static[h].mean()),
            "beta_hindsight": float(self.beta_hindsight[h].mean()),
            "peak_gap": float(self.peak_gap[h].mean()),
            "plans": n,
            "moves_remote_total": int(sum(self.moves_remote)),
            "moves_remote_first": int(self.moves_remote[0]) if n else 0,
            "moves_remote_steady_per_plan": float(np.mean(steady)) if steady else 0.0,
            "moves_cross_node_total": int(sum(self.moves_cross_node)),
            "moves_local_total": int(sum(self.moves_local)),
            "layers_changed_per_plan": float(np.mean(self.layers_changed)) if n else 0.0,
            "plan_ms_median": float(np.median(self.plan_ms)) if n else 0.0,
            "plan_ms_max": float(np.max(self.plan_ms)) if n else 0.0,
            "forecast_ms_median": float(np.median(self.forecast_ms)) if n else 0.0,
        }


def validate_trace(trace: Any, name: str = "trace") -> np.ndarray:
    """Check a trace is [T, L, E] finite non-negative numbers with T, L, E >= 1; return float64."""
    a = np.asarray(trace)
    if a.ndim != 3:
        raise TraceError(f"{name}: expected 3 dimensions [windows, layers, experts], got shape {a.shape}")
    if 0 in a.shape:
        raise TraceError(f"{name}: empty dimension in shape {a.shape}")
    if a.dtype.kind not in "iuf":
        raise TraceError(f"{name}: dtype {a.dtype} is not numeric")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        t, l, e = np.argwhere(~np.isfinite(a))[0]
        raise TraceError(f"{name}: non-finite count {a[t, l, e]} at window {t}, layer {l}, expert {e}")
    if (a < 0).any():
        t, l, e = np.argwhere(a < 0)[0]
        raise TraceError(f"{name}: negative count {a[t, l, e]} at window {t}, layer {l}, expert {e}")
    return a


def _beta(loads: np.ndarray, phy2log: np.ndarray, g: Geometry) -> float:
    """β of one window [L, E] under ``phy2log`` [L, P] (1.0 for an all-zero window)."""
    rl = rank_loads(loads, phy2log, g)
    peak = float(rl.max(axis=1).sum())
    return float(rl.mean(axis=1).sum()) / peak if peak > 0 else 1.0


def _window_stats(loads: np.ndarray, phy2log: np.ndarray, g: Geometry) -> tuple[float, float, float]:
    """(β, β under greedy fitted to this window, Σ peak / Σ bound - 1) of one window [L, E]."""
    rl = rank_loads(loads, phy2log, g)
    mean, peak = float(rl.mean(axis=1).sum()), float(rl.max(axis=1).sum())
    bound = float(peak_lower_bound(loads, g).sum())
    hind = _beta(loads, rebalance(loads, None, g, "greedy"), g)
    if peak <= 0:
        return 1.0, hind, 0.0
    return mean / peak, hind, peak / bound - 1.0


def replay(
    trace: np.ndarray,
    g: Geometry,
    policy: str = DEFAULT_POLICY,
    interval: int = 10,
    history: int = 10,
    forecast_method: str = DEFAULT_FORECAST,
    options: dict[str, Any] | None = None,
    adaptive: bool = DEFAULT_ADAPTIVE,
    min_gain: float = DEFAULT_MIN_GAIN,
    max_moves: int = 0,
    forecast_alpha: float = DEFAULT_FORECAST_ALPHA,
    progress: Progress | None = None,
) -> ReplayResult:
    """Replay ``trace`` [T, L, E] on geometry ``g`` (L, E must match); see the module docstring.

    Each plan is :func:`eplbd.policy.propose` on the history windows, published
    under the daemon's rule :func:`eplbd.policy.gate` (``min_gain``,
    ``max_moves``; defaults = the daemon's config defaults), exactly as the
    daemon decides. With ``adaptive`` (the default, as the daemon) and policy moveaware, each
    plan's ``slack`` comes from :func:`eplbd.policy.suggest_slack` on its
    history windows, unless ``options`` sets it. A plan the gate skips counts
    as a plan with no moves. ``progress`` (optional) is called after each window.
    """
    a = validate_trace(trace)
    T, L, E = a.shape
    if (g.num_layers, g.num_experts) != (L, E):
        raise TraceError(f"trace: {L} layers x {E} experts, geometry has {g.num_layers} x {g.num_experts}")
    if interval < 1 or history < 1:
        raise ValueError(f"interval ({interval}) and history ({history}) must be >= 1")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    if forecast_method not in METHODS:
        raise ValueError(f"unknown forecast {forecast_method!r}; choose one of {list(METHODS)}")
    opts = dict(options or {})
    static = default_phy2log(g)
    cur = static.copy()
    stats = np.empty((T, 3))
    stats_static = np.empty(T)
    empty = np.empty(0)
    res = ReplayResult(policy, interval, history, forecast_method, interval if interval < T else 0,
                       empty, empty, empty, empty, [], [], [], [], [], [], [])  # fmt: skip
    held_sum = 0.0  # Σ β of the held-out windows so far (progress only)
    for t in range(T):
        if t > 0 and t % interval == 0:
            prop = propose(a[max(0, t - history) : t], cur, g, policy=policy, forecast=forecast_method,
                           forecast_alpha=forecast_alpha, options=opts, adaptive=adaptive)  # fmt: skip
            new = prop.phy2log
            mv = count_moves(cur, new, g)
            if gate(prop, mv.total, min_gain, max_moves):
                new, mv = cur, count_moves(cur, cur, g)
            res.plan_windows.append(t)
            res.moves_remote.append(mv.remote)
            res.moves_cross_node.append(mv.cross_node)
            res.moves_local.append(mv.local)
            res.layers_changed.append(int((new != cur).any(axis=1).sum()))
            res.plan_ms.append(prop.policy_ms)
            res.forecast_ms.append(prop.forecast_ms)
            cur = new
        stats[t] = _window_stats(a[t], cur, g)
        stats_static[t] = _beta(a[t], static, g)
        if progress is not None:
            if t >= res.first_window:
                held_sum += stats[t, 0]
            n = t + 1 - res.first_window
            progress(t + 1, T, held_sum / n if n > 0 else float("nan"), len(res.plan_windows))
    res.beta, res.beta_hindsight, res.peak_gap = stats[:, 0], stats[:, 1], stats[:, 2]
    res.beta_static = stats_static
    return res


def plot(res: ReplayResult, path: str) -> None:
    """β per window (policy, static, bound) and remote moves per plan, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(res.beta.size)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[2, 1])
    ax1.plot(t, res.beta, label=f"{res.policy} (mean {res.beta[res.first_window :].mean():.3f})")
    ax1.plot(t, res.beta_static, label=f"static (mean {res.beta_static[res.first_window :].mean():.3f})")
    ax1.plot(t, res.beta_hindsight, ":", color="grey", label="greedy fitted to each window (hindsight)")
    ax1.set_ylabel("β = Σ mean / Σ max rank load")
    ax1.set_ylim(0, 1.02)
    ax1.legend(loc="lower right")
    ax1.set_title(f"eplbd replay: policy {res.policy}, plan every {res.interval} from last {res.history}")
    ax2.bar(res.plan_windows, res.moves_remote, width=max(1, res.interval * 0.6), label="remote")
    ax2.bar(res.plan_windows, res.moves_cross_node, width=max(1, res.interval * 0.6), label="cross-node")
    ax2.set_ylabel("moves per plan")
    ax2.set_xlabel("window")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", nargs="?", help="trace file .npy of token counts [T, L, E]")
    p.add_argument("--synthetic", action="store_true",
                   help="replay a synthetic drifting trace (DeepSeek-V3 shape by default)")  # fmt: skip
    p.add_argument("--windows", type=int, default=200, help="synthetic: windows T (default 200)")
    p.add_argument("--layers", type=int, default=None, help="synthetic: layers L (default 58)")
    p.add_argument("--experts", type=int, default=None, help="synthetic: experts E (default 256)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed (default 0)")
    p.add_argument("--ranks", type=int, help="EP ranks R (synthetic default 32)")
    p.add_argument("--nodes", type=int, help="nodes N (synthetic default 4)")
    p.add_argument("--slots-per-rank", type=int, help="slots per rank S (synthetic default 9)")
    p.add_argument("--groups", type=int, default=None, help="expert groups G (default 1; synthetic 8)")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=list(POLICIES), help="placement policy")
    p.add_argument("--interval", type=int, default=10, help="plan every I windows (default 10)")
    p.add_argument("--history", type=int, default=10, help="plan from the last W windows (default 10)")
    p.add_argument("--forecast", default=DEFAULT_FORECAST, choices=list(METHODS),
                   help=f"forecast method (default {DEFAULT_FORECAST}, as the daemon)")  # fmt: skip
    p.add_argument("--forecast-alpha", type=float, default=DEFAULT_FORECAST_ALPHA,
                   help="smoothing of the ema/share_ema/trend forecasts (default %(default)s)")  # fmt: skip
    p.add_argument("--min-gain", type=float, default=DEFAULT_MIN_GAIN,
                   help="the daemon's publish gate: skip a plan whose predicted β gain is below this "
                   "(default %(default)s, the daemon's)")  # fmt: skip
    p.add_argument(
        "--max-moves",
        type=int,
        default=0,
        help="the daemon's max_moves_per_plan: skip a plan changing more slots (0: no limit)",
    )
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option (repeatable), e.g. --option min_gain=0.02")  # fmt: skip
    p.add_argument("--fixed-slack", action="store_true",
                   help="moveaware: the policy's fixed default slack instead of the fitted one")  # fmt: skip
    p.add_argument("--adaptive-slack", action="store_true",
                   help="moveaware: a slack fitted to each plan's history (suggest_slack; the default, "
                   "as the daemon)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw β and moves over time (needs matplotlib)")


def _options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise ValueError(f"--option {it!r}: expected KEY=VALUE")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                raise ValueError(f"--option {it!r}: value must be a number") from None
    return out


def _load(args: argparse.Namespace) -> tuple[np.ndarray, Geometry]:
    if args.synthetic == (args.trace is not None):
        raise ValueError("give a TRACE.npy file or --synthetic (exactly one)")
    if args.synthetic:
        L = 58 if args.layers is None else args.layers
        E = 256 if args.experts is None else args.experts
        trace = drifting_trace(args.windows, L, E, args.seed, **DEEPSEEK_LIKE)  # type: ignore[arg-type]
        R = 32 if args.ranks is None else args.ranks
        N = 4 if args.nodes is None else args.nodes
        S = 9 if args.slots_per_rank is None else args.slots_per_rank
        G = (8 if E % 8 == 0 else 1) if args.groups is None else args.groups
    else:
        missing = [n for n in ("ranks", "nodes", "slots_per_rank") if getattr(args, n) is None]
        if missing:
            raise ValueError("a trace file needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        try:
            trace = np.load(args.trace, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TraceError(f"cannot read trace {args.trace!r}: {e}") from None
        trace = validate_trace(trace, f"trace {args.trace}")
        R, N, S = args.ranks, args.nodes, args.slots_per_rank
        G = 1 if args.groups is None else args.groups
    _, L, E = np.shape(trace)
    g = Geometry(L, E, R, S, num_nodes=N, num_groups=G)
    return trace, g


def _table(s: dict[str, Any]) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in s.items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _stderr_progress() -> Progress:
    """A progress callback printing to stderr at most every :data:`PROGRESS_EVERY_S` seconds."""
    t0 = time.monotonic()
    last = [t0]

    def show(done: int, total: int, beta: float, plans: int) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        b = "-" if beta != beta else f"{beta:.4f}"
        print(f"eplbd replay: window {done}/{total} ({done / total:.0%}), {plans} plans, held-out β so far "
              f"{b}, {now - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    return show


def run_cli(args: argparse.Namespace) -> int:
    try:
        trace, g = _load(args)
        res = replay(trace, g, args.policy, args.interval, args.history, args.forecast, _options(args.option),
                     adaptive=not args.fixed_slack, min_gain=args.min_gain,
                     max_moves=args.max_moves, forecast_alpha=args.forecast_alpha,
                     progress=_stderr_progress())  # fmt: skip
    except (ValueError, TypeError) as e:  # TraceError, GeometryError, bad options
        print(f"eplbd replay: error: {e}", file=sys.stderr)
        return 2
    s = res.summary()
    s["geometry"] = g.to_dict()
    if args.plot:
        plot(res, args.plot)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=False))
    else:
        geo = s.pop("geometry")
        print(f"geometry: L={geo['num_layers']} E={geo['num_experts']} R={geo['num_ranks']} "
              f"S={geo['slots_per_rank']} N={geo['num_nodes']} G={geo['num_groups']}")  # fmt: skip
        print(_table(s))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
