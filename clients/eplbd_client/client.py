"""The rank client: record, sync, agree, transfer, commit (DESIGN.md steps 1, 2, 3, 5, 6, 7).

Usage on every EP rank (same calls, same order on every rank)::

    client = EplbClient(host, geometry, "eplbd.job.model", group=ep_group)
    for step in ...:
        ...forward; after dispatch in each MoE layer: client.record(layer, counts)  # [S]
        client.step()                      # once per forward step, after the forward
    client.close()

Threads. Nothing the forward thread runs blocks on the daemon, on transfers or
(with the default *sync thread*) on the device or a collective:

- the **forward thread** calls ``record`` (one in-place add) and ``step()`` (a
  counter). At a sync it applies the commits decided at the previous sync (copy
  staged experts into slots, switch the host's tables), points the recorder at
  the next count buffer, records an event on stream devices, and hands the sync
  to the sync thread (a lock test and a queue put);
- the **sync thread** does each sync's work, on a process group of its own (the
  engine's forward collectives on the EP group come from another thread);
- a **worker** thread reads and validates plans from shm and stages experts
  (:mod:`eplbd_client.transfer`), on its own process group for p2p and its own
  stream on devices with streams;
- the node leader's **publisher** thread does the shm writes (window, plan
  status, placement in force) and rings the doorbell.

Sync n (every K = ``sync_interval`` steps, at the same step on every rank):

1. wait for the all-gather launched at sync n-1 (it has long finished) and
   read its matrix [R, L*S + NUM_WORDS]: window n-1's counts and every rank's
   control words;
2. the node leader queues window n-1 for publishing: physical counts [R, L, S]
   -> logical loads [L, E] with the placement that was in force while they
   were recorded (taken by the forward thread at sync n-1, before it applied
   any commit);
3. :func:`eplbd_client.control.decide` -> start / commit / abort / reject;
   the agreed state moves at once; a commit's copies run on the forward thread
   at sync n+1 (the same sync on every rank; ``sync_thread=False``: at once,
   on the forward thread, which then does all of this itself), and the
   publisher's writes of sync n wait until then too, so a daemon never sees a
   placement before the ranks run it;
4. poll ``latest_plan_id`` (one word) and hand a new plan to the worker for
   reading and validation;
5. pack this rank's control words and launch the all-gather of window n's
   counts (``async_op=True``).

Stop-the-world mode (``mode="stw"``) executes a plan at the sync where it
starts, synchronously on the forward thread, layer by layer, with one
all-reduce of an error flag per layer so all ranks commit or abort together.
It exists to compare against the asynchronous mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from eplbd.geometry import Geometry
from eplbd.placement import default_phy2log, validate_phy2log
from eplbd.plan import COPY, Plan, PlanError, plan_hash
from eplbd.planner import changed_layers, validate_plan
from eplbd.shm import (
    PLAN_ABORTED,
    PLAN_COMMITTED,
    PLAN_REJECTED,
    PLAN_STARTED,
    Domain,
    PlanStatus,
)

from . import control as C
from .device import DeviceOps
from .host import ExpertHost, check_host
from .recorder import LoadRecorder
from .transfer import PlanTransfer, TransferError

__all__ = [
    "ClientConfig",
    "ClientStats",
    "EplbClient",
    "NodeLayout",
    "NodeLayoutError",
    "launcher_node",
    "node_layout",
]

log = logging.getLogger("eplbd_client")

MODES = ("async", "stw")
NBUF = 3  # count buffers: one being recorded, one in its all-gather, one being zeroed


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Client settings. Those marked (*) must be equal on every rank (checked at the first syncs).

    - sync_interval (*): K, forward steps per sync (and per window).
    - mode (*): "async" (transfers on the worker thread) or "stw" (stop-the-world baseline).
    - max_staged_experts (*): staging entries per rank; None = S (enough for any one layer).
      More lets the worker stage layers ahead of the commits.
    - plan_timeout_syncs (*): abort a plan with no commit progress for this many syncs.
    - p2p_timeout_s: bound on every p2p wait of the transfer (CPU/gloo; on stream
      devices the backend's process-group timeout applies).
    - gather_timeout_s: bound on waiting for the previous sync's all-gather.
    - divergence_syncs (*): reject a plan that only some nodes' daemons published
      (ranks' candidate ids unequal) after this many syncs, with ``ERR_DIVERGED``;
      0 = never (a missing daemon then blocks balancing until the next agreed plan).
    - ranks_per_node: EP ranks per node; rank r is on node r // ranks_per_node.
      Explicit: overrides the launcher's variables. None = see :func:`node_layout`.
    - node_id: this rank's node, explicitly (per rank, e.g. ``EPLBD_CLIENT_NODE_ID``);
      any label, the ranks' labels must be node-major. None = from the launcher.
    - ring_capacity, shm_mode: for Domain.create (node leader).
    - unlink_on_close: the leader removes the shm domain in :meth:`EplbClient.close`.
    - transfer_rounds_per_step: pace of a rebalance (async mode; 0 = unpaced, as fast
      as the worker can). > 0: the worker starts at most this many p2p rounds (a
      layer's COPYs ride with its first round) per forward step, e.g. 0.5 = one round
      every other step, so a rebalance spreads its interference with inference over
      the steps instead of bursting. Raised per plan where needed so that pacing
      never trips ``plan_timeout_syncs``. Should be equal on every rank (peers then
      reach each round at the same step); agreement does not depend on it.
    - sync_thread (*): async mode only. True: the sync's work (waiting for and reading
      the previous all-gather, the decision, polling, packing the words, launching the
      next all-gather) runs on a *sync thread* over a process group of its own, and the
      forward thread only switches the count buffers, hands the sync over and applies,
      at the next sync, what the sync thread decided (commits one sync later). False:
      all of it on the forward thread, at the sync itself (the stop-the-world mode
      always works that way).
    """

    sync_interval: int = 16
    mode: str = "async"
    max_staged_experts: int | None = None
    plan_timeout_syncs: int = 64
    p2p_timeout_s: float = 10.0
    gather_timeout_s: float = 60.0
    divergence_syncs: int = 16
    ranks_per_node: int | None = None
    node_id: int | None = None
    ring_capacity: int = 64
    shm_mode: int = 0o600
    unlink_on_close: bool = True
    transfer_rounds_per_step: float = 0.0
    sync_thread: bool = True

    def __post_init__(self) -> None:
        if self.sync_interval < 1:
            raise ValueError(f"sync_interval must be >= 1, got {self.sync_interval}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_staged_experts is not None and self.max_staged_experts < 1:
            raise ValueError(f"max_staged_experts must be >= 1, got {self.max_staged_experts}")
        if self.plan_timeout_syncs < 2:
            raise ValueError(f"plan_timeout_syncs must be >= 2, got {self.plan_timeout_syncs}")
        for k in ("p2p_timeout_s", "gather_timeout_s"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0")
        if self.divergence_syncs < 0:
            raise ValueError(f"divergence_syncs must be >= 0 (0 = never), got {self.divergence_syncs}")
        if not self.transfer_rounds_per_step >= 0:  # also rejects NaN
            raise ValueError(
                f"transfer_rounds_per_step must be >= 0 (0 = unpaced), got {self.transfer_rounds_per_step}"
            )
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {self.ranks_per_node}")
        if self.node_id is not None and self.node_id < 0:
            raise ValueError(f"node_id must be >= 0, got {self.node_id}")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, prefix: str = "EPLBD_CLIENT_", **overrides: Any
    ) -> ClientConfig:
        """Settings from ``<prefix><FIELD>`` variables (e.g. ``EPLBD_CLIENT_SYNC_INTERVAL=8``),
        then ``overrides``. Unknown ``<prefix>*`` names raise ValueError naming them."""
        env = os.environ if env is None else env
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, text in env.items():
            if not name.startswith(prefix):
                continue
            key = name[len(prefix) :].lower()
            if key not in fields:
                raise ValueError(f"{name}: unknown client setting (known: {', '.join(fields)})")
            t = str(fields[key].type)
            try:
                if key == "shm_mode":
                    values[key] = int(text, 0)
                elif t == "int | None" and text.strip().lower() in ("", "none"):
                    values[key] = None
                elif t.startswith("int"):
                    values[key] = int(text)
                elif t == "float":
                    values[key] = float(text)
                elif t == "bool":
                    values[key] = text.strip().lower() in ("1", "true", "yes", "on")
                else:
                    values[key] = text
            except ValueError:
                raise ValueError(f"{name}: cannot parse {text!r} as {t}") from None
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass
class ClientStats:
    """Counters. The plan counters are replicated (equal on every rank at equal syncs)."""

    steps: int = 0
    syncs: int = 0
    plans_started: int = 0
    plans_committed: int = 0
    plans_aborted: int = 0
    plans_rejected: int = 0
    plans_mismatched: int = 0  # of the rejected: hash mismatch or divergence between nodes
    layers_committed: int = 0
    last_error: int = 0
    last_error_plan: int = -1
    last_error_message: str = ""
    windows_published: int = 0
    publish_errors: int = 0
    poll_errors: int = 0
    stw_seconds: float = 0.0  # forward-thread time spent in stop-the-world transfers
    # Wall time the forward thread spent at the latest sync waiting for collectives
    # (inline: the all-gather's launch and wait; sync thread: waiting for the sync
    # thread, still in the previous all-gather), so a benchmark can subtract it from
    # step() and see the client's own cost.
    last_collective_ns: int = 0
    # Gather buffers replaced because the leader's publisher still held them (it
    # fell more than two syncs behind); each costs one allocation, no window is lost.
    recv_buffers_replaced: int = 0
    # Sync thread (``sync_thread``): its CPU time over all syncs, and the syncs at
    # which the forward thread found it still busy with the previous one and waited.
    sync_thread_cpu_ns: int = 0
    sync_thread_waits: int = 0
    history: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (event, plan, sync)


class NodeLayoutError(ValueError):
    """The ranks' node identities contradict node-major numbering or each other."""


class NodeLayout(NamedTuple):
    """Where this rank sits among the nodes of its EP group (node-major: rank r on node r // rpn)."""

    node: int  # 0..num_nodes-1: what ``{node}`` in a domain name becomes
    num_nodes: int
    ranks_per_node: int
    leader: int  # EP rank of this node's leader (its lowest EP rank): creates the domain, publishes
    source: str  # where it came from: "config ranks_per_node", "config node_id", "GROUP_RANK", ...


#: Launcher variables naming a process's node (torchrun sets GROUP_RANK; others NODE_RANK).
LAUNCHER_NODE_VARS = ("GROUP_RANK", "NODE_RANK")


def launcher_node(
    env: Mapping[str, str], global_rank: int, global_world: int | None = None
) -> tuple[int | None, str, str]:
    """This process's node label from torchrun-style variables: (label or None, source, problem).

    ``GROUP_RANK`` / ``NODE_RANK`` give it directly; otherwise ``LOCAL_WORLD_SIZE``
    gives ``global_rank // LOCAL_WORLD_SIZE``, and ``LOCAL_RANK`` must then equal
    ``global_rank % LOCAL_WORLD_SIZE``. Variables whose ``RANK`` / ``WORLD_SIZE``
    are not this process's (inherited from an outer launch) are ignored. Never
    raises: a problem is returned as text so that every rank can raise the same
    error after one all-gather.
    """
    try:
        if env.get("RANK", "").strip() and int(env["RANK"]) != global_rank:
            return None, "", ""
        ws = env.get("WORLD_SIZE", "").strip()
        if global_world is not None and ws and int(ws) != global_world:
            return None, "", ""
        for var in LAUNCHER_NODE_VARS:
            text = env.get(var, "").strip()
            if text:
                v = int(text)
                if v < 0:
                    return None, var, f"{var}={text} is negative"
                return v, var, ""
        lws_text = env.get("LOCAL_WORLD_SIZE", "").strip()
        if not lws_text:
            return None, "", ""
        lws = int(lws_text)
        if lws < 1:
            return None, "LOCAL_WORLD_SIZE", f"LOCAL_WORLD_SIZE={lws_text} is not positive"
        lr = env.get("LOCAL_RANK", "").strip()
        if lr and int(lr) != global_rank % lws:
            return (
                None,
                "LOCAL_WORLD_SIZE",
                f"LOCAL_RANK={lr} but global rank {global_rank} with LOCAL_WORLD_SIZE={lws} "
                f"is local rank {global_rank % lws} (ranks are not numbered node-major)",
            )
        return global_rank // lws, "LOCAL_WORLD_SIZE", ""
    except ValueError as e:
        return None, "launcher", f"cannot parse the launcher's variables: {e}"


def node_layout(
    rank: int,
    world: int,
    labels: Sequence[int | None] = (),
    *,
    source: str = "",
    ranks_per_node: int | None = None,
    geometry_nodes: int = 1,
) -> NodeLayout:
    """Node of EP rank ``rank`` of ``world``. Pure; raises NodeLayoutError naming the problem.

    Precedence: an explicit ``ranks_per_node``; else per-rank node ``labels``
    ([world], EP rank order; from ``node_id`` or the launcher), which must be
    node-major (equal labels contiguous, every node the same size; labels need
    not be 0..N-1, e.g. a job on nodes 4-5 of a bigger launch); else the
    geometry's R / N. A geometry with ``num_nodes > 1`` must agree.
    """
    if ranks_per_node is not None:
        rpn, src = int(ranks_per_node), "config ranks_per_node"
    elif any(lb is not None for lb in labels):
        if len(labels) != world or any(lb is None for lb in labels):
            missing = [r for r, lb in enumerate(labels) if lb is None]
            raise NodeLayoutError(
                f"node identity ({source}) is set on some EP ranks only; missing on ranks {missing[:16]}"
            )
        runs: list[tuple[int, int]] = []  # (label, length)
        for lb in labels:
            assert lb is not None
            if runs and runs[-1][0] == lb:
                runs[-1] = (lb, runs[-1][1] + 1)
            else:
                runs.append((lb, 1))
        sizes = {n for _, n in runs}
        if len({lb for lb, _ in runs}) != len(runs) or len(sizes) != 1:
            shown = list(labels[:32]) + (["..."] if len(labels) > 32 else [])
            raise NodeLayoutError(
                f"EP ranks are not numbered node-major: node of each EP rank ({source}) is {shown}; "
                "eplbd needs rank r on node r // (R/N) with every node holding R/N ranks "
                "(DESIGN.md). Launch with ranks numbered node by node, or set "
                "ClientConfig.ranks_per_node / node_id"
            )
        rpn, src = sizes.pop(), source
    else:
        if world % geometry_nodes:
            raise NodeLayoutError(f"{world} EP ranks do not split over {geometry_nodes} nodes")
        rpn, src = world // geometry_nodes, "geometry"
    if rpn < 1 or world % rpn:
        raise NodeLayoutError(f"{world} EP ranks do not split into nodes of {rpn} ranks ({src})")
    n = world // rpn
    if geometry_nodes > 1 and n != geometry_nodes:
        raise NodeLayoutError(
            f"geometry says {geometry_nodes} nodes but {src} gives {n} nodes of {rpn} ranks"
        )
    node = rank // rpn
    return NodeLayout(node, n, rpn, node * rpn, src)


class _Cand(NamedTuple):
    plan_id: int
    plan_hash: int
    base_epoch: int
    status: int  # C.CAND_OK / C.CAND_STALE / C.ERR_*
    validated_epoch: int


class _RecvBuf:
    """One host buffer the all-gather result lands in, with numpy views made once.

    ``mat`` [R, L*S + NUM_WORDS]; ``counts`` [R, L*S] and ``words`` [R, NUM_WORDS]
    are (strided) views of it. ``busy``: the leader's publisher has not finished
    reading ``counts`` yet, so no all-gather may write into it.
    """

    __slots__ = ("t", "mat", "counts", "words", "word_rows", "busy")

    def __init__(self, t: torch.Tensor, world: int, ls: int) -> None:
        self.t = t
        self.mat = t.numpy().reshape(world, -1)
        self.counts = self.mat[:, :ls]
        self.words = self.mat[:, ls:]
        # Each rank's words as a byte view: ``b"".join(word_rows)`` is the
        # packed matrix for control.quiet_bytes without any numpy call.
        raw = self.mat.data.cast("B")
        row, rb = self.mat.shape[1] * 8, C.WORDS_STRUCT.size
        self.word_rows = [raw[r * row + ls * 8 : r * row + ls * 8 + rb] for r in range(world)]
        self.busy = False


class _Worker:
    """One thread running jobs in submission order."""

    def __init__(self, name: str, init: Callable[[], None] | None = None) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._init = init
        self._t = threading.Thread(target=self._loop, name=name, daemon=True)
        self._t.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def _loop(self) -> None:
        if self._init is not None:
            self._init()
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # jobs report their own errors; never kill the thread
                log.exception("eplbd_client: worker job failed")

    def stop(self, timeout: float) -> None:
        self._q.put(None)
        self._t.join(timeout)


class EplbClient:
    """One EP rank's side of eplbd. Construction is collective over the EP group
    (and over the default group when ``transfer_group`` or ``control_group`` is
    not given).

    ``transfer_group`` (optional): the process group the worker thread uses for
    the p2p transfers, same ranks as ``group``. Give each client its own: two
    clients (e.g. a main model and its MTP draft model) whose transfer threads
    share one group interleave their p2p messages and mismatch or deadlock.
    Left out, the client creates a fresh one (collective over the default group).
    ``control_group`` (optional, sync thread only): the same for the sync
    thread's all-gathers. Both are made with ``dist.new_group`` when left out,
    which needs every process of the job to name the same ranks: a job with
    several EP groups must pass its own (e.g. ``new_subgroups_by_enumeration``).

    Hot path. ``record(layer, counts)`` is one in-place add per call (about
    1-2.5 µs of dispatch on CPU tensors, one queued kernel on a device); an
    engine that has every layer's counts in one [L, S] tensor should call
    ``client.recorder.record_all(counts)`` once per step instead. ``step()`` is a
    counter increment except at syncs, where (sync thread) it takes a lock the
    sync thread released K steps earlier, applies decided commits if any,
    switches the count buffer and puts one item on the sync thread's queue.
    The sync thread's own work shows in ``stats.sync_thread_cpu_ns``; it waits
    for the GIL like any thread, so it runs while the forward thread is inside
    torch calls (which release the GIL) or idle.
    """

    def __init__(
        self,
        host: ExpertHost,
        geometry: Geometry,
        domain_name: str,
        *,
        group: Any = None,
        transfer_group: Any = None,
        control_group: Any = None,
        config: ClientConfig | None = None,
        phy2log: np.ndarray | None = None,
        epoch: int = 0,
    ) -> None:
        """``domain_name`` may contain ``{node}`` (formatted with this rank's node id).
        ``phy2log`` [L, P]: the placement the host starts with (default: slot p holds p mod E)."""
        self.config = cfg = config or ClientConfig()
        self.g = g = geometry
        self.host = host
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.world != g.num_ranks:
            raise ValueError(f"EP group has {self.world} ranks, geometry says {g.num_ranks}")
        check_host(host)
        if host.num_moe_layers != g.num_layers:
            raise ValueError(f"host has {host.num_moe_layers} MoE layers, geometry says {g.num_layers}")
        L, S = g.num_layers, g.slots_per_rank
        # Node identity: one all-gather of every rank's own view (config node_id or
        # the launcher's variables), so that a contradiction raises the same
        # NodeLayoutError on every rank instead of leaving some in a collective.
        if cfg.node_id is not None:
            mine: tuple[int | None, str, str] = (cfg.node_id, "config node_id", "")
        else:
            mine = launcher_node(os.environ, dist.get_rank(), dist.get_world_size())
        views: list[Any] = [None] * self.world
        dist.all_gather_object(views, mine, group=group)
        problems = [f"rank {r}: {p}" for r, (_, _, p) in enumerate(views) if p]
        if problems:
            raise NodeLayoutError("eplbd_client: launcher node identity: " + "; ".join(problems[:8]))
        sources = sorted({src for lb, src, _ in views if lb is not None})
        self.layout = node_layout(
            self.rank,
            self.world,
            [lb for lb, _, _ in views],
            source="+".join(sources),
            ranks_per_node=cfg.ranks_per_node,
            geometry_nodes=g.num_nodes,
        )
        self.rpn = self.layout.ranks_per_node
        self.node = self.layout.node
        self.is_leader = self.rank == self.layout.leader
        self.domain_name = domain_name.format(node=self.node)
        if self.is_leader:
            log.info(
                "eplbd_client rank %d: node %d of %d (%d ranks per node, from %s), domain %s",
                self.rank,
                self.node,
                self.layout.num_nodes,
                self.rpn,
                self.layout.source,
                self.domain_name,
            )
        self.capacity = cfg.max_staged_experts or S
        self._threaded = cfg.sync_thread and cfg.mode == "async"
        # ``_ws``: the counters the sync's code updates. With a sync thread, callers
        # see ``stats``, a copy adopted at each forward sync after a decision, so the
        # replicated counters are equal on every rank at equal steps.
        self._ws = ClientStats()
        self._snap = ClientStats() if self._threaded else self._ws

        p2l = default_phy2log(g) if phy2log is None else validate_phy2log(phy2log, g).copy()
        # Agreed (logical) placement: never mutated in place, commits replace it.
        self._phy2log = p2l
        self.state = C.Agreed(epoch=int(epoch))
        # What the forward pass runs with (equal to the agreed one except, with a sync
        # thread, between a commit's decision and the next sync, which applies it).
        self._p2l_in_force = p2l
        self._epoch_in_force = int(epoch)
        self._active_in_force = -1
        self._config_digest = zlib.crc32(
            repr(
                (
                    cfg.sync_interval,
                    cfg.mode,
                    self.capacity,
                    cfg.plan_timeout_syncs,
                    cfg.divergence_syncs,
                    self.rpn,
                    self._threaded,
                    g.to_dict(),
                )
            ).encode()
        )

        # Recording and gather buffers.
        self.dev = DeviceOps(host.device)
        self.recorder = LoadRecorder(L, S, host.device)
        self.record = self.recorder.record  # bound method: no extra frame per call
        self.record_deferred = self.recorder.record_deferred
        backend = dist.get_backend(group)
        comm_device = torch.device("cpu") if backend == "gloo" else torch.device(host.device)
        self._comm_same_device = comm_device == torch.device(host.device)
        self._ls = ls = L * S
        self._K = cfg.sync_interval
        self._width = width = ls + C.NUM_WORDS
        self._comm_device = comm_device
        # Window w's counts live in buffer w % NBUF: recorded (forward thread, steps
        # of window w), gathered (sync w), zeroed once that all-gather finished
        # (sync w + 1), recorded into again from sync w + 2. With the counts on the
        # comm device they are the counts part of the all-gather's send buffers.
        nb = NBUF
        if self._comm_same_device:
            self._sends = [torch.zeros(width, dtype=torch.int64, device=comm_device) for _ in range(nb)]
            rec_bufs = [b[:ls].view(L, S) for b in self._sends]
        else:  # e.g. CUDA weights with a gloo group: counts on the device, one host send buffer
            self._sends = [self.dev.pinned_empty((width,), torch.int64).zero_()]
            rec_bufs = [torch.zeros((L, S), dtype=torch.int64, device=host.device) for _ in range(nb)]
        self._rec_bufs = rec_bufs
        self._send_np = [b.numpy() if b.device.type == "cpu" else None for b in self._sends]
        # Device buffers: the event after each one's zeroing on the comm stream, which
        # the forward stream waits for before recording into it again.
        self._zero_ev: list[Any] = [None] * nb
        self._fwd_events = self.dev.has_streams  # the forward records an event at each sync
        # Numpy views made once (a .numpy() call or a slice per sync costs microseconds).
        if comm_device.type == "cpu":
            self._words_t = torch.zeros(C.NUM_WORDS, dtype=torch.int64)
        else:
            # Pinned, so the non-blocking copy into the device send buffer (_launch) is
            # truly asynchronous: from pageable memory CUDA would synchronise the host.
            # _pack rewrites it only after _finish_gather has waited for the collective
            # that consumed the previous copy.
            self._words_t = self.dev.pinned_empty((C.NUM_WORDS,), torch.int64).zero_()
        self._words_np = self._words_t.numpy()
        # Byte views for _pack (one struct.pack_into) and for zeroing the counts
        # (one memoryview slice assignment): core Python, no numpy dispatch.
        if comm_device.type == "cpu" and self._comm_same_device:
            # _pack writes the words straight into the send buffer's tail.
            self._words_dst = [(a.data.cast("B"), ls * 8) for a in self._send_np if a is not None]
        else:
            self._words_dst = [(self._words_np.data.cast("B"), 0)] * nb
        self._counts_mv = [
            a[:ls].data.cast("B") if a is not None and self._comm_same_device else None
            for a in self._send_np
        ]
        self._zeros = bytes(ls * 8)
        # Where the gathered matrix lands on the host: the all-gather's output
        # itself on a CPU group, else a pinned copy of the device result. The
        # leader keeps several, so that its publisher reads window n-1's counts
        # straight from its buffer (no copy on the sync's thread) while the next
        # all-gathers write into the others (one more with a sync thread, which
        # hands the publisher its jobs one sync later); other ranks only read the
        # words during the sync, so one does.
        self._recv = (
            None
            if comm_device.type == "cpu"
            else torch.zeros(self.world * width, dtype=torch.int64, device=comm_device)
        )
        self._rbufs = [self._new_recv() for _ in range((4 if self._threaded else 3) if self.is_leader else 1)]
        self._ri = 0
        self._gather_timeout = datetime.timedelta(seconds=cfg.gather_timeout_s)
        self.recorder.use_buffers(rec_bufs)
        # Jobs for the helper threads, submitted at the end of the sync's work; with a
        # sync thread the publisher's jobs of sync n are held until sync n+1, when the
        # forward thread has applied sync n's decision (placement before status).
        self._deferred: list[tuple[_Worker, Callable[[], None]]] = []
        self._held: list[tuple[_Worker, Callable[[], None]]] = []
        # Physical commits decided by the sync thread, applied by the forward thread at
        # the next sync: (transfer, commit layers up to).
        self._actions: list[tuple[PlanTransfer, int]] = []
        self._dirty = False  # the sync thread changed what callers see (adopted at the next sync)
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._pending: tuple[Any, Any, tuple[int, int, int, int, np.ndarray] | None, _RecvBuf] | None = None
        self._comm_stream = self.dev.new_stream()
        self._xfer_stream = self.dev.new_stream()
        self._sync_ev: Any = None  # the forward event of the sync being processed
        self._step = 0

        # Process group for p2p, used by the worker thread only.
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world))
        if transfer_group is None:
            transfer_group = dist.new_group(ranks=ranks, backend=backend)
        xfer_backend = dist.get_backend(transfer_group)
        if self.world > 1 and self.dev.has_streams and xfer_backend == "gloo":
            # ProcessGroupGloo::send/recv hand tensor.data_ptr() to gloo's TCP transport
            # with no device check: a device pointer would be read/written as host memory.
            raise ValueError(
                "eplbd_client: the transfer group is gloo but the expert weights are on "
                f"{host.device}: gloo p2p cannot move device tensors; give a device "
                "backend's transfer_group (nccl/hccl)"
            )
        self.transfer_group = transfer_group
        # gloo matches p2p messages by tag (a late message of an aborted plan can never pair
        # with a later plan's); NCCL and HCCL ignore tags and pair each peer's operations in
        # issue order, so a plan aborted with p2p possibly in flight leaves the group unusable.
        self._xfer_backend = xfer_backend
        self._p2p_by_order = xfer_backend != "gloo"
        self._transfer_unsafe = ""  # why later plans are refused ("" = the group is fine)
        self._active_plan: Plan | None = None  # the plan in progress (replicated: same on every rank)
        # One collective with every rank first: NCCL sets a communicator up lazily and
        # wants all ranks in its first call, which a p2p round never is.
        dist.all_reduce(torch.zeros(1, device=comm_device), group=transfer_group)
        # The all-gather's group. The sync thread needs one of its own: collectives
        # issued from two threads on one group (the engine's forward and ours) would
        # interleave in a different order on different ranks.
        if self._threaded:
            if control_group is None:
                control_group = dist.new_group(ranks=ranks, backend=backend)
            dist.all_reduce(torch.zeros(1, device=comm_device), group=control_group)
        else:
            control_group = group
        self.control_group = control_group

        # Shared memory: the leader creates, then one all-gather tells every rank
        # its pids and whether its node's leader succeeded (so a failure raises
        # on every rank instead of leaving the others in a barrier).
        self._dom_w: Domain | None = None
        err = ""
        if self.is_leader:
            try:
                self._dom_w = Domain.create(
                    self.domain_name,
                    g,
                    ring_capacity=cfg.ring_capacity,
                    mode=cfg.shm_mode,
                    phy2log=p2l,
                    epoch=epoch,
                )
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
        info: list[Any] = [None] * self.world
        dist.all_gather_object(info, (os.getpid(), err), group=group)
        failed = [(r, msg) for r, (_, msg) in enumerate(info) if msg]
        if failed:
            if self._dom_w is not None:
                self._dom_w.unlink()
                self._dom_w.close()
            r, msg = failed[0]
            raise RuntimeError(f"eplbd_client: node leader rank {r} could not create its shm domain: {msg}")
        if self._dom_w is not None:
            self._dom_w.set_rank_pids(
                [int(pid) for r, (pid, _) in enumerate(info) if r // self.rpn == self.node]
            )
        # Separate read-only attachments per thread: the forward thread polls one
        # word, the worker reads whole plans; neither shares mmap state with writes.
        self._dom_poll = Domain.attach(self.domain_name, geometry=g)
        self._dom_read = Domain.attach(self.domain_name, geometry=g)

        self._cand: _Cand | None = None
        self._validated: OrderedDict[int, tuple[int, Plan]] = OrderedDict()
        self._validating = False
        self._xfer: PlanTransfer | None = None
        self._exec_err = 0
        self._abort_req = False
        self._closed = False
        self._worker = _Worker(f"eplbd-worker-r{self.rank}", self.dev.bind_thread)
        self._pub: _Worker | None = (
            _Worker(f"eplbd-publisher-r{self.rank}", self.dev.bind_thread) if self.is_leader else None
        )
        # The sync thread: takes (sync index, window meta, forward event) per sync.
        self._n = 0  # next sync index (forward thread)
        self._ctl_error: BaseException | None = None
        self._failed: RuntimeError | None = None  # raised by every step() after a sync failed
        self._ctl_error_sync = -1
        self._waits = 0
        # Held while the sync thread works on a sync (acquired by the forward thread at
        # the handoff, released by the sync thread): a lock as a binary semaphore, the
        # cheapest "is it done?" test Python has.
        self._free = threading.Lock()
        self._ctl_q: queue.SimpleQueue[tuple[int, Any, Any] | None] = queue.SimpleQueue()
        self._ctl: threading.Thread | None = None
        if self._threaded:
            self._ctl = threading.Thread(target=self._ctl_loop, name=f"eplbd-sync-r{self.rank}", daemon=True)
            self._ctl.start()

    # ------------------------------------------------------------------ info
    @property
    def stats(self) -> ClientStats:
        """Counters as of the latest sync (the plan counters are replicated: equal on every
        rank at equal steps). With a sync thread: adopted at the forward sync after each
        decision; ``syncs`` and ``steps`` at every sync."""
        return self._snap

    @property
    def epoch(self) -> int:
        """Epoch of the placement the forward pass runs with."""
        return self._epoch_in_force

    @property
    def phy2log(self) -> np.ndarray:
        """The placement the forward pass runs with [L, P] (read-only snapshot)."""
        return self._p2l_in_force

    @property
    def active_plan(self) -> int:
        """Id of the plan in progress as of the latest sync, -1 none."""
        return self._active_in_force

    def status(self) -> dict[str, Any]:
        """A snapshot for logs and metrics: agreed state plus counters (cheap, forward thread)."""
        st, s = self.state, self.stats
        return {
            "rank": self.rank,
            "node": self.node,
            "leader": self.is_leader,
            "domain": self.domain_name,
            "mode": self.config.mode,
            "step": self._step,
            "sync": s.syncs,
            "epoch": self._epoch_in_force,
            "active_plan": self._active_in_force,
            "layers_committed_of_active": (st.committed, st.active_layers),
            "plans_started": s.plans_started,
            "plans_committed": s.plans_committed,
            "plans_aborted": s.plans_aborted,
            "plans_rejected": s.plans_rejected,
            "plans_mismatched": s.plans_mismatched,
            "num_nodes": self.layout.num_nodes,
            "diverging_since_sync": st.diverging_since,
            "last_error": C.error_name(s.last_error) if s.last_error else "",
            "last_error_plan": s.last_error_plan,
            # Counters of the helper threads, read live (plain int reads).
            "windows_published": self._ws.windows_published,
            "publish_errors": self._ws.publish_errors,
            "sync_thread": self._threaded,
            "sync_thread_cpu_us_per_sync": self._ws.sync_thread_cpu_ns / max(s.syncs, 1) / 1e3,
            "sync_thread_waits": self._waits,
            # Set when an abort may have left the p2p group out of step: plans are refused.
            "transfer_unsafe": self._transfer_unsafe,
            # Set once a sync raised: the client is done (every later step() raises it).
            "failed": str(self._failed) if self._failed is not None else "",
        }

    def request_abort(self) -> None:
        """Ask every rank to abort the plan in progress at the next decision."""
        self._abort_req = True

    # ------------------------------------------------------------------ step
    def step(self) -> None:
        """Call once per forward step on every rank, after the step's record() calls."""
        if self.recorder._pending:
            self.recorder.flush()
        self._step += 1
        if self._step % self._K:
            return
        if self._closed:
            raise RuntimeError(f"eplbd_client rank {self.rank}: step() after close()")
        if self._failed is not None:
            raise self._failed  # the same error, at once, at every sync after the first
        try:
            if self._threaded:
                self._handoff()
            else:
                self._sync_inline()
        except BaseException as e:
            # A sync that raised may have stopped half-way (a commit, the collective's
            # bookkeeping): this client is done; the engine must not go on with it.
            if isinstance(e, RuntimeError) and str(e).startswith("eplbd_client"):
                self._failed = e
                raise
            self._failed = RuntimeError(
                f"eplbd_client rank {self.rank}: the sync of step {self._step} failed: "
                f"{type(e).__name__}: {e}"
            )
            self._failed.__cause__ = e
            if isinstance(e, Exception):
                raise self._failed from e
            raise  # KeyboardInterrupt and the like stay what they are

    def _window_meta(self, n: int) -> tuple[int, int, int, int, np.ndarray] | None:
        """(leader) Window n's id, steps and the placement in force while it was recorded:
        commits happen only at syncs, after this is taken."""
        if self._pub is None:
            return None
        return (n, self._step - self._K, self._step, self._epoch_in_force, self._p2l_in_force)

    def _switch(self, w: int) -> None:
        """Record window ``w`` from now on (into buffer w % NBUF, zeroed since its last use)."""
        b = w % NBUF
        zev = self._zero_ev[b]
        if zev is not None:
            self.dev.wait_event(zev)  # forward stream waits for the zeroing on the comm stream
        self.recorder.switch(b)

    def _sync_inline(self) -> None:
        """Sync n on the forward thread: the whole sync's work, decisions applied at once."""
        n = self._n
        meta = self._window_meta(n)
        self._switch(n + 1)
        ev = self.dev.record_event() if self._fwd_events else None
        self._n = n + 1
        self._process(n, meta, ev)
        self._in_force()
        self._ws.steps = self._step

    def _handoff(self) -> None:
        """Sync n with a sync thread (forward thread): apply what the sync thread decided at
        sync n-1, switch the count buffer, hand sync n over. Takes no lock the daemon or
        the sync thread hold; waits only if the sync thread is still busy with sync n-1
        (K forward steps after it got it)."""
        free = self._free
        waited = 0
        if not free.acquire(False):
            # The sync thread is still in sync n-1: in practice waiting for the all-gather,
            # i.e. for a rank whose forward is behind (what the inline sync waits for too).
            self._waits += 1
            t0 = time.perf_counter_ns()
            if not free.acquire(timeout=self.config.gather_timeout_s + 5):
                raise RuntimeError(
                    f"eplbd_client rank {self.rank}: sync thread still busy with sync {self._n - 1} "
                    f"after {self.config.gather_timeout_s + 5:.0f} s"
                )
            waited = time.perf_counter_ns() - t0
        if self._ctl_error is not None:
            free.release()  # every later step raises the same error at once
            e = self._ctl_error
            raise RuntimeError(
                f"eplbd_client rank {self.rank}: the sync thread failed at sync {self._ctl_error_sync}: "
                f"{type(e).__name__}: {e}"
            ) from e
        n = self._n
        meta = self._window_meta(n)
        if self._actions:
            try:
                self._run_actions()
            except BaseException:
                free.release()  # nothing was handed over: the sync thread stays idle (close)
                raise
        if self._dirty:
            self._adopt()
        elif not n & 63:  # the counters that change without a decision, now and then
            self._adopt_counters()
        self._switch(n + 1)
        ev = self.dev.record_event() if self._fwd_events else None
        self._n = n + 1
        snap = self._snap
        snap.syncs = n + 1
        snap.steps = self._step
        snap.last_collective_ns = waited
        self._ctl_q.put((n, meta, ev))

    def _run_actions(self) -> None:
        """Forward thread: the commits the sync thread decided at the previous sync."""
        for xfer, upto in self._actions:
            self._commit_layers(xfer, upto)
        self._actions.clear()

    def _commit_layers(self, xfer: PlanTransfer, upto: int) -> None:
        """Forward thread: copy staged layers into their slots and switch their tables."""
        try:
            xfer.commit(upto)
        except BaseException as e:
            raise RuntimeError(
                f"eplbd_client rank {self.rank}: committing plan {xfer.plan.plan_id} failed: "
                f"{type(e).__name__}: {e}; a layer may now hold new weights under its old "
                "routing tables: this rank must stop serving"
            ) from e

    def _in_force(self) -> None:
        """Forward thread, decisions applied: the forward pass now runs the agreed placement."""
        self._p2l_in_force = self._phy2log
        self._epoch_in_force = self.state.epoch
        self._active_in_force = self.state.active_id

    def _adopt(self) -> None:
        """Forward thread, sync thread idle: what callers see becomes the agreed state."""
        self._dirty = False
        self._in_force()
        ws = self._ws
        self._snap = dataclasses.replace(ws, history=list(ws.history), sync_thread_waits=self._waits)

    def _adopt_counters(self) -> None:
        """Forward thread, sync thread idle: the counters that move between decisions."""
        ws, snap = self._ws, self._snap
        snap.windows_published = ws.windows_published
        snap.publish_errors = ws.publish_errors
        snap.poll_errors = ws.poll_errors
        snap.recv_buffers_replaced = ws.recv_buffers_replaced
        snap.sync_thread_cpu_ns = ws.sync_thread_cpu_ns
        snap.sync_thread_waits = self._waits

    def _ctl_loop(self) -> None:
        """The sync thread: one sync's work per item, in order."""
        q, tt = self._ctl_q, time.thread_time_ns
        self.dev.bind_thread()
        while True:
            item = q.get()
            if item is None:
                return
            c0 = tt()
            try:
                self._process(*item)
            except BaseException as e:  # the forward thread raises it at its next sync
                self._ctl_error, self._ctl_error_sync = e, item[0]
                log.error("eplbd_client rank %d: sync %d failed: %s", self.rank, item[0], e)
            finally:
                self._ws.sync_thread_cpu_ns += tt() - c0
                self._free.release()

    def _process(self, n: int, meta: tuple[int, int, int, int, np.ndarray] | None, ev: Any) -> None:
        """Sync n's work: read the matrix gathered at sync n-1, decide, poll, pack the words,
        launch the all-gather of window n (buffer n % NBUF, recorded until the forward
        event ``ev``)."""
        st = self.state
        ws = self._ws
        st.sync = n
        ws.syncs = n
        ws.last_collective_ns = 0
        # The forward stream's event of this sync (after every commit applied so far): a
        # plan started now stages after it. Recording one here instead would mark this
        # thread's current stream, not necessarily the engine's.
        self._sync_ev = ev
        if self._held:
            # Sync n-1's publisher jobs (its decision's status/placement writes, then
            # window n-2): the forward thread has applied that decision since.
            self._deferred.extend(self._held)
            self._held = []
        if self._pending is not None:
            rb, publish = self._finish_gather()
            self._zero(n - 1)
            if C.quiet_bytes(b"".join(rb.word_rows), st):
                st.diverging_since = -1  # what track_divergence does on quiet words
            else:
                words = rb.words
                d = C.decide(words, st, self.config.plan_timeout_syncs, self.config.divergence_syncs)
                if d.kind != C.NONE:
                    self._apply(d, words)
                    self._dirty = True
                C.track_divergence(words, st)
            if publish is not None:
                # After this sync's status/placement writes (queued by _apply): a daemon
                # woken by window n-1 then sees the plan state as of sync n, the same on
                # every node, so the daemons' in-flight checks agree.
                self._defer(*publish)
        self._poll()
        b = n % NBUF
        self._pack(*self._words_dst[b])
        self._launch(meta, b, ev)
        ws.syncs = n + 1
        # Wake the helper threads only now: started earlier, they would contend
        # for the GIL with the rest of this sync instead of with the next forward.
        if self._deferred:
            for worker, fn in self._deferred:
                worker.submit(fn)
            self._deferred.clear()

    def _defer(self, worker: _Worker, fn: Callable[[], None]) -> None:
        if self._threaded and worker is self._pub:
            self._held.append((worker, fn))
        else:
            self._deferred.append((worker, fn))

    def _zero(self, w: int) -> None:
        """Window ``w``'s all-gather has finished: zero its buffer for window w + NBUF."""
        if not self._comm_same_device:
            return  # zeroed right after its copy to the host (_launch)
        b = w % NBUF
        mv = self._counts_mv[b]
        if mv is not None:
            mv[:] = self._zeros  # host buffer: a memcpy, cheaper than a torch or numpy op
        else:
            with self.dev.use_stream(self._comm_stream):
                self._sends[b][: self._ls].zero_()
                self._zero_ev[b] = self.dev.record_event(self._comm_stream)

    def _new_recv(self) -> _RecvBuf:
        n = self.world * self._width
        if self._comm_device.type == "cpu":
            t = torch.zeros(n, dtype=torch.int64)
        else:
            t = self.dev.pinned_empty((n,), torch.int64)
        return _RecvBuf(t, self.world, self._ls)

    def _finish_gather(self) -> tuple[_RecvBuf, tuple[_Worker, Callable[[], None]] | None]:
        """The buffer holding the previous sync's matrix (its words are valid during this
        sync) and (leader) the job that publishes its window."""
        assert self._pending is not None
        work, ev, meta, rb = self._pending
        self._pending = None
        t0 = time.perf_counter_ns()
        if ev is not None:
            # Stream device: the event follows the collective and the copy to pinned
            # host memory on the comm stream; both finished long ago.
            self.dev.wait_event_host(ev, self.config.gather_timeout_s)
        else:
            work.wait(timeout=self._gather_timeout)
        self._ws.last_collective_ns += time.perf_counter_ns() - t0
        publish = None
        if self._pub is not None and meta is not None:
            # The publisher reads the counts from rb itself; no all-gather writes
            # into rb until it clears ``busy`` (_next_recv).
            rb.busy = True
            publish = (self._pub, lambda: self._publish_window(rb, meta))
        return rb, publish

    def _next_recv(self) -> _RecvBuf:
        """The host buffer for the next all-gather: the oldest of the pool, unless the
        publisher still reads it (then a fresh one: rare, and no window is lost)."""
        pool = self._rbufs
        i = self._ri + 1
        if i == len(pool):
            i = 0
        rb = pool[i]
        if rb.busy:
            rb = pool[i] = self._new_recv()
            self._ws.recv_buffers_replaced += 1
            if self._ws.recv_buffers_replaced == 1:
                log.warning("eplbd_client rank %d: publisher is more than two syncs behind", self.rank)
        self._ri = i
        return rb

    def _launch(self, meta: tuple[int, int, int, int, np.ndarray] | None, b: int, fwd_ev: Any) -> None:
        """Start the all-gather of window buffer ``b`` and the packed words. ``fwd_ev``:
        stream devices, recorded on the forward stream after the window's last count."""
        dev, comm, ls = self.dev, self._comm_stream, self._ls
        rb = self._next_recv()
        ev = None
        t0 = time.perf_counter_ns()
        if self._comm_same_device:
            send = self._sends[b]
            if self._recv is not None and comm is not None:
                with dev.use_stream(comm):
                    dev.wait_event(fwd_ev, comm)
                    send[ls:].copy_(self._words_t, non_blocking=True)  # pinned: no host sync
                    work = self._gather(self._recv, send, group=self.control_group, async_op=True)
                    work.wait()  # stream-ordered: the copy below runs after the collective
                    rb.t.copy_(self._recv, non_blocking=True)
                    ev = dev.record_event(comm)
            elif self._recv is not None:  # device group without streams: blocking copies
                send[ls:].copy_(self._words_t)
                work = self._gather(self._recv, send, group=self.control_group, async_op=True)
                work.wait()
                rb.t.copy_(self._recv)
            else:  # host buffers, host group: _pack wrote the words into the tail
                work = self._gather(rb.t, send, group=self.control_group, async_op=True)
        else:
            # Counts on the device, host group (e.g. CUDA weights, gloo): a blocking hop
            # through pinned host memory, on this thread; then the buffer is zeroed.
            send = self._sends[0]
            buf = self._rec_bufs[b]
            with dev.use_stream(comm):
                dev.wait_event(fwd_ev, comm)
                send[:ls].copy_(buf.view(-1), non_blocking=True)
                done = dev.record_event(comm)
                buf.zero_()
                self._zero_ev[b] = dev.record_event(comm)
            dev.wait_event_host(done, self.config.gather_timeout_s)
            send[ls:].copy_(self._words_t)
            work = self._gather(rb.t, send, group=self.control_group, async_op=True)
        self._ws.last_collective_ns += time.perf_counter_ns() - t0
        self._pending = (work, ev, meta, rb)

    # ------------------------------------------------------------------ decisions
    def _apply(self, d: C.Decision, words: np.ndarray | None = None) -> None:
        st = self.state
        if d.kind == C.START:
            self._start(d)
        elif d.kind == C.COMMIT:
            self._commit(d.commit_to)
        elif d.kind == C.ABORT:
            self._note_unsafe_abort(d, words)
            self._finish_plan(PLAN_ABORTED, d.error, self._xfer.error_message if self._xfer else "")
        elif d.kind == C.REJECT:
            st.last_decided_id = d.plan_id
            self._ws.plans_rejected += 1
            if d.error in C.MISMATCH_ERRORS:
                self._ws.plans_mismatched += 1
            self._note_error(d.plan_id, d.error, "plan rejected" + self._mismatch_detail(d, words))
            self._ws.history.append(("reject", d.plan_id, st.sync))
            self._queue_status(PlanStatus(d.plan_id, PLAN_REJECTED, 0, d.error, time.time_ns()))

    def _note_unsafe_abort(self, d: C.Decision, words: np.ndarray | None) -> None:
        """Whether an aborted plan may have left the transfer group unusable, decided from the
        gathered words and the plan alone (so every rank marks it the same way):

        - a p2p failed or timed out (``transfer_failed``): gloo closes the pair on a timeout,
          and on NCCL/HCCL the unmatched operations stay queued;
        - on a group that pairs p2p by order (NCCL/HCCL), any abort of a plan with p2p ops
          before every rank staged every layer: unmatched sends/receives may remain, and a
          later plan's could pair with them (wrong experts) or wait behind them for ever.

        Later plans are then refused (``transfer_group_unsafe``) instead of failing or
        corrupting weights; the placement in force stays."""
        plan = self._active_plan
        if self._transfer_unsafe or d.error == C.ERR_STAGING or plan is None:
            return  # a staging-gate error stops every rank before its first p2p
        changed = int(changed_layers(plan, self.g).shape[0])
        staged = int(np.asarray(words)[:, C.W_STAGED].min()) if words is not None else -1
        remote = bool((plan.ops["kind"] != COPY).any())  # p2p at all
        unmatched = self._p2p_by_order and remote and staged < changed
        if d.error != C.ERR_TRANSFER and not unmatched:
            return
        why = (
            "a p2p transfer failed"
            if d.error == C.ERR_TRANSFER
            else f"the {self._xfer_backend} transfer group pairs p2p messages by order and some may be "
            "unmatched"
        )
        self._transfer_unsafe = (
            f"plan {self.state.active_id} was aborted ({C.error_name(d.error)}) with "
            f"{max(staged, 0)} of {changed} layers staged on some rank; {why}: "
            "later plans are refused until the ranks restart"
        )
        log.error("eplbd_client rank %d: %s", self.rank, self._transfer_unsafe)

    def _start(self, d: C.Decision) -> None:
        st = self.state
        st.last_decided_id = d.plan_id
        st.active_id = d.plan_id
        st.committed = 0
        st.last_progress_sync = st.sync
        self._exec_err = 0
        self._abort_req = False
        self._ws.plans_started += 1
        self._ws.history.append(("start", d.plan_id, st.sync))
        entry = self._validated.get(d.plan_id)
        xfer: PlanTransfer | None = None
        if entry is None or entry[0] != d.plan_hash:  # cannot happen: this rank reported it OK
            self._exec_err = C.ERR_INTERNAL
            n_layers = 1  # unknown; the abort at the next sync makes it moot
            base = -1
        elif self._transfer_unsafe:  # the same on every rank: all abort it at the next sync
            self._exec_err = C.ERR_TRANSFER_UNSAFE
            n_layers = int(changed_layers(entry[1], self.g).shape[0])
            base = entry[1].base_epoch
            log.error(
                "eplbd_client rank %d: plan %d refused: %s", self.rank, d.plan_id, self._transfer_unsafe
            )
        else:
            plan = entry[1]
            base = plan.base_epoch
            try:
                xfer = PlanTransfer(
                    plan,
                    self.g,
                    self.rank,
                    self.host,
                    self.transfer_group,
                    self.dev,
                    self.capacity,
                    self.config.p2p_timeout_s,
                    stream=self._xfer_stream,
                    start_event=self._sync_ev,
                    pace_rounds_per_step=self.config.transfer_rounds_per_step,
                    # The forward thread's own step counter, read by the worker without a lock.
                    step_clock=lambda: self._step,
                    # Steps one paced layer may take and still commit within the plan
                    # timeout (the agreement lags staging by up to two syncs, a sync
                    # thread's commit by one more, plus slack).
                    max_layer_steps=(self.config.plan_timeout_syncs - 5) * self.config.sync_interval,
                )
                n_layers = xfer.num_layers
            except Exception as e:
                log.error("eplbd_client rank %d: cannot set up plan %d: %s", self.rank, d.plan_id, e)
                self._exec_err = C.ERR_INTERNAL
                n_layers = 1
        self._xfer = xfer
        self._active_plan = None if entry is None or entry[0] != d.plan_hash else entry[1]
        st.active_base = base
        st.active_layers = n_layers
        self._queue_status(PlanStatus(d.plan_id, PLAN_STARTED, 0, 0, time.time_ns()))
        log.info(
            "eplbd_client rank %d: start plan %d (%d layers) at sync %d",
            self.rank,
            d.plan_id,
            n_layers,
            st.sync,
        )
        if xfer is not None and n_layers == 0:  # nothing moves: the epoch is renamed only
            st.epoch = d.plan_id
            self._queue_placement()
            self._finish_plan(PLAN_COMMITTED, 0)
            return
        if xfer is None:
            return
        if self.config.mode == "stw":
            self._run_stw(xfer)
        else:
            self._defer(self._worker, xfer.run)

    def _run_stw(self, xfer: PlanTransfer) -> None:
        """Stop-the-world: every layer staged and committed now, on the forward thread."""
        t0 = time.perf_counter()
        flag = torch.zeros(1, dtype=torch.int64)
        if self._comm_same_device:
            flag = flag.to(self._sends[0].device)
        for j in range(xfer.num_layers):
            err = 0
            try:
                if xfer.gate_error is not None:
                    raise xfer.gate_error
                xfer.staged.append(xfer.transfer_layer(j))
            except TransferError as e:
                err, xfer.error_message = e.code, str(e)
            flag.fill_(err)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            err = int(flag.item())
            if err:
                self._finish_plan(PLAN_ABORTED, err, xfer.error_message)
                break
            self._commit(j + 1)
        self._ws.stw_seconds += time.perf_counter() - t0

    def _commit(self, upto: int) -> None:
        st = self.state
        xfer = self._xfer
        assert xfer is not None
        layers = [int(x) for x in xfer.layers[st.committed : upto]]
        if self._threaded:
            self._actions.append((xfer, upto))  # the forward thread copies at the next sync
        else:
            self._commit_layers(xfer, upto)
        st.committed = upto
        st.last_progress_sync = st.sync
        self._ws.layers_committed += len(layers)
        new = self._phy2log.copy()
        new[layers] = xfer.plan.phy2log[layers]
        self._phy2log = new
        full = upto >= st.active_layers
        st.epoch = st.active_id if full else C.partial_epoch(st.active_id, upto)
        # Placement before status: a daemon that sees the status final must find
        # the new placement already in force.
        self._queue_placement()
        if full:
            self._ws.history.append(("commit", st.active_id, st.sync))
            self._finish_plan(PLAN_COMMITTED, 0)
        else:
            self._queue_status(PlanStatus(st.active_id, PLAN_STARTED, upto, 0, time.time_ns()))

    def _finish_plan(self, state: int, error: int, message: str = "") -> None:
        st = self.state
        pid = st.active_id
        if self._xfer is not None:
            self._xfer.abort()  # no-op for a finished transfer; stops a running one
        if state == PLAN_COMMITTED:
            self._ws.plans_committed += 1
        else:
            self._ws.plans_aborted += 1
            self._ws.history.append(("abort", pid, st.sync))
            self._note_error(
                pid,
                error,
                f"plan aborted after {st.committed}/{st.active_layers} layers"
                + (f": {message}" if message else ""),
            )
        self._queue_status(PlanStatus(pid, state, st.committed, error, time.time_ns()))
        st.active_id = -1
        st.active_base = -1
        st.active_layers = 0
        st.committed = 0
        self._xfer = None
        self._active_plan = None
        self._exec_err = 0
        self._abort_req = False

    def _mismatch_detail(self, d: C.Decision, words: np.ndarray | None) -> str:
        """For a rejection because nodes disagree: which plan each node's ranks held."""
        if d.error not in C.MISMATCH_ERRORS or words is None:
            return ""
        w = np.asarray(words)
        per_node = []
        for n in range(self.layout.num_nodes):
            rows = w[n * self.rpn : (n + 1) * self.rpn]
            ids = sorted({int(v) for v in rows[:, C.W_CAND_ID]})
            hashes = sorted({int(v) for v in rows[:, C.W_CAND_HASH]})
            per_node.append(f"node {n}: plan {ids} hash {[f'{h:x}' for h in hashes]}")
        what = "only some nodes published it" if d.error == C.ERR_DIVERGED else "nodes' plans differ"
        return f" ({what}; " + ", ".join(per_node) + ")"

    def _note_error(self, plan_id: int, code: int, what: str) -> None:
        self._dirty = True
        self._ws.last_error = code
        self._ws.last_error_plan = plan_id
        self._ws.last_error_message = f"{what}: {C.error_name(code)}"
        log.warning("eplbd_client rank %d: plan %d: %s (%s)", self.rank, plan_id, what, C.error_name(code))

    # ------------------------------------------------------------------ plans from shm
    def _poll(self) -> None:
        st = self.state
        if st.active_id >= 0 or self._validating:
            return
        try:
            latest = self._dom_poll.latest_plan_id()
        except Exception as e:  # a broken segment must not stop inference
            self._ws.poll_errors += 1
            if self._ws.poll_errors == 1:
                log.error("eplbd_client rank %d: cannot poll plan id: %s", self.rank, e)
            return
        if latest <= st.last_decided_id:
            return
        c = self._cand
        # Known plan: re-validate only when the epoch moved onto its base.
        revalidate = (
            c is not None
            and c.status in (C.CAND_OK, C.CAND_STALE)
            and (c.validated_epoch != st.epoch and c.base_epoch == st.epoch)
        )
        if c is not None and c.plan_id >= latest and not revalidate:
            return
        self._validating = True
        epoch, p2l = st.epoch, self._phy2log
        self._defer(self._worker, lambda: self._validate(latest, epoch, p2l))

    def _validate(self, latest: int, epoch: int, p2l: np.ndarray) -> None:
        """Worker thread: read the current plan and check it against placement (epoch, p2l)."""
        try:
            try:
                plan = self._dom_read.read_plan()
            except Exception as e:
                plan = None
                why = f"{type(e).__name__}: {e}"
            else:
                why = "no plan"
            if plan is None:
                self._cand = _Cand(latest, 0, -1, C.ERR_UNREADABLE, epoch)
                log.warning("eplbd_client rank %d: plan %d unreadable: %s", self.rank, latest, why)
                return
            h = plan_hash(plan)
            if plan.base_epoch != epoch:
                self._cand = _Cand(plan.plan_id, h, plan.base_epoch, C.CAND_STALE, epoch)
                return
            try:
                validate_plan(plan, p2l, self.g)
            except (PlanError, ValueError) as e:
                self._cand = _Cand(plan.plan_id, h, plan.base_epoch, C.ERR_INVALID, epoch)
                log.warning("eplbd_client rank %d: plan %d invalid: %s", self.rank, plan.plan_id, e)
                return
            self._validated[plan.plan_id] = (h, plan)
            while len(self._validated) > 8:
                self._validated.popitem(last=False)
            self._cand = _Cand(plan.plan_id, h, plan.base_epoch, C.CAND_OK, epoch)
        except Exception as e:
            self._cand = _Cand(latest, 0, -1, C.ERR_INTERNAL, epoch)
            log.exception("eplbd_client rank %d: validating plan %d: %s", self.rank, latest, e)
        finally:
            self._validating = False

    # ------------------------------------------------------------------ control words
    def _pack(self, buf: memoryview, offset: int) -> None:
        """This rank's control words into ``buf`` at byte ``offset`` (the send buffer's tail on
        a CPU group, else ``_words_np``)."""
        st = self.state
        c = self._cand
        if c is None:
            cand: tuple[int, int, int, int] = (-1, 0, -1, C.CAND_PENDING)
        else:
            if c.status >= 16:
                status = c.status
            elif c.status == C.CAND_OK and c.validated_epoch == st.epoch:
                status = C.CAND_OK
            else:
                status = C.CAND_STALE if c.base_epoch != st.epoch else C.CAND_PENDING
            cand = (c.plan_id, c.plan_hash, c.base_epoch, status)
        if st.active_id >= 0:
            xfer = self._xfer
            run: tuple[int, int, int] = (
                xfer.staged_count() if xfer is not None else 0,
                self._exec_err or (xfer.error if xfer is not None else 0),
                int(self._abort_req),
            )
        else:
            run = (0, 0, 0)
        # One struct.pack_into: cheaper than twelve numpy item writes or a numpy
        # assignment from a sequence.
        C.WORDS_STRUCT.pack_into(
            buf, offset, st.sync, st.epoch, st.active_id, st.committed, self._config_digest, *cand, *run
        )

    # ------------------------------------------------------------------ leader: shm writes
    def _queue_status(self, status: PlanStatus) -> None:
        if self._pub is not None:
            dom = self._dom_w
            assert dom is not None  # the leader made it
            self._defer(self._pub, lambda: self._pub_call("plan status", dom.write_plan_status, status))

    def _queue_placement(self) -> None:
        if self._pub is not None:
            epoch, p2l, dom = self.state.epoch, self._phy2log, self._dom_w
            assert dom is not None  # the leader made it
            self._defer(self._pub, lambda: self._pub_call("placement", dom.write_placement, epoch, p2l))

    def _pub_call(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # shm trouble must never stop inference; count and log once
            self._ws.publish_errors += 1
            if self._ws.publish_errors <= 3:
                log.error(
                    "eplbd_client rank %d: writing %s to %s failed: %s", self.rank, what, self.domain_name, e
                )

    def _publish_window(self, rb: _RecvBuf, meta: tuple[int, int, int, int, np.ndarray]) -> None:
        """Publisher thread: counts ``rb.counts`` [R, L*S] of window ``meta[0]`` -> logical
        loads [L, E] -> ring. Releases ``rb`` for the next all-gathers as soon as it is read."""
        window_id, step_begin, step_end, epoch, p2l = meta
        g = self.g
        L, E, S, R = g.num_layers, g.num_experts, g.slots_per_rank, self.world
        try:
            # The transpose's reshape copies out of rb: the last read of it.
            phys = rb.counts.reshape(R, L, S).transpose(1, 0, 2).reshape(L, R * S)  # [L, P]
            weights = phys.ravel().astype(np.float64)
        finally:
            rb.busy = False
        idx = (p2l.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[:, None]).ravel()
        loads = np.bincount(idx, weights=weights, minlength=L * E)
        loads = np.rint(loads).astype(np.int64).reshape(L, E)
        assert self._dom_w is not None
        try:
            self._dom_w.write_window(window_id, loads, epoch=epoch, step_begin=step_begin, step_end=step_end)
            self._dom_w.ring_doorbell()
            self._ws.windows_published += 1
        except Exception as e:
            self._pub_call("window", _raise, e)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop threads, abort a plan in progress locally, release shm (leader unlinks if configured)."""
        if self._closed:
            return
        self._closed = True
        if self._ctl is not None:
            self._free.acquire(timeout=self.config.gather_timeout_s + 5)
            self._ctl_q.put(None)
            self._ctl.join(timeout=10)
            if self._ctl_error is None and self._failed is None:
                # What every rank agreed at the last sync: applied here too, so that the
                # weights, the tables, the shm placement and the stats agree.
                self._run_actions()
                self._adopt()
                for worker, fn in self._held:
                    worker.submit(fn)
                self._held = []
        if self._xfer is not None:
            self._xfer.abort()
        if self._pending is not None:
            with contextlib.suppress(Exception):
                self._pending[0].wait(timeout=self._gather_timeout)
            self._pending = None
        self._worker.stop(timeout=self.config.p2p_timeout_s + 5)
        # The count/send/recv buffers were allocated on the forward stream and are used on
        # the comm stream (zero_, copies, the collective), the staging pool on the transfer
        # stream: once this client is dropped the caching allocator hands their blocks to
        # new forward-stream allocations at once. Let the side streams drain first (polled
        # and bounded: a transfer stream stuck behind an unmatched NCCL p2p must not hang
        # close).
        for s in (self._comm_stream, self._xfer_stream):
            if s is not None:
                try:
                    self.dev.wait_event_host(self.dev.record_event(s), self.config.gather_timeout_s)
                except TimeoutError as e:
                    log.warning("eplbd_client rank %d: close: side stream not drained: %s", self.rank, e)
        if self._pub is not None:
            self._pub.stop(timeout=10)
        for d in (self._dom_poll, self._dom_read):
            d.close()
        if self._dom_w is not None:
            if self.config.unlink_on_close:
                try:
                    self._dom_w.unlink()
                except Exception as e:
                    log.warning("eplbd_client: unlink %s: %s", self.domain_name, e)
            self._dom_w.close()

    def __enter__(self) -> EplbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise(e: Exception) -> None:
    raise e
