"""`eplbd run`: the per-node daemon that turns recorded expert load into plans.

Structure (imperative shell around the pure policy/forecast/planner core):

- The **main thread** owns process-wide things: config (and its SIGHUP reload),
  signals, domain discovery (``list_domains(prefix)`` every
  ``discovery_interval_s`` <= 1 s), the systemd notify protocol (READY, STATUS,
  WATCHDOG, STOPPING), the metrics server, and the release of segments whose
  owner died.
- Before serving a domain the daemon takes ``flock(LOCK_EX)`` on its segment
  file, so two daemons (systemd's and a stray manual one) never both plan for
  it; the kernel drops the lock when its holder dies, so a restarted daemon
  takes over at once. WATCHDOG=1 is withheld while a worker has not looped for
  :data:`STALL_S`, so systemd restarts a daemon with a hung worker.
- Each attached **domain gets one worker thread** that sleeps on the domain's
  doorbell (timeout ``poll_interval_s``), reads new windows, decides and
  publishes plans and writes :class:`DaemonInfo`. One thread per domain is the
  simplest way to keep one domain's planning (hundreds of ms for a large model)
  or one broken segment (retrying torn reads) from delaying any other domain;
  the heavy numpy work releases the GIL, so threads do overlap.

**When a plan is computed.** Windows carry their step range, so a domain's sync
interval is ``K = step_end - step_begin`` and the plan interval in windows is
``n = ceil(num_iterations / K)``. Window ``w`` triggers a decision when
``w % n == n - 1`` (after windows 0..n-1, then every n windows). Only the newest
trigger at or below the latest window is decided; older ones are stale. The
plan id is the triggering window id, and the forecast reads windows
``[w - history_windows + 1, w]`` by id (not "the newest"), so every node's
daemon computes the same plan from the same ring contents.

**No state that shm cannot rebuild.** On attach the worker takes as already
decided every trigger ``<= max(latest_plan_id, DaemonInfo.last_window)``. A
daemon killed mid-decision had not yet written its DaemonInfo for that trigger,
so the restarted one decides it again (the decision is deterministic). A plan
is "in flight" from its publication until the plan status reports it final
(committed, aborted, rejected) or the placement in force reaches its epoch; a
new plan is not published while one is in flight unless the in-flight one made
no progress for ``plan_timeout_s`` (the timer restarts with the daemon, which
only makes it more patient). A plan that only some nodes' daemons published is
never started; the ranks reject it after ``divergence_syncs`` syncs (client
setting) and write that status, which ends it here like any rejection; the
worker logs every such rejection (``plan mismatch between nodes``).

**Gate.** ``beta_now`` and ``beta_pred`` are both the balancedness of the
*forecast* load, under the placement in force and under the new placement; the
plan is published only if ``beta_pred - beta_now >= min_gain`` and its moves do
not exceed ``max_moves_per_plan`` (0 = no limit). Every plan is checked with
:func:`eplbd.planner.validate_plan` before :meth:`Domain.publish_plan`, whose
double buffer makes a kill at any instant leave either the old or the new
plan current, never a half one.

**Logging.** One line per decision on stderr, ``key=value`` after an
``eplbd:`` tag; under journald (``$JOURNAL_STREAM`` set) each line starts with
its syslog priority ``<N>`` so journald records the level, elsewhere with a
UTC timestamp and the level name.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eplbd.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config, unknown_env
from eplbd.ctl import ERR_TRANSFER_UNSAFE, MISMATCH_ERRORS, plan_error_name
from eplbd.metrics import NullMetrics, make_metrics
from eplbd.notify import Notifier
from eplbd.placement import MoveCounts, count_moves
from eplbd.planner import build_plan, validate_plan
from eplbd.policy import propose
from eplbd.shm import (
    PLAN_ABORTED,
    PLAN_COMMITTED,
    PLAN_REJECTED,
    DaemonInfo,
    Domain,
    PlanStatus,
    TornReadError,
    list_domains,
)
from eplbd.shm.names import segment_path

__all__ = ["Daemon", "Logger", "configure_parser", "run_cli", "plan_interval_windows", "trigger_window"]

#: A worker that has not completed a loop iteration for this long is considered hung:
#: the daemon stops pinging the systemd watchdog so that systemd restarts it. A
#: DeepSeek-V3-sized decision takes well under a second.
STALL_S = 60.0

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}


class Logger:
    """Thread-safe one-line ``key=value`` logger on a text stream (stderr)."""

    def __init__(self, level: str = "info", stream: Any = None, journal: bool | None = None) -> None:
        self.level = level
        self.stream = sys.stderr if stream is None else stream
        self.journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal
        self._lock = threading.Lock()

    def log(self, level: str, msg: str = "", **kv: Any) -> None:
        if _PRIORITY[level] > _PRIORITY[self.level]:
            return
        parts = [msg] if msg else []
        parts += [f"{k}={_fmt(v)}" for k, v in kv.items()]
        body = " ".join(parts)
        if self.journal:
            line = f"<{_PRIORITY[level]}>eplbd: {body}\n"
        else:
            ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            line = f"{ts} eplbd[{os.getpid()}] {level}: {body}\n"
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone (closed journal pipe): keep serving.

    def debug(self, msg: str = "", **kv: Any) -> None:
        self.log("debug", msg, **kv)

    def info(self, msg: str = "", **kv: Any) -> None:
        self.log("info", msg, **kv)

    def warning(self, msg: str = "", **kv: Any) -> None:
        self.log("warning", msg, **kv)

    def error(self, msg: str = "", **kv: Any) -> None:
        self.log("error", msg, **kv)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    s = str(v)
    # Values with spaces are quoted so a line stays machine-splittable.
    return '"' + s.replace('"', "'") + '"' if (" " in s or not s) else s


def plan_interval_windows(num_iterations: int, steps_per_window: int) -> int:
    """n = ceil(num_iterations / K), at least 1."""
    return max(1, math.ceil(num_iterations / max(1, steps_per_window)))


def trigger_window(latest: int, n: int) -> int:
    """The newest window id <= ``latest`` with ``id % n == n - 1`` (-1 if none)."""
    if latest < n - 1:
        return -1
    return latest - ((latest + 1) % n)


@dataclass
class Decision:
    """Outcome of one trigger (what the log line, DaemonInfo and metrics report)."""

    window: int
    decision: str  # publish | skip | wait | error
    reason: str = ""
    beta_now: float = float("nan")
    beta_pred: float = float("nan")
    moves: MoveCounts | None = None
    compute_ms: float = 0.0
    plan_id: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


class DomainWorker(threading.Thread):
    """Serves one attached domain until stopped, released or its owner dies."""

    def __init__(self, daemon: Daemon, dom: Any, claim_fd: int = -1) -> None:
        super().__init__(name=f"eplbd:{dom.name}", daemon=True)
        self.d = daemon
        self.dom = dom
        self.claim_fd = claim_fd  # flock on the segment: see Daemon._claim
        self.name_ = dom.name
        self.stop_event = threading.Event()
        self.owner_dead = False
        self.fatal = ""
        self.started_ns = time.time_ns()
        self.windows_seen = 0
        self.plans_published = 0
        self.errors = 0
        self.last_seen = -1  # newest window id read
        self.handled = -1  # newest trigger window decided (or taken as decided)
        self.last_decision = "attached"
        # DaemonInfo reports beta now/predicted of the last evaluation (a decision that ran
        # the policy) and moves/compute time of the last published plan.
        self.last_eval: Decision | None = None
        self.last_plan: Decision | None = None
        self.loop_at = time.monotonic()  # last loop iteration (the main thread's stall check)
        self._inflight: tuple[int, int, float] | None = None  # (plan id, layers committed, since)
        self._last_heartbeat = 0.0
        self._last_error = ""
        self._wcache: dict[int, np.ndarray] = {}  # window id -> loads [L, E] (see history())
        self._status_seen: tuple[int, int, int] | None = None  # last PlanStatus logged (id, state, error)

    # --- lifecycle -------------------------------------------------------------------------

    def resume_point(self) -> None:
        """Rebuild what was already decided from shm alone."""
        dom = self.dom
        try:
            info = dom.read_daemon_info()
        except TornReadError:
            if not dom.daemon_info_mid_write():
                raise  # content failing its CRC at a stable sequence: corrupt
            # This daemon holds the segment lock, so no live daemon writes the region: a
            # predecessor was killed inside a heartbeat. write_info() writes a new version;
            # only its last handled window is lost (plan ids come from the plan word).
            self.d.log.warning("daemon info left mid-write by a previous daemon; rewriting it",
                               domain=self.name_)  # fmt: skip
            info = None
        self.handled = max(dom.latest_plan_id(), info.last_window if info is not None else -1)
        self.last_seen = max(self.handled, -1)

    def run(self) -> None:
        log = self.d.log
        try:
            self.resume_point()
            self.write_info()
        except Exception as e:  # a segment that cannot even be read: report and give up on it
            self.fatal = f"cannot resume: {type(e).__name__}: {e}"
            self.fail(self.fatal)
            self.d.worker_exited(self)
            return
        log.info(
            "serving domain",
            domain=self.name_,
            resume_after_window=self.handled,
            geometry=_geom_str(self.dom.geometry),
        )
        while not (self.stop_event.is_set() or self.d.stop_event.is_set()):
            self.loop_at = time.monotonic()
            try:
                self.dom.wait_doorbell(self.d.cfg.poll_interval_s)
                if self.stop_event.is_set() or self.d.stop_event.is_set():
                    break
                if not self.dom.owner_alive():
                    self.owner_dead = True
                    log.warning(
                        "owner process is dead; releasing domain",
                        domain=self.name_,
                        owner_pid=self.dom.owner_pid,
                    )
                    break
                self.step()
                self._last_error = ""
            except Exception as e:
                self.fail(f"{type(e).__name__}: {e}")
                # Back off a little so a persistently broken segment does not spin.
                self.stop_event.wait(min(1.0, self.d.cfg.poll_interval_s * 5))
        self.d.worker_exited(self)

    def fail(self, what: str) -> None:
        self.errors += 1
        self.d.metrics.error(self.name_)
        if what != self._last_error:  # one line per distinct error, not one per retry
            self.d.log.error("domain error", domain=self.name_, error=what)
            self._last_error = what

    def release_claim(self) -> None:
        fd, self.claim_fd = self.claim_fd, -1
        if fd >= 0:
            os.close(fd)

    # --- one iteration ---------------------------------------------------------------------

    def step(self) -> None:
        dom, cfg = self.dom, self.d.cfg
        latest = dom.latest_window_id()
        if latest > self.last_seen:
            new = latest - self.last_seen if self.last_seen >= 0 else latest + 1
            self.windows_seen += new
            self.d.metrics.windows(self.name_, new)
            w = dom.read_window(latest)
            if w is not None:
                n = plan_interval_windows(cfg.num_iterations, int(w.step_end) - int(w.step_begin))
                trig = trigger_window(latest, n)
                if trig > self.handled:
                    self.handled = trig
                    self.decide(trig)
            self.last_seen = latest
        self.watch_status()
        now = time.monotonic()
        if now - self._last_heartbeat >= cfg.heartbeat_interval_s:
            self.write_info()

    def watch_status(self) -> None:
        """Log each new plan outcome the ranks report with an error (log only; decides nothing).

        A mismatch between nodes (hash differs, or only some nodes' daemons
        published the plan) is logged as an error: the daemons of this job
        disagree, e.g. different configs or versions, or one is down. The
        rejection is final, so :meth:`plan_in_flight` does not wait for it.
        """
        try:
            st = self.dom.read_plan_status()
        except Exception:  # torn under contention: only a log line is at stake, look again next loop
            return
        key = (st.plan_id, st.state, st.error)
        if key == self._status_seen:
            return
        self._status_seen = key
        if not st.error or st.state not in (PLAN_ABORTED, PLAN_REJECTED):
            return
        state = "rejected" if st.state == PLAN_REJECTED else "aborted"
        kv: dict[str, Any] = {
            "domain": self.name_,
            "plan": st.plan_id,
            "state": state,
            "error": plan_error_name(st.error),
        }
        if st.error in MISMATCH_ERRORS:
            mine = self.dom.latest_plan_id()
            kv["published_here"] = "yes" if st.plan_id == mine else ("no" if mine < st.plan_id else "unknown")
            self.d.log.error(f"plan mismatch between nodes: {MISMATCH_ERRORS[st.error]}", **kv)
        else:
            self.d.log.warning(f"plan {state} by the ranks", layers_committed=st.layers_committed, **kv)

    def write_info(self) -> None:
        ev, plan = self.last_eval, self.last_plan
        moves = plan.moves if plan is not None and plan.moves is not None else MoveCounts(0, 0, 0)
        info = DaemonInfo(
            pid=os.getpid(),
            started_ns=self.started_ns,
            heartbeat_ns=time.time_ns(),
            windows_seen=self.windows_seen,
            plans_published=self.plans_published,
            errors=self.errors,
            last_window=max(self.handled, self.last_seen),
            last_decision=self.last_decision.encode()[:96].decode(errors="ignore"),
            beta_now=float(ev.beta_now) if ev is not None else float("nan"),
            beta_pred=float(ev.beta_pred) if ev is not None else float("nan"),
            moves_remote=moves.remote,
            moves_cross_node=moves.cross_node,
            moves_local=moves.local,
            compute_ms=float(plan.compute_ms) if plan is not None else 0.0,
        )
        self.dom.write_daemon_info(info)
        self._last_heartbeat = time.monotonic()

    def plan_in_flight(self, st: PlanStatus) -> int:
        """Id of the published plan that still blocks a new one, or -1 (``st``: the ranks'
        latest plan status)."""
        dom = self.dom
        pid = dom.latest_plan_id()
        if pid < 0:
            return -1
        epoch, _ = dom.read_placement()
        if (
            epoch == pid
            or st.plan_id > pid
            or (st.plan_id == pid and st.state in (PLAN_COMMITTED, PLAN_ABORTED, PLAN_REJECTED))
        ):
            self._inflight = None
            return -1
        layers = st.layers_committed if st.plan_id == pid else -1
        now = time.monotonic()
        if self._inflight is None or self._inflight[:2] != (pid, layers):
            self._inflight = (pid, layers, now)  # progress restarts the timeout
        if now - self._inflight[2] >= self.d.cfg.plan_timeout_s:
            return -1
        return pid

    def decide(self, trig: int) -> None:
        t0 = time.perf_counter()
        try:
            dec = self._decide(trig, t0)
        except Exception as e:
            dec = Decision(trig, "error", reason=f"{type(e).__name__}: {e}")
            self.errors += 1
            self.d.metrics.error(self.name_)
        dec.compute_ms = (time.perf_counter() - t0) * 1e3
        if not math.isnan(dec.beta_now):
            self.last_eval = dec
        if dec.decision == "publish":
            self.last_plan = dec
        self.report(dec)
        # DaemonInfo.last_window = trig marks the trigger as decided (see module docstring).
        self.write_info()

    def _decide(self, trig: int, t0: float) -> Decision:
        dom, cfg, g = self.dom, self.d.cfg, self.dom.geometry
        st = dom.read_plan_status()
        inflight = self.plan_in_flight(st)
        if inflight >= 0:
            return Decision(trig, "wait", reason="plan_in_flight", plan_id=inflight)
        if st.error == ERR_TRANSFER_UNSAFE:
            # The ranks refuse every plan until they restart (a new segment, a fresh status):
            # planning for them would only burn CPU and fill the log with refusals.
            return Decision(trig, "skip", reason="ranks_refuse_plans", plan_id=int(st.plan_id))
        ph: dict[str, float] = {}
        t = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal t
            now = time.perf_counter()
            ph[phase] = (now - t) * 1e3
            t = now

        wins = self.history(trig)
        if not wins:
            return Decision(trig, "skip", reason="window_overwritten")
        loads = np.stack(wins)  # [W, L, E]
        epoch, cur = dom.read_placement()  # [L, P] int32
        lap("read")
        # The same pure pipeline `eplbd replay` runs: forecast, policy (with its
        # history-fitted slack), beta of the forecast under the old/new placement.
        prop = propose(loads, cur, g, policy=cfg.policy, forecast=cfg.forecast,
                       forecast_alpha=cfg.forecast_alpha)  # fmt: skip
        ph["forecast"] = prop.forecast_ms
        lap("policy")
        ph["policy"] -= prop.forecast_ms
        new, beta_now, beta_pred = prop.phy2log, prop.beta_now, prop.beta_pred
        moves = count_moves(cur, new, g)
        lap("gate")
        dec = Decision(trig, "skip", beta_now=beta_now, beta_pred=beta_pred, moves=moves)
        if moves.total == 0:
            dec.reason = "no_change"
        elif beta_pred - beta_now < cfg.min_gain:
            dec.reason = "gain_below_min"
            dec.extra["min_gain"] = cfg.min_gain
        elif cfg.max_moves_per_plan and moves.total > cfg.max_moves_per_plan:
            dec.reason = "moves_over_max"
            dec.extra["max_moves"] = cfg.max_moves_per_plan
        else:
            plan = build_plan(trig, epoch, cur, new, g)
            lap("plan")
            validate_plan(plan, cur, g)
            lap("validate")
            if self.stop_event.is_set() or self.d.stop_event.is_set():
                return Decision(trig, "skip", reason="stopping")
            dom.publish_plan(plan)
            lap("publish")
            self.plans_published += 1
            self.d.last_plan = (self.name_, trig)
            dec.decision, dec.plan_id = "publish", trig
            dec.extra["ops"] = plan.num_ops
        dec.extra["phases_ms"] = ",".join(f"{k}:{v:.1f}" for k, v in ph.items())
        return dec

    def history(self, trig: int) -> list[np.ndarray]:
        """Loads [L, E] of windows ``[trig - history_windows + 1, trig]`` still in the ring, oldest first.

        Windows never change once written (ids strictly increase; a slot is only
        reused for a newer id), so they are cached by id; the cache is just a
        copy of the ring and is rebuilt from it after a restart.
        """
        lo = max(0, trig - self.d.cfg.history_windows + 1)
        cache = {wid: a for wid, a in self._wcache.items() if lo <= wid <= trig}
        out = []
        for wid in range(lo, trig + 1):
            a = cache.get(wid)
            if a is None:
                w = self.dom.read_window(wid)
                if w is None:
                    continue  # overwritten (ring smaller than the history) or never written
                a = cache[wid] = w.loads
            out.append(a)
        self._wcache = cache
        return out

    def report(self, dec: Decision) -> None:
        kv: dict[str, Any] = {"domain": self.name_, "window": dec.window, "decision": dec.decision}
        if dec.reason:
            kv["reason"] = dec.reason
        if dec.plan_id >= 0:
            kv["plan"] = dec.plan_id
        if not math.isnan(dec.beta_now):
            kv["beta_now"] = dec.beta_now
            kv["beta_pred"] = dec.beta_pred
        if dec.moves is not None:
            kv.update(
                moves_remote=dec.moves.remote,
                moves_cross_node=dec.moves.cross_node,
                moves_local=dec.moves.local,
            )
        kv.update(dec.extra)
        kv["compute_ms"] = round(dec.compute_ms, 2)
        level = "error" if dec.decision == "error" else "info"
        self.d.log.log(level, **kv)
        summary = f"{dec.decision} w={dec.window}"
        if dec.decision == "publish" and dec.moves is not None:
            summary += f" moves={dec.moves.total} b={dec.beta_now:.3f}->{dec.beta_pred:.3f}"
        elif dec.reason:
            summary += f" {dec.reason}"
        self.last_decision = summary
        self.d.metrics.decision(
            self.name_, dec.decision, dec.beta_now, dec.beta_pred, dec.moves, dec.compute_ms
        )


def _geom_str(g: Any) -> str:
    return f"L{g.num_layers}xE{g.num_experts}/R{g.num_ranks}xS{g.slots_per_rank}/N{g.num_nodes}"


class Daemon:
    """The service: discovery, workers, signals, notify, metrics (see module docstring)."""

    def __init__(
        self,
        cfg: Config,
        config_path: str | None,
        log: Logger | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.log = log or Logger(cfg.log_level)
        self.notifier = notifier or Notifier()
        self.metrics: NullMetrics = NullMetrics()
        self.stop_event = threading.Event()
        self.reload_requested = False
        self.stop_signal = ""
        self.workers: dict[str, DomainWorker] = {}
        self.broken: dict[str, str] = {}  # name -> last error (logged once per change)
        self.dead: dict[str, tuple[float, int, int]] = {}  # name -> (since, owner pid, created ns)
        self.last_plan: tuple[str, int] | None = None
        self.backoff: dict[str, float] = {}  # name -> monotonic time before which it is not retried
        self._lock = threading.Lock()
        self._exited: list[DomainWorker] = []
        self._status = ""
        self._stall_logged = False

    # --- signals ---------------------------------------------------------------------------

    def install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            # No logging here: the handler runs between bytecodes of the main thread,
            # which may hold the logger's lock.
            self.stop_signal = signal.Signals(signum).name
            self.stop_event.set()

        def hup(_signum: int, _frame: Any) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def reload(self) -> None:
        self.reload_requested = False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            self.log.error("reload failed; keeping the running config", error=str(e))
            self.notifier.ready(self.status_text())
            return
        old, self.cfg = self.cfg, new
        self.log.level = new.log_level
        if (old.metrics_port, old.metrics_addr) != (new.metrics_port, new.metrics_addr):
            self.metrics.close()
            self.metrics = NullMetrics()
            self.start_metrics()
        changed = [k for k in old.__dataclass_fields__ if getattr(old, k) != getattr(new, k)]
        self.log.info("config reloaded", changed=",".join(changed) or "none")
        self.notifier.ready(self.status_text())

    def start_metrics(self) -> None:
        if self.cfg.metrics_port <= 0:
            return
        try:
            self.metrics = make_metrics(self.cfg.metrics_port, self.cfg.metrics_addr)
            self.log.info("metrics serving", addr=self.cfg.metrics_addr, port=self.metrics.port)
        except Exception as e:  # port taken etc.: balancing matters more than metrics
            self.log.error("metrics server failed to start", port=self.cfg.metrics_port, error=str(e))

    # --- domains ---------------------------------------------------------------------------

    def worker_exited(self, w: DomainWorker) -> None:
        with self._lock:
            self._exited.append(w)

    def _reap(self) -> None:
        with self._lock:
            exited, self._exited = self._exited, []
        for w in exited:
            if self.workers.get(w.name_) is w:
                del self.workers[w.name_]
            if w.owner_dead:
                self.dead[w.name_] = (time.monotonic(), w.dom.owner_pid, w.dom.created_ns)
            elif w.fatal:
                # The worker gave up on this segment: retry it later, not at every discovery.
                self.backoff[w.name_] = time.monotonic() + 5.0
            with contextlib.suppress(Exception):
                w.dom.close()
            w.release_claim()
            self.metrics.remove(w.name_)

    def discover(self) -> None:
        self._reap()
        names = set(list_domains(self.cfg.shm_prefix))
        for name in list(self.workers):
            if name not in names:
                self.log.info("domain gone; releasing", domain=name)
                self.workers[name].stop_event.set()
        for name in list(self.broken):
            if name not in names:
                del self.broken[name]
        for name in sorted(names):
            if name in self.workers:
                continue
            if name in self.dead:
                self._check_dead(name)
                continue
            if self.backoff.get(name, 0.0) > time.monotonic():
                continue
            self.backoff.pop(name, None)
            claim = self._claim(name)
            if isinstance(claim, str):
                if self.broken.get(name) != claim:
                    self.log.warning("domain not served", domain=name, reason=claim)
                self.broken[name] = claim
                continue
            try:
                dom = Domain.attach(name, writable=True)
            except Exception as e:
                os.close(claim)
                msg = f"{type(e).__name__}: {e}"
                if self.broken.get(name) != msg:
                    self.log.error("cannot serve domain", domain=name, error=msg)
                self.broken[name] = msg
                continue
            reason = self._refuse(dom, claim)
            if reason:
                if self.broken.get(name) != reason:
                    self.log.warning("domain not served", domain=name, reason=reason)
                self.broken[name] = reason
                dom.close()
                os.close(claim)
                continue
            if name in self.broken:
                self.log.info("domain usable again", domain=name)
                del self.broken[name]
            w = DomainWorker(self, dom, claim)
            self.workers[name] = w
            w.start()
        for name in list(self.dead):
            if name not in names:
                del self.dead[name]
        self.metrics.domains(len(self.workers))

    def _claim(self, name: str) -> int | str:
        """Take the one-daemon-per-domain lock: an fd holding ``flock(LOCK_EX)`` on the segment.

        The kernel drops the lock when its holder dies (even by kill -9), so a
        restarted daemon takes over at once, while two live daemons (say systemd's
        and one started by hand) never both plan for one domain. Returns the fd,
        or why the domain cannot be claimed now.
        """
        import fcntl

        try:
            fd = os.open(segment_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            return f"cannot open segment: {e.strerror}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return f"another daemon{self._other_daemon(name)} serves it (segment lock held)"
        return fd

    @staticmethod
    def _other_daemon(name: str) -> str:
        with contextlib.suppress(Exception), Domain.attach(name, writable=False) as dom:
            info = dom.read_daemon_info()
            if info is not None:
                return f" (pid {info.pid})"
        return ""

    def _refuse(self, dom: Any, claim: int) -> str:
        """Why this domain must not be served now ('' if it may)."""
        try:
            if os.fstat(claim).st_ino != os.stat(segment_path(dom.name)).st_ino:
                return "segment replaced while attaching; retrying"
        except OSError as e:
            return f"segment vanished while attaching: {e.strerror}"
        if not dom.owner_alive():
            self.dead.setdefault(dom.name, (time.monotonic(), dom.owner_pid, dom.created_ns))
            return f"owner pid {dom.owner_pid} is dead"
        return ""

    def _check_dead(self, name: str) -> None:
        """A dead owner's segment: unlink after the grace period unless it was re-created."""
        since, owner, created = self.dead[name]
        try:
            dom = Domain.attach(name, writable=True)  # unlink may need a writable attachment
        except Exception:
            return  # being re-created, or broken: discovery will report it once it is back
        try:
            if (dom.owner_pid, dom.created_ns) != (owner, created) or dom.owner_alive():
                del self.dead[name]  # a new owner took the name: serve it from the next discovery
                return
            if time.monotonic() - since >= self.cfg.owner_grace_s:
                dom.unlink()
                del self.dead[name]
                self.log.info(
                    "unlinked segment of dead owner",
                    domain=name,
                    owner_pid=owner,
                    grace_s=self.cfg.owner_grace_s,
                )
        finally:
            dom.close()

    # --- status ----------------------------------------------------------------------------

    def stalled_workers(self) -> list[str]:
        """Domains whose worker has not looped for STALL_S (a hang, not a slow plan)."""
        now = time.monotonic()
        return [n for n, w in self.workers.items() if w.is_alive() and now - w.loop_at > STALL_S]

    def status_text(self) -> str:
        s = f"serving {len(self.workers)} domain(s)"
        if self.broken:
            s += f", {len(self.broken)} not served"
        if self.last_plan is not None:
            s += f"; last plan {self.last_plan[1]} in {self.last_plan[0]}"
        return s

    # --- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        for name in unknown_env():
            self.log.warning("environment variable names no config key; ignored", variable=name)
        self.start_metrics()
        self.log.info(
            "started",
            pid=os.getpid(),
            prefix=self.cfg.shm_prefix,
            config=self.config_path,
            watchdog_s=self.notifier.watchdog_s,
        )
        ready = False
        next_discovery = 0.0
        while not self.stop_event.is_set():
            if self.reload_requested:
                self.reload()
            now = time.monotonic()
            if now >= next_discovery:
                try:
                    self.discover()
                except Exception as e:
                    self.log.error(
                        "discovery failed", prefix=self.cfg.shm_prefix, error=f"{type(e).__name__}: {e}"
                    )
                next_discovery = now + self.cfg.discovery_interval_s
                if not ready:
                    self.notifier.ready(self.status_text())
                    ready = True
            st = self.status_text()
            if st != self._status:
                self.notifier.status(st)
                self._status = st
            stalled = self.stalled_workers()
            if stalled:
                # Withhold WATCHDOG=1: systemd restarts a daemon with a wedged worker.
                if not self._stall_logged:
                    self.log.error("worker stalled; withholding watchdog pings", domains=",".join(stalled))
                    self._stall_logged = True
            else:
                self._stall_logged = False
                self.notifier.ping_watchdog()
            timeout = next_discovery - time.monotonic()
            ping_in = self.notifier.next_ping_in()
            if ping_in is not None:
                timeout = min(timeout, ping_in)
            self.stop_event.wait(max(0.0, min(timeout, 0.25)))
        return self.shutdown()

    def shutdown(self) -> int:
        self.notifier.stopping()
        self.log.info("stopping", signal=self.stop_signal or "none")
        for w in self.workers.values():
            w.stop_event.set()
        deadline = time.monotonic() + 2.0
        for w in list(self.workers.values()):
            w.join(max(0.0, deadline - time.monotonic()))
        stuck = [w.name_ for w in self.workers.values() if w.is_alive()]
        for w in self.workers.values():
            if not w.is_alive():
                with contextlib.suppress(Exception):
                    w.dom.close()
        self.metrics.close()
        self.notifier.close()
        self.log.info("stopped", dropped=",".join(stuck) or "none")
        if stuck:
            # A worker is still inside a long computation: drop it. publish_plan's double
            # buffer makes exiting at any instant safe; interpreter teardown under a running
            # numpy thread is not, so leave without it.
            sys.stderr.flush()
            os._exit(0)
        return 0


def _toml(v: Any) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' if isinstance(v, str) else repr(v)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=None,
        help=f"TOML config file (default {DEFAULT_CONFIG_PATH}; if that is missing, defaults apply)",
    )
    p.add_argument("--check", action="store_true", help="validate the config, print it and exit")


def run_cli(args: argparse.Namespace) -> int:
    log = Logger()
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        log.error(str(e))
        return 2
    if getattr(args, "check", False):
        # One write, TOML syntax: the output is itself a valid config file.
        text = "".join(f"{k} = {_toml(getattr(cfg, k))}\n" for k in cfg.__dataclass_fields__)
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.write(text)
            sys.stdout.flush()
        return 0
    log.level = cfg.log_level
    return Daemon(cfg, args.config, log=log).run()
