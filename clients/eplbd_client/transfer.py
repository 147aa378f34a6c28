"""Transfer executor: moves one plan's experts into a bounded staging pool (DESIGN.md steps 6, 7).

One :class:`PlanTransfer` per started plan. Its :meth:`~PlanTransfer.run` goes
layer by layer over the plan's changed layers (on the client's worker thread,
and on a side stream where the device has streams). For each layer it:

1. waits until enough earlier layers are committed for the layer's experts to
   fit in ``max_staged_experts`` staging entries (the *gate*, computed from the
   plan alone, hence identical on every rank: no rank starts a layer whose
   peers are still gated, so no p2p wait depends on forward progress);
2. copies COPY sources (live local slots) into staging entries;
3. runs the layer's rounds: one ``dist.batch_isend_irecv`` per round, sending
   live slots and receiving into staging entries, each wait bounded by
   ``p2p_timeout_s``; with gloo, tags identify (plan, destination slot, tensor) so
   late messages of an aborted plan can never match a later one (NCCL and HCCL
   ignore tags and pair p2p operations per peer in issue order, so an abort that
   stops two peers' workers at different rounds leaves the communicator out of
   step for every later plan, and a gloo timeout closes the pair: the client then
   refuses later plans, see ``EplbClient._note_unsafe_abort``);
4. publishes the layer as staged (with an event on stream devices).

Pacing (``pace_rounds_per_step`` > 0, worker thread only). A rebalance then
spreads its work over forward steps instead of bursting: the plan's *pace
units* (one per p2p round of a changed layer, a layer's COPYs riding with its
first round; a COPY-only layer is one unit) are numbered in staging order from
the plan alone, and unit i+1 may start only ``1 / rate`` forward steps after
unit i started, counted on ``step_clock`` (the client's step counter: an int the
forward thread increments anyway, read here without a lock; the forward
thread pays nothing). The worker polls it with a short sleep. Lost time is
never made up in a burst: after a gate wait or a slow unit the next unit is
due ``1 / rate`` steps after *now*. Pacing only delays staging, and a layer
commits only once every rank reported it staged, so per-rank pacing cannot
break agreement; every rank starts the plan at the same step and derives the
same schedule, so peers reach a round within about one step of each other
(well inside ``p2p_timeout_s``). To keep the plan timeout meaningful (abort
after ``plan_timeout_syncs`` syncs without a commit), the rate is raised for a
plan where one layer's units at that rate would take more than
``max_layer_steps`` steps (the client passes what its timeout leaves after
the agreement's latency), identically on every rank.

The forward thread, at the sync where the ranks agreed on it (with the client's
sync thread: at the next sync), calls
:meth:`~PlanTransfer.commit` for layers staged everywhere: copies staging
entries into the live slots of every weight tensor, switches the host's routing
tables, and frees the entries (the gate may open for later layers).
Stop-the-world mode uses the same layer routine synchronously
(:meth:`~PlanTransfer.transfer_layer`).

Live weights are only read here; they are written only by commit, and a layer
commits only after every rank staged it, i.e. after every send of that layer
completed, so reads never race with writes.

Backends. With gloo the p2p runs on host tensors (weights on the CPU) and every
wait is bounded by ``p2p_timeout_s``. With NCCL (or HCCL) the transfer group is
a second communicator driven from another thread than the forward's
collectives; waits are stream-ordered and bounded by the group's own timeout.
NCCL documents that concurrent communicators may deadlock if their kernels
cannot be co-scheduled; engines that see this should give the transfer group
its own (smaller) channel/CTA budget or fall back to ``mode="stw"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplbd.geometry import Geometry
from eplbd.placement import log2phy_padded
from eplbd.plan import COPY, RECV, SEND, Plan
from eplbd.planner import changed_layers, rounds_per_layer, staging_need

from .control import ERR_INTERNAL, ERR_STAGING, ERR_TRANSFER
from .device import DeviceOps
from .host import ExpertHost, LayerTables

__all__ = ["TransferError", "PlanTransfer", "staging_gates", "check_host_weights", "pace_rate"]

_TAG_SLOT_BITS = 20  # tag = (plan_id % 1024) << 20 | (dst_slot * T + t)


class TransferError(RuntimeError):
    """A layer could not be staged; ``code`` is the control-word error (control.ERR_*)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def staging_gates(need: np.ndarray, capacity: int) -> np.ndarray:
    """First committed count at which each changed layer may start staging.

    need: [n, R] experts each rank stages per changed layer. Returns gate [n]
    int64: layer j may start once ``committed >= gate[j]``, the smallest c with
    ``sum(need[c:j+1, r]) <= capacity`` for every rank r, so the layers in
    flight on any rank never exceed ``capacity`` entries. Raises TransferError
    (ERR_STAGING) if one layer alone needs more than ``capacity``.
    """
    n = need.shape[0]
    if n and int(need.max()) > capacity:
        big, r = np.unravel_index(int(np.argmax(need)), need.shape)
        raise TransferError(
            ERR_STAGING,
            f"max_staged_experts={capacity} < {int(need.max())} experts rank {r} stages in one layer "
            f"(changed layer #{big})",
        )
    csum = np.vstack([np.zeros((1, need.shape[1]), np.int64), np.cumsum(need, axis=0, dtype=np.int64)])
    gate = np.zeros(n, dtype=np.int64)
    c = 0
    for j in range(n):  # two-pointer: the gate is non-decreasing in j
        while (csum[j + 1] - csum[c] > capacity).any():
            c += 1
        gate[j] = c
    return gate


def pace_rate(units: np.ndarray, rounds_per_step: float, max_layer_steps: int) -> float:
    """Pace units per forward step for one plan; 0.0 = unpaced.

    units: [n] pace units per changed layer (>= 1 each). ``rounds_per_step`` is
    the configured rate (0 = unpaced); it is raised so that no layer's units
    span more than ``max_layer_steps`` steps (the plan timeout's budget); a
    budget < 1 step turns pacing off. Pure: equal on every rank.
    """
    if rounds_per_step <= 0 or units.shape[0] == 0:
        return 0.0
    if max_layer_steps < 1:
        return 0.0
    # Layer j's last unit starts (u_j - 1) / rate steps after its first.
    need = float(int(units.max()) - 1) / max_layer_steps
    return max(float(rounds_per_step), need)


def check_host_weights(host: ExpertHost, slots_per_rank: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes/dtypes of the per-layer expert tensors; checks all layers agree. Returns [(shape, dtype)]."""
    ref: list[tuple[tuple[int, ...], torch.dtype]] | None = None
    for layer in range(host.num_moe_layers):
        ts = host.expert_weights(layer)
        sig = [(tuple(t.shape), t.dtype) for t in ts]
        for i, t in enumerate(ts):
            if t.shape[0] != slots_per_rank:
                raise ValueError(
                    f"expert_weights({layer})[{i}]: leading dim {t.shape[0]} != S={slots_per_rank}"
                )
            if not t[0].is_contiguous():
                raise ValueError(f"expert_weights({layer})[{i}]: slot rows are not contiguous")
        if ref is None:
            ref = sig
        elif sig != ref:
            raise ValueError(f"expert_weights({layer}) shapes/dtypes {sig} differ from layer 0's {ref}")
    if not ref:
        raise ValueError("host has no expert weight tensors")
    return ref


@dataclasses.dataclass
class _Staged:
    layer: int
    dst: torch.Tensor  # [m] int64 local destination slots, on the device
    entries: torch.Tensor  # [m] int64 staging entries, on the device
    tables: LayerTables  # the layer's new routing tables, on the host and the device
    event: Any  # device event after the layer's writes (None on CPU)


class PlanTransfer:
    """Execution state of one started plan on one rank (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        g: Geometry,
        rank: int,
        host: ExpertHost,
        group: Any,
        dev: DeviceOps,
        capacity: int,
        p2p_timeout_s: float,
        stream: Any = None,
        *,
        start_event: Any = None,
        pace_rounds_per_step: float = 0.0,
        step_clock: Callable[[], int] | None = None,
        max_layer_steps: int = 0,
    ) -> None:
        self.plan = plan
        self.g = g
        self.rank = rank
        self.host = host
        self.group = group
        self.dev = dev
        self.stream = stream
        self.p2p_timeout = datetime.timedelta(seconds=p2p_timeout_s)
        self.layers = changed_layers(plan, g)  # [n] identical on every rank
        self.num_layers = int(self.layers.shape[0])
        need = staging_need(plan, g)[self.layers] if self.num_layers else np.zeros((0, g.num_ranks), np.int32)
        self.my_need = need[:, rank].astype(np.int64) if self.num_layers else np.zeros(0, np.int64)
        self.capacity = capacity
        self.gate_error: TransferError | None = None
        try:
            self.gates = staging_gates(need, capacity)
        except TransferError as e:  # every rank computes the same, so every rank flags it
            self.gate_error = e
            self.gates = np.zeros(self.num_layers, dtype=np.int64)
        self.log2phy = log2phy_padded(plan.phy2log, g)  # [L, E, K]
        self.replica_count = np.ascontiguousarray(plan.replica_count, dtype=np.int32)
        self.sig = check_host_weights(host, g.slots_per_rank)
        n_t = len(self.sig)
        if g.slots_per_rank * n_t >= (1 << _TAG_SLOT_BITS):
            raise ValueError("too many slots x tensors for p2p tags")
        self._salt = (int(plan.plan_id) % 1024) << _TAG_SLOT_BITS
        self._pool: list[torch.Tensor] | None = None
        self._pool_size = 0
        self._head = 0  # staging ring: next entry to hand out
        self._release_events: list[Any] = []
        self.staged: list[_Staged] = []  # appended by the staging thread, read by the sync's thread
        self._ready = 0  # staged layers seen complete by the sync's thread (staged_count)
        self.committed = 0
        self.error = 0
        self.error_message = ""
        self.abort_event = threading.Event()
        self._cond = threading.Condition()
        self.done_event = threading.Event()
        # Live weights were last written on the forward stream (earlier commits):
        # the staging stream must not read them before those writes land. The caller
        # passes an event of the forward stream when it is not on the forward thread.
        self._start_event = start_event if start_event is not None else dev.record_event()
        self.stage_seconds: list[float] = []  # wall time per staged layer (for stats)
        # Pacing (see the module docstring): units per changed layer [n], from the plan alone.
        self.pace_units = (
            np.maximum(rounds_per_layer(plan, g)[self.layers].astype(np.int64), 1)
            if self.num_layers
            else np.zeros(0, np.int64)
        )
        self.pace = (
            pace_rate(self.pace_units, pace_rounds_per_step, max_layer_steps)
            if step_clock is not None
            else 0.0
        )
        self._clock = step_clock
        self.start_step = step_clock() if step_clock is not None else 0  # at the sync that starts it
        self._pace_next = float(self.start_step)  # step at which the next unit may start
        self.unit_steps: list[int] = []  # step clock when each paced unit started (worker thread)
        self.pace_wait_s = 0.0  # worker time spent waiting for the pace
        self._paced = False  # set by run() (worker); transfer_layer on the forward thread never paces

    # -- staging pool -------------------------------------------------------
    def _ensure_pool(self) -> None:
        if self._pool is not None:
            return
        size = int(min(self.capacity, max(int(self.my_need.sum()), 1)))
        dev = self.dev.device
        self._pool = [torch.empty((size, *shape[1:]), dtype=dt, device=dev) for shape, dt in self.sig]
        self._pool_size = size

    def _alloc(self, m: int) -> torch.Tensor:
        idx = (self._head + torch.arange(m, dtype=torch.int64)) % self._pool_size
        self._head += m
        return idx

    # -- one layer ----------------------------------------------------------
    def _pace_wait(self) -> None:
        """Worker: wait until the step clock reaches the next unit's step; book the unit."""
        clock = self._clock
        assert clock is not None
        target = self._pace_next
        now = clock()
        if now < target:
            t0 = time.perf_counter()
            s0 = now
            dt = 0.002  # seconds per step until measured
            while now < target and not self.abort_event.is_set():
                # Sleep about half the expected remaining time, polling at least every 2 ms
                # (each wake-up costs the forward thread nothing but a GIL hand-over).
                time.sleep(min(0.002, max(0.0005, 0.5 * (target - now) * dt)))
                now = clock()
                if now > s0:
                    dt = (time.perf_counter() - t0) / (now - s0)
            self.pace_wait_s += time.perf_counter() - t0
        self.unit_steps.append(now)
        # No catch-up burst: the next unit is due 1/rate steps after this one really started.
        self._pace_next = max(target, float(now)) + 1.0 / self.pace

    def transfer_layer(self, j: int) -> _Staged:
        """Stage changed layer #j (its COPYs and p2p rounds). Raises TransferError.

        Paced (waits before each unit) only when called from :meth:`run`: stop-the-world never paces.
        """
        paced = self._paced
        layer = int(self.layers[j])
        R, T = self.g.num_ranks, len(self.sig)
        ops = self.plan.ops_for(layer, self.rank, R)
        w = list(self.host.expert_weights(layer))
        writes = ops[ops["kind"] != SEND]
        with self.dev.use_stream(self.stream):
            if self._start_event is not None:
                self.dev.wait_event(self._start_event)
                self._start_event = None
            self._ensure_pool()  # allocated on the staging stream
            pool = self._pool
            assert pool is not None
            entries = self._alloc(int(writes.shape[0]))
            entry_of = {int(d): int(e) for d, e in zip(writes["dst_slot"], entries.tolist(), strict=True)}
            with self._cond:
                evs, self._release_events = self._release_events, []
            for ev in evs:  # entries freed by commits on the forward stream
                self.dev.wait_event(ev)
            # Every rank runs the same units: the plan's rounds of this layer, not just this
            # rank's (a round where it has no peer still costs a unit, so schedules align).
            layer_rounds = int(self.pace_units[j])
            if paced:
                self._pace_wait()  # unit 0 of the layer: its COPYs and first round
                if self.abort_event.is_set():
                    raise TransferError(
                        ERR_TRANSFER, f"plan {self.plan.plan_id}: aborted during layer {layer}"
                    )
            for op in ops[ops["kind"] == COPY]:
                e, s = entry_of[int(op["dst_slot"])], int(op["src_slot"])
                for t in range(T):
                    pool[t][e].copy_(w[t][s])
            remote = ops[ops["kind"] != COPY]
            my_rounds = set(np.unique(remote["round"]).tolist())
            for rnd in range(max(layer_rounds, max(my_rounds, default=-1) + 1)):
                if paced and rnd > 0:
                    self._pace_wait()
                    if self.abort_event.is_set():
                        raise TransferError(
                            ERR_TRANSFER, f"plan {self.plan.plan_id}: aborted during layer {layer}"
                        )
                if rnd not in my_rounds:
                    continue
                p2p: list[dist.P2POp] = []
                for op in remote[remote["round"] == rnd]:
                    peer, dst = int(op["peer"]), int(op["dst_slot"])
                    for t in range(T):
                        tag = self._salt | (dst * T + t)
                        if int(op["kind"]) == SEND:
                            p2p.append(
                                dist.P2POp(dist.isend, w[t][int(op["src_slot"])], None, self.group, tag, peer)
                            )
                        else:
                            assert int(op["kind"]) == RECV
                            p2p.append(
                                dist.P2POp(dist.irecv, pool[t][entry_of[dst]], None, self.group, tag, peer)
                            )
                self._run_round(p2p, layer, int(rnd))
                if self.abort_event.is_set():
                    raise TransferError(
                        ERR_TRANSFER, f"plan {self.plan.plan_id}: aborted during layer {layer}"
                    )
            # The commit's index tensors and routing tables go to the device here, on the
            # staging stream and this thread: a copy from host memory on the forward
            # thread would make it wait for its stream at the commit.
            to_dev = self.dev.to_device
            dst_dev = to_dev(writes["dst_slot"])
            entries_dev = to_dev(entries)
            tables = LayerTables.build(
                self.plan.phy2log[layer], self.log2phy[layer], self.replica_count[layer], self.dev
            )
            ev = self.dev.record_event(self.stream)
        return _Staged(layer, dst_dev, entries_dev, tables, ev)

    def _run_round(self, p2p: list[dist.P2POp], layer: int, rnd: int) -> None:
        if not p2p:
            return
        try:
            reqs = dist.batch_isend_irecv(p2p)
            for r in reqs:
                if self.dev.has_streams:
                    r.wait()  # stream-ordered; the backend's own timeout bounds it
                else:
                    r.wait(timeout=self.p2p_timeout)
        except Exception as e:  # gloo raises RuntimeError on timeout or a closed peer
            raise TransferError(
                ERR_TRANSFER, f"plan {self.plan.plan_id}: layer {layer} round {rnd}: {type(e).__name__}: {e}"
            ) from e

    # -- staging thread -------------------------------------------------------
    def run(self) -> None:
        """Stage every changed layer in order (worker thread). Errors go to ``self.error``."""
        self._paced = self.pace > 0
        try:
            if self.gate_error is not None:
                raise self.gate_error
            for j in range(self.num_layers):
                with self._cond:
                    while self.committed < self.gates[j] and not self.abort_event.is_set():
                        self._cond.wait(0.1)
                if self.abort_event.is_set():
                    return
                t0 = time.perf_counter()
                st = self.transfer_layer(j)
                self.stage_seconds.append(time.perf_counter() - t0)
                self.staged.append(st)
        except TransferError as e:
            self.error_message = str(e)
            self.error = e.code
        except Exception as e:  # never let the worker die silently: flag, everyone aborts
            self.error_message = f"{type(e).__name__}: {e}"
            self.error = ERR_INTERNAL
        finally:
            self.done_event.set()

    def abort(self) -> None:
        self.abort_event.set()
        with self._cond:
            self._cond.notify_all()

    # -- the sync's thread (the client's sync thread, or the forward thread) ----------
    def staged_count(self) -> int:
        """Changed layers staged (complete) on this rank, prefix count; non-blocking."""
        staged = self.staged
        while self._ready < len(staged) and self.dev.event_done(staged[self._ready].event):
            self._ready += 1
        return self._ready

    # -- forward thread ---------------------------------------------------------
    def commit(self, upto: int, staged: Sequence[_Staged] | None = None) -> list[int]:
        """Commit changed layers [committed, upto) (forward thread). Returns the layer ids."""
        src = self.staged if staged is None else staged
        done: list[int] = []
        assert self._pool is not None or upto == self.committed
        for j in range(self.committed, upto):
            st = src[j]
            self.dev.wait_event(st.event)  # forward stream waits for the staging stream
            w = self.host.expert_weights(st.layer)
            if self.dev.has_streams:  # made on the staging stream, used on this one
                cur = self.dev.current_stream()
                for x in (st.dst, st.entries, *st.tables.tensors()):
                    x.record_stream(cur)
            if st.dst.numel():
                for t, wt in enumerate(w):
                    wt.index_copy_(0, st.dst, self._pool[t].index_select(0, st.entries))  # type: ignore[index]
            self.host.commit_layer(st.layer, st.tables)
            done.append(st.layer)
        ev = None
        if done and self.dev.has_streams:
            cur = self.dev.current_stream()
            for p in self._pool or []:
                p.record_stream(cur)  # the pool is also used on the forward stream
            ev = self.dev.record_event()
        with self._cond:
            if done and ev is not None:
                self._release_events.append(ev)
            self.committed = upto
            self._cond.notify_all()
        return done
