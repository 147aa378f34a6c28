"""`eplbd demo`: a live daemon and a small CPU cluster of MoE ranks, eplbd against stop-the-world.

What one run does:

1. writes a daemon config (TOML) into a temporary directory and starts the daemon
   the way systemd would, ``python -m eplbd.cli run --config <file>``, with a shm
   prefix unique to this run;
2. forks R rank processes (gloo over loopback) running a small real MoE model
   (:class:`eplbd_client.testing.TinyMoE`: L layers of E experts, each a d x h
   MLP) whose routing is skewed (a hot spot of a few experts), drifts (the hot
   spot moves one expert every ``drift_period`` steps) and shifts abruptly once
   (at ``shift_at`` of the steps the hot spot jumps half-way round the experts).
   Every rank links :class:`eplbd_client.EplbClient`; rank 0 shows progress;
3. runs the same thing again (same seed, same steps, same daemon config) with the
   client in stop-the-world mode (plans executed synchronously on the forward
   thread, as today's balancers do);
4. prints a summary (or ``--json``), optionally plots β and step time over the
   steps for both modes (``--plot``), and cleans up: daemon stopped with SIGTERM,
   ranks joined, shm segments of the run's prefix unlinked, also after Ctrl-C or
   a failed rank (then the exit status is non-zero and the reason is printed).

Measurements (rank 0; every step of the model is a synchronous all-reduce, so
rank 0's step time includes waiting for the slowest rank):

- **step time**: wall time of ``forward + client.step()``; the first
  ``2 * sync_interval`` steps are warm-up and left out of the percentiles;
- **in flight**: a step that begins while a plan is started and not fully
  committed (async mode); in stop-the-world mode the pause is the time the
  client spent executing plans (``ClientStats.stw_seconds``) within a step;
- **β** per window of ``sync_interval`` steps, from the tokens every rank's
  slots received under the placement in force (recomputed on rank 0 from the
  routing, which is what the ranks record) and, for comparison, under the
  default placement (no balancing); ``beta_before`` is the mean over the
  windows before the first commit, ``beta_after`` over the last 15% of windows;
- **outputs**: on check steps rank 0 compares the model's output (already
  all-reduced over the ranks) with the same model without expert parallelism
  or balancing (one copy of every expert, ``TinyMoE.reference_forward``); at the
  end every rank checks bitwise that each slot holds its expert's weights.

Defaults (:class:`DemoSpec`): 4 ranks, L = 4 layers, E = 16 experts, S = ceil(1.5 E / R)
slots per rank (about half as many redundant slots as experts), d = 256, h = 512
(1 MiB per expert, so stop-the-world's pause is visible), 128 tokens per step,
top-2, sync every 4 steps, a plan every 32 steps, 400 steps per mode, shift at
60%. The client's staging pool holds a whole plan (L x S experts) unless
``--max-staged`` bounds it: the plan then moves a few layers per sync. Transfers are
paced (``--pace``, default 0.5: one p2p round every other step; 0 = unpaced).

Changing d or h changes the gate's spread (~0.5 sqrt(d)) relative to the fixed
``skew``; the default skew gives β ≈ 0.47 without balancing at d = 256.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eplbd.geometry import Geometry
from eplbd.shm.names import remove_prefix

__all__ = ["DemoSpec", "configure_parser", "run_cli", "run_demo", "summarize", "format_summary"]

MODES = ("async", "stw")
#: Tolerance of the output comparison, relative to the reference's largest magnitude
#: (at least 1): the EP model sums expert outputs in another order (per rank, then an
#: all-reduce), so float32 results agree to rounding (~1e-6 here), not bitwise; one
#: wrong expert in a slot changes outputs by O(1). Weights are checked bitwise too.
OUTPUT_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """Everything that defines a demo run (both modes use the same spec)."""

    ranks: int = 4
    steps: int = 400
    layers: int = 4
    experts: int = 16
    hidden: int = 256  # d: expert MLP input/output width
    ffn: int = 512  # h: expert MLP hidden width
    tokens: int = 128  # tokens per step (identical on every rank)
    top_k: int = 2
    skew: float = 8.0  # height of the routing hot spot (logit units; the gate's own spread is ~0.5*sqrt(d))
    drift_period: int = 200  # steps per one-expert move of the hot spot
    shift_at: float = 0.6  # fraction of the steps after which the hot spot jumps by E/2
    sync_interval: int = 4  # K: steps per sync / window
    max_staged: int = 0  # client max_staged_experts; 0 = L * S (a whole plan staged at once)
    # Client transfer_rounds_per_step: p2p rounds started per forward step; 0 = unpaced. 0.5
    # spreads a plan's ~10 rounds over ~20 of the 32 steps between plans instead of bursting
    # them into the first few steps, where 4 ranks' transfers and forwards share 2 cores.
    pace: float = 0.5
    plan_every: int = 32  # daemon num_iterations: steps between plans
    # Daemon keys; None = the daemon's own default (what a deployment gets). The history
    # is scaled down with the plan interval: 4 windows = half of it, so a shift is followed fast.
    history_windows: int | None = 4
    min_gain: float | None = None
    forecast: str | None = None
    seed: int = 0
    check_every: int = 25  # output check every this many steps (rank 0), plus the last step
    progress: bool = True
    # Fault injection for tests: "RANK:STEP:raise", ":crash" (os._exit, no report) or
    # ":corrupt" (alters the weights in layer 0's slots, which the checks must catch; with
    # RANK "all" no rank keeps a clean copy that a later plan could move back in).
    fail_at: str = ""

    @property
    def slots(self) -> int:
        return min(self.experts, math.ceil(1.5 * self.experts / self.ranks))

    @property
    def shift_step(self) -> int:
        return int(round(self.shift_at * self.steps))

    @property
    def warmup(self) -> int:
        return min(2 * self.sync_interval, self.steps // 4)

    @property
    def expert_bytes(self) -> int:
        return 2 * self.hidden * self.ffn * 4  # W1 [d, h] + W2 [h, d], float32

    def geometry(self) -> Geometry:
        return Geometry(self.layers, self.experts, self.ranks, self.slots, expert_bytes=self.expert_bytes)

    def daemon_config(self, prefix: str) -> dict[str, Any]:
        keys = {"history_windows": self.history_windows, "min_gain": self.min_gain, "forecast": self.forecast}
        return {
            "shm_prefix": prefix,
            "num_iterations": self.plan_every,  # scaled to the demo's few hundred steps
            **{k: v for k, v in keys.items() if v is not None},
            "poll_interval_s": 0.02,
            "discovery_interval_s": 0.05,
            "heartbeat_interval_s": 0.25,
            "owner_grace_s": 1.0,
            "log_level": "info",
        }


class DemoError(RuntimeError):
    """The demo could not run to the end (rank failure, daemon failure); the message says why."""


# ----------------------------------------------------------------------------- rank side


def _model_class() -> type:
    """TinyMoE with one abrupt routing shift (torch is imported here, in the ranks only)."""
    from eplbd_client.testing import TinyMoE

    class DemoMoE(TinyMoE):
        """TinyMoE whose routing hot spot jumps half-way round the experts at ``shift_step``.

        ``TinyMoE.route`` centres the hot spot at ``layer * E / L + step / drift_period``;
        routing a step as if it were ``drift_period * E / 2`` steps later moves the centre
        by E/2 and leaves the token batch (``inputs(step)``) untouched. ``rank_loads`` and
        ``reference_forward`` go through ``route`` too, so they see the same shift.
        """

        def __init__(self, *args: Any, shift_step: int, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.shift_step = int(shift_step)
            self.shift_offset = self.drift_period * self.g.num_experts // 2

        def route(self, layer: int, step: int, x0: Any) -> Any:
            if step >= self.shift_step:
                step = step + self.shift_offset
            return super().route(layer, step, x0)

    return DemoMoE


def _window_beta(rank_loads: np.ndarray) -> float:
    """β of one window: rank loads [L, R] -> Σ_l mean_r / Σ_l max_r (1.0 with no load)."""
    mx = float(rank_loads.max(axis=1).sum())
    return float(rank_loads.mean(axis=1).sum()) / mx if mx > 0 else 1.0


class _Progress:
    """Rank 0's live progress: rate-limited one-line updates on stderr."""

    MIN_GAP_S = 1.0  # a line at most this often...
    EVENT_GAP_S = 0.25  # ...or this often when the plan state changed

    def __init__(self, mode: str, steps: int, domain: str) -> None:
        self.mode, self.steps, self.domain = mode, steps, domain
        self.last_t = 0.0
        self.last_state: tuple[int, int, int] | None = None
        self._dom: Any = None

    def _daemon_decision(self) -> str:
        from eplbd.shm import Domain

        try:
            if self._dom is None:
                self._dom = Domain.attach(self.domain)
            info = self._dom.read_daemon_info()
        except Exception:
            return ""
        return f"  daemon: {info.last_decision}" if info is not None else "  daemon: -"

    def update(self, step: int, beta: float, client: Any, step_ms: float, last: bool = False) -> None:
        st = client.state
        state = (st.active_id, st.committed, client.stats.plans_committed)
        now = time.monotonic()
        gap = now - self.last_t
        changed = state != self.last_state
        if not (last or gap >= self.MIN_GAP_S or (changed and gap >= self.EVENT_GAP_S)):
            return
        self.last_t, self.last_state = now, state
        if st.active_id >= 0:
            plan = f"plan {st.active_id} in flight {st.committed}/{st.active_layers} layers"
        else:
            plan = "no plan in flight"
        line = (
            f"[{self.mode:5}] step {step + 1:4d}/{self.steps}  β {beta:.3f}  {plan:34}"
            f"  applied {client.stats.plans_committed:2d}  layers {client.stats.layers_committed:3d}"
            f"  step {step_ms:6.1f} ms{self._daemon_decision()}"
        )
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._dom is not None:
            with contextlib.suppress(Exception):
                self._dom.close()


ALL_RANKS = -1


def _parse_fail(text: str) -> tuple[int, int, str]:
    """``"RANK|all:STEP[:raise|crash|corrupt]"`` -> (rank or ALL_RANKS, step, kind); ValueError says why."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not (parts[0].isdigit() or parts[0] == "all") or not parts[1].isdigit():
        raise ValueError(f"--fail-at must be RANK|all:STEP[:raise|crash|corrupt], got {text!r}")
    kind = parts[2] if len(parts) == 3 else "raise"
    if kind not in ("raise", "crash", "corrupt"):
        raise ValueError(f"--fail-at kind must be 'raise', 'crash' or 'corrupt', got {kind!r}")
    return ALL_RANKS if parts[0] == "all" else int(parts[0]), int(parts[1]), kind


def _rank_main(rank: int, world: int, spec_d: dict[str, Any], mode: str, domain: str) -> dict[str, Any]:
    """One rank of one mode: the model + client for ``spec.steps`` steps; measurements out."""
    from eplbd.placement import count_moves, default_phy2log
    from eplbd_client import ClientConfig, EplbClient

    spec = DemoSpec(**spec_d)
    g = spec.geometry()
    model = _model_class()(
        g,
        rank,
        hidden=spec.hidden,
        ffn=spec.ffn,
        top_k=spec.top_k,
        tokens=spec.tokens,
        seed=spec.seed,
        skew=spec.skew,
        drift_period=spec.drift_period,
        shift_step=spec.shift_step,
    )
    cfg = ClientConfig(
        sync_interval=spec.sync_interval,
        mode=mode,
        max_staged_experts=spec.max_staged or g.num_layers * g.slots_per_rank,
        transfer_rounds_per_step=spec.pace,
        # Generous bounds: 4 ranks share 2 busy cores here.
        p2p_timeout_s=60.0,
        gather_timeout_s=120.0,
    )
    client = EplbClient(model, g, domain, config=cfg)
    lead = rank == 0
    N, K, L, R = spec.steps, spec.sync_interval, g.num_layers, g.num_ranks
    p2l0 = default_phy2log(g)
    step_ms = np.zeros(N)
    client_ms = np.zeros(N)  # the client.step() part of step_ms
    in_flight = np.zeros(N, dtype=bool)
    pause_ms = np.zeros(N)
    loads_cur = np.zeros((N, L, R), dtype=np.int64)
    loads_def = np.zeros((N, L, R), dtype=np.int64)
    checks: list[tuple[int, float, float]] = []  # (step, max |y - ref|, max |ref|)
    changes: list[tuple[int, int, int, int]] = []  # (step, epoch, remote moves, local moves)
    first_commit_step = -1
    progress = _Progress(mode, N, domain) if (lead and spec.progress) else None
    fail_rank, fail_step, fail_kind = _parse_fail(spec.fail_at) if spec.fail_at else (-2, -1, "")
    try:
        p2l = client.phy2log
        for step in range(N):
            if fail_rank in (rank, ALL_RANKS) and step == fail_step:
                if fail_kind == "crash":
                    os._exit(3)
                if fail_kind == "corrupt":  # layer 0's slots no longer hold their experts' weights
                    for w in model.expert_weights(0):
                        w.add_(1.0)
                else:
                    raise RuntimeError(f"injected failure at step {step} (--fail-at {spec.fail_at})")
            in_flight[step] = client.active_plan >= 0
            stw0 = client.stats.stw_seconds
            if lead:  # placement in force for this step's forward, and the unbalanced one
                loads_cur[step] = model.rank_loads(step, model.phy2log)
                loads_def[step] = model.rank_loads(step, p2l0)
            t0 = time.perf_counter()
            y = model.forward(step, client.record)
            tf = time.perf_counter()
            client.step()
            t1 = time.perf_counter()
            step_ms[step] = (t1 - t0) * 1e3
            client_ms[step] = (t1 - tf) * 1e3
            pause_ms[step] = (client.stats.stw_seconds - stw0) * 1e3
            new = client.phy2log
            if new is not p2l:  # commits replace the array: a (partial) placement change
                mv = count_moves(p2l, new, g)
                changes.append((step, int(client.epoch), mv.remote, mv.local))
                if first_commit_step < 0:
                    first_commit_step = step
                p2l = new
            if lead and (step % spec.check_every == spec.check_every - 1 or step == N - 1):
                ref = model.reference_forward(step)
                checks.append((step, float((y - ref).abs().max()), float(ref.abs().max())))
            if progress is not None:
                lo = step - step % K
                progress.update(
                    step,
                    _window_beta(loads_cur[lo : step + 1].sum(axis=0)),
                    client,
                    float(np.median(step_ms[lo : step + 1])),
                    last=step == N - 1,
                )
        out: dict[str, Any] = {
            "rank": rank,
            "mismatches": model.weight_mismatches(),
            "tables_ok": bool(model.tables_consistent()),
            "epoch": int(client.epoch),
            "plans_committed": client.stats.plans_committed,
            "plans_started": client.stats.plans_started,
            "plans_aborted": client.stats.plans_aborted,
            "plans_rejected": client.stats.plans_rejected,
            "layers_committed": client.stats.layers_committed,
            "history": list(client.stats.history),
            "last_error": client.stats.last_error_message,
            "phy2log": client.phy2log.copy(),
        }
        if lead:
            out.update(
                step_ms=step_ms,
                client_ms=client_ms,
                in_flight=in_flight,
                pause_ms=pause_ms,
                loads_cur=loads_cur,
                loads_def=loads_def,
                checks=checks,
                changes=changes,
                first_commit_step=first_commit_step,
            )
        return out
    finally:
        if progress is not None:
            progress.close()
        client.close()


# ----------------------------------------------------------------------------- orchestration


def _child_env() -> dict[str, str]:
    """The daemon's environment: ours without EPLBD_* (the config file is the whole config) and
    without systemd's notify/watchdog variables (a demo started from a unit must not notify)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EPLBD_", "NOTIFY_SOCKET", "WATCHDOG_")) and k != "JOURNAL_STREAM"
    }
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


class DaemonProcess:
    """The daemon as a subprocess with its config file and stderr log in ``workdir``."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.config_path = workdir / "eplbd.toml"
        self.config_path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
        self.log_path = workdir / "eplbd.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the child's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eplbd.cli", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=_child_env(),
            # Its own session: a Ctrl-C at the terminal reaches the demo, which then stops
            # the daemon with SIGTERM as systemd would; if the demo itself is killed, the
            # kernel sends the daemon SIGTERM (no orphan daemon serving a dead prefix).
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - no threads yet
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until the daemon logged its start; DemoError (with its log) if it exits or hangs."""
        deadline = time.monotonic() + timeout
        while " started " not in self.log_text():
            rc = self.proc.poll()
            if rc is not None:
                raise DemoError(f"the daemon exited with status {rc} at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"the daemon did not start within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, as systemd stops it; SIGKILL if it does not exit within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


class _Terminated(Exception):
    """SIGTERM/SIGHUP received by the demo process."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Terminated` in the main thread, so cleanup runs."""

    def handler(signum: int, _frame: Any) -> None:
        raise _Terminated(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _die_with_parent(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; no-op elsewhere).

    A demo killed with SIGKILL cannot clean up; this way its daemon and ranks
    do not outlive it."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG


def _rank_entry(rank: int, world: int, port: int, args: tuple[Any, ...], q: Any) -> None:
    """Body of a forked rank process: gloo group, :func:`_rank_main`, report on ``q``, exit."""
    # Ctrl-C is for the parent to handle: it ends the ranks itself and prints one message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # not the parent's handlers (fork copies them)
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent(signal.SIGKILL)
    code = 0
    dist: Any = None  # torch.distributed once imported
    try:
        import datetime

        import torch
        import torch.distributed

        dist = torch.distributed

        torch.set_num_threads(1)  # R ranks share the machine's cores
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        out = _rank_main(rank, world, *args)
        q.put((rank, True, out))
    except BaseException as e:
        import traceback

        q.put((rank, False, (f"{type(e).__name__}: {e}", traceback.format_exc())))
        code = 1
    finally:
        with contextlib.suppress(Exception):
            if dist is not None and dist.is_initialized():
                dist.destroy_process_group()
        q.close()
        q.join_thread()  # the report must reach the pipe before the process is gone
        os._exit(code)  # a forked child: skip the parent's atexit handlers


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


def _is_peer_loss(message: str) -> bool:
    """A gloo error that only says a peer went away (the consequence, not the cause)."""
    return "gloo" in message and any(
        k in message for k in ("closed by peer", "reset by peer", "Read error", "Write error", "Broken pipe")
    )


def _failure_message(errors: dict[int, tuple[str, str]]) -> str:
    """One line naming the failed rank(s) and why, then the failing ranks' tracebacks."""
    cause = sorted(r for r, (msg, _) in errors.items() if not _is_peer_loss(msg))
    lost = sorted(r for r in errors if r not in cause)
    if not cause:
        cause, lost = lost, []
    line = "; ".join(f"rank {r}: {errors[r][0].splitlines()[0][:300]}" for r in cause)
    if lost:
        line += f" (then rank(s) {', '.join(map(str, lost))} lost their peer)"
    tbs = [f"--- rank {r} ---\n{errors[r][1].rstrip()}" for r in cause if errors[r][1]]
    return "\n".join([line, *tbs])


def launch_ranks(world: int, args: tuple[Any, ...], timeout: float) -> list[dict[str, Any]]:
    """Fork ``world`` ranks running ``_rank_main(rank, world, *args)``; their results by rank.

    On the first failure (an exception in a rank, a rank that died, the timeout)
    the other ranks are ended too (they would wait in a collective for their
    lost peer) and :class:`DemoError` says which rank failed and how. The
    ranks are always joined before this returns or raises.
    """
    import multiprocessing as mp
    import queue

    from eplbd_client.testing import free_port

    ctx = mp.get_context("fork")  # torch is imported already: start-up in a fraction of a second
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_entry, args=(r, world, port, args, q), name=f"eplbd-demo-rank{r}", daemon=True
        )
        for r in range(world)
    ]
    results: dict[int, Any] = {}
    errors: dict[int, tuple[str, str]] = {}
    died: dict[int, float] = {}  # rank -> when its non-zero exit was first seen
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        settle = math.inf  # after the first failure, collect the others' reports this long
        while len(results) + len(errors) < world and time.monotonic() < min(settle, deadline):
            try:
                rank, ok, out = q.get(timeout=0.1)
            except queue.Empty:
                now = time.monotonic()
                for r, p in enumerate(procs):
                    if r not in results and r not in errors and p.exitcode not in (None, 0):
                        died.setdefault(r, now)
                        if now - died[r] > 1.0:  # its report (if any) would have arrived by now
                            errors[r] = (_exit_reason(p.exitcode) + " without a report", "")
                if errors:
                    settle = min(settle, now + 1.5)
                continue
            if ok:
                results[rank] = out
            else:
                errors[rank] = out
                settle = min(settle, time.monotonic() + 1.5)
        if errors:
            raise DemoError(_failure_message(errors))
        if len(results) < world:
            missing = [r for r in range(world) if r not in results]
            raise DemoError(f"timed out after {timeout:.0f} s waiting for rank(s) {missing}")
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is None:
                continue
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        q.close()
        q.cancel_join_thread()


def run_mode(spec: DemoSpec, mode: str, domain: str, timeout: float) -> dict[str, Any]:
    """Run the R ranks of one mode to the end; returns rank 0's result with every rank's checks."""
    t0 = time.perf_counter()
    try:
        res = launch_ranks(spec.ranks, (dataclasses.asdict(spec), mode, domain), timeout)
    except DemoError as e:
        raise DemoError(f"{mode} run failed: {e}") from None
    out = dict(res[0])
    out["wall_s"] = time.perf_counter() - t0
    out["all_mismatches"] = {r["rank"]: r["mismatches"] for r in res if r["mismatches"]}
    out["all_tables_ok"] = all(r["tables_ok"] for r in res)
    out["ranks_agree"] = all(
        np.array_equal(r["phy2log"], res[0]["phy2log"])
        and r["epoch"] == res[0]["epoch"]
        and r["history"] == res[0]["history"]
        for r in res
    )
    return out


def run_demo(spec: DemoSpec, *, stw: bool = True, log: Any = None) -> dict[str, Any]:
    """Start the daemon, run the modes, stop everything; returns {"async": ..., "stw": ...}.

    Raises :class:`DemoError` on a failure; KeyboardInterrupt and :class:`_Terminated`
    propagate after the cleanup.
    """
    log = log or (lambda msg: None)
    prefix = f"eplbddemo{os.getpid()}x{uuid.uuid4().hex[:8]}."
    workdir = Path(tempfile.mkdtemp(prefix="eplbd-demo-"))
    daemon: DaemonProcess | None = None
    results: dict[str, Any] = {}
    try:
        daemon = DaemonProcess(workdir, spec.daemon_config(prefix))
        daemon.wait_started()
        log(f"daemon pid {daemon.proc.pid} serving shm prefix {prefix!r} (config {daemon.config_path})")
        # A hung rank must not hang the demo: generous per-step bound on a loaded machine.
        timeout = 120.0 + 1.0 * spec.steps
        for mode in MODES if stw else MODES[:1]:
            label = "eplbd (async)" if mode == "async" else "stop-the-world"
            log(f"--- {label}: {spec.ranks} ranks, {spec.steps} steps ---")
            results[mode] = run_mode(spec, mode, f"{prefix}demo.{mode}", timeout)
            if not daemon.alive():
                raise DemoError(
                    f"the daemon exited with status {daemon.proc.returncode} during the {mode} run:\n"
                    + daemon.log_tail()
                )
        return results
    finally:
        if daemon is not None:
            rc = daemon.stop()
            text = daemon.log_text()
            results["daemon"] = {
                "pid": daemon.proc.pid,
                "exit_status": rc,
                "plans_published": text.count("decision=publish"),
                "errors_logged": sum(" error: " in ln for ln in text.splitlines()),
                "shm_prefix": prefix,
            }
            if rc != 0:
                log(f"daemon exit status {rc}:\n{daemon.log_tail()}")
        # Segments the ranks' leader did not unlink (a failed or interrupted run).
        results.setdefault("daemon", {})["shm_removed"] = remove_prefix(prefix)
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- summary


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if a.size else None


def _window_betas(loads: np.ndarray, K: int) -> np.ndarray:
    """Per-window β [W] of per-step rank loads [N, L, R] in windows of K steps."""
    W = loads.shape[0] // K
    agg = loads[: W * K].reshape(W, K, *loads.shape[1:]).sum(axis=1)  # [W, L, R]
    mx = agg.max(axis=2).sum(axis=1).astype(np.float64)
    return np.where(mx > 0, agg.mean(axis=2).sum(axis=1) / np.where(mx > 0, mx, 1.0), 1.0)


def _mode_summary(spec: DemoSpec, r: dict[str, Any]) -> dict[str, Any]:
    K = spec.sync_interval
    wb = _window_betas(r["loads_cur"], K)
    wd = _window_betas(r["loads_def"], K)
    W = len(wb)
    n_after = max(2, int(round(0.15 * W)))
    fc = r["first_commit_step"]
    n_before = max(1, fc // K) if fc >= 0 else W
    keep = np.arange(spec.steps) >= spec.warmup
    ms = r["step_ms"][keep]
    cms = r["client_ms"][keep]
    fl = r["in_flight"][keep]
    pause = r["pause_ms"]
    checks = r["checks"]
    diffs = [d / max(1.0, m) for _, d, m in checks]
    outputs_ok = bool(checks) and max(diffs) <= OUTPUT_RTOL
    remote = sum(c[2] for c in r["changes"])
    return {
        "beta_before": float(wb[:n_before].mean()),
        "beta_after": float(wb[-n_after:].mean()),
        "beta_unbalanced": float(wd.mean()),
        "beta_unbalanced_after": float(wd[-n_after:].mean()),
        "windows_before": int(n_before),
        "windows_after": int(n_after),
        "plans_applied": int(r["plans_committed"]),
        "plans_aborted": int(r["plans_aborted"]),
        "plans_rejected": int(r["plans_rejected"]),
        "layers_committed": int(r["layers_committed"]),
        "moves_remote": int(remote),
        "moves_local": int(sum(c[3] for c in r["changes"])),
        "bytes_moved": int(remote * spec.expert_bytes),
        "step_ms_p50": _pct(ms, 50),
        "step_ms_p99": _pct(ms, 99),
        "step_ms_max": float(ms.max()) if ms.size else None,
        "step_ms_p99_in_flight": _pct(ms[fl], 99),
        "step_ms_p99_idle": _pct(ms[~fl], 99),
        "step_ms_p50_in_flight": _pct(ms[fl], 50),
        "step_ms_p50_idle": _pct(ms[~fl], 50),
        "steps_in_flight": int(fl.sum()),
        # client.step() alone (sync, decisions, commits; stop-the-world transfers)
        "client_ms_p50": _pct(cms, 50),
        "client_ms_p99": _pct(cms, 99),
        "client_ms_max": float(cms.max()) if cms.size else None,
        "pause_ms_max": float(pause.max()) if pause.size else 0.0,
        "pause_ms_total": float(pause.sum()),
        "outputs_match": bool(
            outputs_ok and not r["all_mismatches"] and r["all_tables_ok"] and r["ranks_agree"]
        ),
        "outputs_max_abs_diff": max((d for _, d, _ in checks), default=None),
        "outputs_max_rel_diff": max(diffs, default=None),
        "outputs_checked_steps": len(checks),
        "weights_bitwise": not r["all_mismatches"],
        "ranks_agree": bool(r["ranks_agree"]),
        "first_commit_step": int(fc),
        "wall_s": float(r["wall_s"]),
    }


def summarize(spec: DemoSpec, results: dict[str, Any]) -> dict[str, Any]:
    """The summary object (what ``--json`` prints): eplbd's figures, stop-the-world's beside them."""
    a = _mode_summary(spec, results["async"])
    s = _mode_summary(spec, results["stw"]) if "stw" in results else None
    out: dict[str, Any] = {
        "beta_before": a["beta_before"],
        "beta_after": a["beta_after"],
        "beta_unbalanced_after": a["beta_unbalanced_after"],
        "plans_applied": a["plans_applied"],
        "moves_remote": a["moves_remote"],
        "bytes_moved": a["bytes_moved"],
        "step_ms_p50": a["step_ms_p50"],
        "step_ms_p99": a["step_ms_p99"],
        "step_ms_p99_in_flight": a["step_ms_p99_in_flight"],
        "step_ms_p99_idle": a["step_ms_p99_idle"],
        "stw_step_ms_p50": s["step_ms_p50"] if s else None,
        "stw_step_ms_p99": s["step_ms_p99"] if s else None,
        "stw_pause_ms_max": s["pause_ms_max"] if s else None,
        "stw_beta_after": s["beta_after"] if s else None,
        "stw_plans_applied": s["plans_applied"] if s else None,
        "outputs_match": a["outputs_match"] and (s["outputs_match"] if s else True),
        "config": {
            **{k: v for k, v in dataclasses.asdict(spec).items() if k != "progress"},
            "slots_per_rank": spec.slots,
            "shift_step": spec.shift_step,
            "warmup_steps": spec.warmup,
            "expert_bytes": spec.expert_bytes,
        },
        "async": a,
        "stw": s,
        "daemon": results.get("daemon"),
    }
    return out


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary table."""
    c, a, s = summary["config"], summary["async"], summary["stw"]
    head = (
        f"eplbd demo: {c['ranks']} ranks, {c['layers']} MoE layers x {c['experts']} experts "
        f"({c['slots_per_rank']} slots/rank, {_mib(c['expert_bytes'])}/expert), {c['steps']} steps, "
        f"sync every {c['sync_interval']}, plan every {c['plan_every']}, "
        f"routing shift at step {c['shift_step']}"
    )

    def row(name: str, fa: str, fs: str) -> str:
        return f"  {name:34} {fa:>16} {fs:>16}"

    def both(label: str, key: str, fmt: str = "{:.1f}") -> str:
        return row(label, _f(a[key], fmt), _f(s[key], fmt) if s else "-")

    lines = [head, row("", "eplbd (async)", "stop-the-world" if s else "(--no-stw)")]
    lines.append(both(f"β before (first {a['windows_before']} windows)", "beta_before", "{:.3f}"))
    lines.append(both(f"β after (last {a['windows_after']} windows)", "beta_after", "{:.3f}"))
    lines.append(both("β without balancing (same windows)", "beta_unbalanced_after", "{:.3f}"))
    lines.append(both("plans applied", "plans_applied", "{:d}"))
    lines.append(both("remote moves", "moves_remote", "{:d}"))
    lines.append(row("bytes moved", _mib(a["bytes_moved"]), _mib(s["bytes_moved"]) if s else "-"))
    lines.append(both("step time p50 (ms)", "step_ms_p50"))
    lines.append(both("step time p99 (ms)", "step_ms_p99"))
    lines.append(both("step time max (ms)", "step_ms_max"))
    lines.append(
        row(
            "p99 plan in flight / none (ms)",
            f"{_f(a['step_ms_p99_in_flight'])} / {_f(a['step_ms_p99_idle'])}",
            "-",
        )
    )
    lines.append(
        row(
            "p50 plan in flight / none (ms)",
            f"{_f(a['step_ms_p50_in_flight'])} / {_f(a['step_ms_p50_idle'])}",
            "-",
        )
    )
    lines.append(row("steps with a plan in flight", str(a["steps_in_flight"]), "-"))
    lines.append(
        row(
            "forward pause max / total (ms)",
            f"{a['pause_ms_max']:.0f} / {a['pause_ms_total']:.0f}",
            f"{s['pause_ms_max']:.0f} / {s['pause_ms_total']:.0f}" if s else "-",
        )
    )
    lines.append(
        row(
            "outputs match unbalanced model",
            "yes" if a["outputs_match"] else "NO",
            ("yes" if s["outputs_match"] else "NO") if s else "-",
        )
    )
    lines.append(both("wall time of the run (s)", "wall_s"))
    m = summary.get("machine")
    if m:
        lines.append(
            f"  machine: {m['cpus']} CPUs, load average {m['loadavg_before']:.1f} at start, "
            f"{m['loadavg_after']:.1f} at end; whole run {summary['wall_s_total']:.0f} s"
        )
    a_in, a_idle = a["step_ms_p99_in_flight"], a["step_ms_p99_idle"]
    notes = [
        f"  step times exclude the first {c['warmup_steps']} warm-up steps; β is per window of "
        f"{c['sync_interval']} steps;\n  outputs compared on {a['outputs_checked_steps']} steps "
        f"(max |Δ| {_f(a['outputs_max_abs_diff'], '{:.1e}')}), weights bitwise on every rank",
    ]
    if a_in is not None and a_idle:
        d = 100 * (a_in / a_idle - 1)
        notes.append(
            f"  eplbd: p99 step time with a plan in flight is {abs(d):.1f}% "
            f"{'above' if d > 0 else 'below'} p99 with none (target: within 10%)"
        )
    if s:
        notes.append(
            f"  stop-the-world: the forward thread paused up to {s['pause_ms_max']:.0f} ms "
            f"({s['pause_ms_max'] / max(a['step_ms_p50'] or 1, 1e-9):.1f}x a median step)"
        )
    return "\n".join(lines + notes)


def plot(spec: DemoSpec, results: dict[str, Any], path: str) -> None:
    """β per window and step time per step, for both modes, into ``path`` (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = spec.sync_interval
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colors = {"async": "tab:blue", "stw": "tab:red"}
    names = {"async": "eplbd (async)", "stw": "stop-the-world"}
    first = True
    for mode in MODES:
        r = results.get(mode)
        if r is None:
            continue
        wb = _window_betas(r["loads_cur"], K)
        x = (np.arange(len(wb)) + 1) * K
        ax1.step(x, wb, where="post", color=colors[mode], label=names[mode])
        if first:
            wd = _window_betas(r["loads_def"], K)
            ax1.step(x, wd, where="post", color="gray", ls="--", label="no balancing")
            first = False
        steps = np.arange(spec.steps)
        ax2.plot(steps, r["step_ms"], color=colors[mode], lw=0.8, label=names[mode])
        if mode == "async" and r["in_flight"].any():
            fl = r["in_flight"]
            ax2.scatter(
                steps[fl], r["step_ms"][fl], s=6, color="tab:cyan", label="eplbd: plan in flight", zorder=3
            )
        if mode == "stw" and (r["pause_ms"] > 0).any():
            ps = r["pause_ms"] > 0
            ax2.scatter(
                steps[ps],
                r["step_ms"][ps],
                s=18,
                marker="v",
                color="darkred",
                label="stop-the-world: plan executed in the step",
                zorder=4,
            )
    for ax in (ax1, ax2):
        ax.axvline(spec.shift_step, color="k", ls=":", lw=1)
    ax1.set_ylabel("β (per window)")
    ax1.set_ylim(0, 1.05)
    ax1.legend(loc="lower right")
    ax1.set_title(f"eplbd demo: {spec.ranks} ranks, routing shift at step {spec.shift_step} (dotted)")
    ax2.set_yscale("log")
    ax2.set_ylabel("step time (ms)")
    ax2.set_xlabel("step")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def _int_range(lo: int, hi: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v

    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return v


def configure_parser(p: argparse.ArgumentParser) -> None:
    d = DemoSpec()
    p.add_argument("--ranks", type=_int_range(2, 8), default=d.ranks, help=f"EP ranks (default {d.ranks})")
    p.add_argument(
        "--steps",
        type=_int_range(16, 100_000),
        default=d.steps,
        help=f"forward steps per mode (default {d.steps})",
    )
    p.add_argument(
        "--sync-interval",
        type=_int_range(1, 1000),
        default=d.sync_interval,
        help=f"steps per sync/window, K (default {d.sync_interval})",
    )
    p.add_argument(
        "--plan-every",
        type=_int_range(1, 100_000),
        default=d.plan_every,
        help=f"steps between daemon plans (its num_iterations; default {d.plan_every})",
    )
    p.add_argument(
        "--max-staged",
        type=_int_range(0, 1_000_000),
        default=d.max_staged,
        help="client staging pool in experts per rank; 0 (default) = layers x slots, a whole plan",
    )
    p.add_argument(
        "--pace",
        type=_nonneg_float,
        default=d.pace,
        help="rebalance pace: p2p transfer rounds started per forward step (0 = unpaced, "
        f"a plan's rounds as fast as they go; default {d.pace})",
    )
    p.add_argument(
        "--shift-at",
        type=_fraction,
        default=d.shift_at,
        help=f"fraction of the steps after which the hot spot jumps (1: never; default {d.shift_at})",
    )
    p.add_argument("--seed", type=_int_range(0, 2**31 - 1), default=d.seed, help="model and routing seed")
    p.add_argument(
        "--hidden", type=_int_range(4, 4096), default=d.hidden, help=f"expert width d (default {d.hidden})"
    )
    p.add_argument(
        "--ffn", type=_int_range(4, 16384), default=d.ffn, help=f"expert hidden width h (default {d.ffn})"
    )
    p.add_argument(
        "--tokens", type=_int_range(8, 8192), default=d.tokens, help=f"tokens per step (default {d.tokens})"
    )
    p.add_argument("--no-stw", action="store_true", help="skip the stop-the-world comparison run")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, no progress")
    p.add_argument("--plot", metavar="PNG", help="draw β and step time over the steps of both modes into PNG")
    p.add_argument("--quiet", "-q", action="store_true", help="no live progress")
    # Fault injection for the tests (a rank raises or dies at a step): not for users.
    p.add_argument("--fail-at", default="", help=argparse.SUPPRESS)


def _spec_from_args(args: argparse.Namespace) -> DemoSpec:
    spec = DemoSpec(
        ranks=args.ranks,
        steps=args.steps,
        sync_interval=args.sync_interval,
        plan_every=args.plan_every,
        max_staged=args.max_staged,
        pace=args.pace,
        shift_at=args.shift_at,
        seed=args.seed,
        hidden=args.hidden,
        ffn=args.ffn,
        tokens=args.tokens,
        progress=not (args.quiet or args.json),
        fail_at=args.fail_at,
    )
    if spec.fail_at:
        r, _, _ = _parse_fail(spec.fail_at)
        if r >= spec.ranks:
            raise ValueError(f"--fail-at rank {r} is not below --ranks {spec.ranks}")
    if spec.steps < 4 * spec.sync_interval:
        raise ValueError(
            f"--steps ({spec.steps}) must be at least 4 x --sync-interval ({spec.sync_interval}): "
            "the daemon needs windows to plan from"
        )
    if spec.plan_every < spec.sync_interval:
        raise ValueError(
            f"--plan-every ({spec.plan_every}) must be at least --sync-interval ({spec.sync_interval})"
        )
    spec.geometry()  # GeometryError (a ValueError) names the field
    return spec


def run_cli(args: argparse.Namespace) -> int:
    def err(msg: str) -> None:
        print(f"eplbd demo: error: {msg}", file=sys.stderr, flush=True)

    try:
        spec = _spec_from_args(args)
    except ValueError as e:
        err(str(e))
        return 2
    if args.plot:
        parent = Path(args.plot).resolve().parent
        if not parent.is_dir():
            err(f"--plot: directory {parent} does not exist")
            return 2
    try:
        import torch  # noqa: F401 - the ranks need it; fail here with a clear message

        import eplbd_client  # noqa: F401
    except ImportError as e:
        err(f"the demo needs torch and the eplbd client (pip install -e '.[client]'): {e}")
        return 2
    human = not args.json
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if human and not args.quiet else None
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]  # the figures depend on what else the machine runs
    try:
        with _terminate_as_exception():
            results = run_demo(spec, stw=not args.no_stw, log=say)
    except DemoError as e:
        err(f"{e}\n(daemon stopped, ranks ended, shm removed)")
        return 1
    except KeyboardInterrupt:
        err("interrupted; daemon stopped, ranks ended, shm removed")
        return 130
    except _Terminated as e:
        err(f"terminated by {e}; daemon stopped, ranks ended, shm removed")
        return 143
    summary = summarize(spec, results)
    summary["wall_s_total"] = time.perf_counter() - t0
    summary["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg()[0],
    }
    plot_ok = True
    try:
        if args.plot:
            try:
                plot(spec, results, args.plot)
            except Exception as e:  # the run's figures are still worth printing
                err(f"--plot {args.plot}: {type(e).__name__}: {e}")
                plot_ok = False
        if args.json:
            print(json.dumps(summary, indent=None, sort_keys=False), flush=True)
        else:
            print(format_summary(summary), flush=True)
            if args.plot and plot_ok:
                print(f"  plot: {args.plot}", flush=True)
    except KeyboardInterrupt:  # everything is cleaned up already
        err("interrupted")
        return 130
    if not summary["outputs_match"]:
        err("the balanced model's outputs or weights differ from the unbalanced model's (see outputs_*)")
        return 1
    return 0 if plot_ok else 1
