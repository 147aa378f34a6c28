"""The hooks on vLLM's ``EplbState``: counts go to eplbd, eplbd's plans come back.

:func:`install` patches the class (once per process) so that, for every model
vLLM registers with ``EplbState.add_model``:

- after vLLM built its maps, a :class:`ModelBridge` creates an
  :class:`eplbd_client.EplbClient` over a :class:`~eplbd_vllm.host.VllmExpertHost`
  (collective over the EP group, like ``add_model`` itself);
- ``EplbState.step`` (called once per forward step on every rank, dummy steps of
  idle DP ranks included) adds vLLM's ``expert_load_pass`` [L, P] into a local
  accumulator, zeroes it, and steps the client; at the client's sync steps the
  accumulator is reduce-scattered over the EP group so that each rank hands the
  client its own slots' counts [L, S] summed over every rank's tokens;
- ``EplbState.rearrange`` and ``start_async_loop`` never run vLLM's logic (a
  call is counted and logged); vLLM's async EPLB is switched off;
- the client commits layers through ``VllmExpertHost.commit_layer``: in-place
  copies into vLLM's maps, then the platform routing-table hooks.

Bytes per sync (per rank): the reduce-scatter input is L*P int64 (a ring moves
(R-1)/R of it), then the client's all-gather sends L*S + control words int64
(:meth:`ModelBridge.bytes_per_sync`). Per step: one add and one zero on the
device, no collective, no host sync.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import threading
from typing import Any

import torch
import torch.distributed as dist

from .settings import PluginSettings, model_tag

__all__ = ["ModelBridge", "bridges", "install", "installed", "uninstall"]

log = logging.getLogger("eplbd_vllm")

_ATTR = "_eplbd_bridges"  # EplbState instance attribute: {model key: ModelBridge}
_lock = threading.Lock()
_originals: dict[str, Any] = {}
_settings: PluginSettings | None = None
_client_config: Any = None  # eplbd_client.ClientConfig
_all_bridges: list[ModelBridge] = []


class ModelBridge:
    """eplbd for one model registered in one ``EplbState`` (one EP rank)."""

    def __init__(
        self, eplb_state: Any, model_state: Any, settings: PluginSettings, client_config: Any
    ) -> None:
        from vllm.distributed.parallel_state import get_ep_group, get_eplb_group

        from eplbd.geometry import Geometry
        from eplbd_client import EplbClient

        from .host import VllmExpertHost, expert_bytes_of

        self.settings = settings
        self.model_state = model_state
        model = model_state.model
        ep = get_ep_group()
        for attr in ("device_group", "cpu_group", "rank_in_group", "world_size"):
            if not hasattr(ep, attr):
                raise RuntimeError(f"eplbd-vllm: vLLM's EP GroupCoordinator has no {attr!r}")
        self.group = ep.device_group
        transfer_group = _transfer_group(ep, get_eplb_group)
        # The client's sync thread all-gathers on a group of its own (the forward
        # pass's collectives on the EP group are issued from another thread).
        threaded = client_config.sync_thread and client_config.mode == "async"
        control_group = _ep_subgroup(ep) if threaded else None
        R = int(ep.world_size)
        S = int(model.num_local_physical_experts)
        L = int(model.num_moe_layers)
        E = int(model.num_logical_experts)
        P = int(model.num_physical_experts)
        if R * S != P:
            raise RuntimeError(f"eplbd-vllm: {R} EP ranks x {S} local slots != {P} physical experts")
        cfg = client_config
        if cfg.ranks_per_node is not None:
            rpn = cfg.ranks_per_node
            nodes = R // rpn if R % rpn == 0 else 1  # else the client raises, naming the problem
        else:
            # Node of each EP rank from its host name (vLLM's get_node_count counts the
            # whole world, not this group): the client checks the ranks are node-major.
            node_id, nodes = _node_of_rank(ep.cpu_group, cfg.node_id)
            cfg = dataclasses.replace(cfg, node_id=node_id)
        if nodes < 1 or R % nodes:
            nodes = 1
        G = int(model.num_expert_groups or 1)
        if E % G:
            G = 1
        self.L, self.P, self.S, self.R, self.E = L, P, S, R, E
        self.rank = int(ep.rank_in_group)

        g = Geometry(L, E, R, S, num_nodes=nodes, num_groups=G, expert_bytes=expert_bytes_of(model))
        self.geometry = g
        self.host = VllmExpertHost(model_state, g.max_replicas)

        job = settings.job or _default_job(ep.cpu_group)
        self.domain = settings.domain_name(job, model_tag(str(model_state.model_name)))
        self.sync_interval = cfg.sync_interval
        self.client = EplbClient(
            self.host,
            g,
            self.domain,
            group=self.group,
            transfer_group=transfer_group,
            control_group=control_group,
            config=cfg,
            phy2log=self.host.phy2log(),
        )
        dev = self.host.device
        # [R, L, S]: chunk r (contiguous) is what rank r owns, so the sync is one
        # reduce-scatter straight out of the accumulator.
        self.acc = torch.zeros((R, L, S), dtype=torch.int64, device=dev)
        self._acc_lrs = self.acc.permute(1, 0, 2)  # [L, R, S] view for the per-step add
        self.mine = torch.zeros((L, S), dtype=torch.int64, device=dev)
        self._rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self.steps = 0
        self.syncs = 0
        log.info(
            "eplbd-vllm rank %d: model %s -> domain %s (L=%d E=%d R=%d S=%d nodes=%d, K=%d, %s)",
            self.rank,
            model_state.model_name,
            self.client.domain_name,
            L,
            E,
            R,
            S,
            nodes,
            cfg.sync_interval,
            cfg.mode,
        )

    def bytes_per_sync(self) -> dict[str, int]:
        """Per-rank payload of one sync: reduce-scatter input and all-gather send (bytes)."""
        from eplbd_client.control import NUM_WORDS

        return {
            "reduce_scatter_in": self.L * self.P * 8,
            "all_gather_send": (self.L * self.S + NUM_WORDS) * 8,
        }

    def step(self, is_dummy: bool) -> None:
        """One forward step: absorb vLLM's per-slot counts, sync on the client's schedule."""
        lp = self.model_state.expert_load_pass  # [L, P] int32, this rank's routed tokens
        if not is_dummy:  # a dummy step's counts are padding, as in vLLM
            self._acc_lrs.add_(lp.reshape(self.L, self.R, self.S))
        lp.zero_()
        self.steps += 1
        # EplbClient.step syncs (and drains its recorder) when its step count is a
        # multiple of sync_interval; it counts exactly the calls made here.
        if self.steps % self.sync_interval == 0:
            self._rs(self.mine.view(-1), self.acc.view(-1), group=self.group)
            self.acc.zero_()
            self.client.recorder.record_all(self.mine)
            self.syncs += 1
        self.client.step()

    def close(self) -> None:
        self.client.close()


_eplb_group_taken = False  # vLLM's EPLB group serves the first model's transfers only


def _transfer_group(ep: Any, get_eplb_group: Any) -> Any:
    """A process group for one client's p2p weight transfers, used by its worker thread only.

    The first model gets vLLM's EPLB group (same ranks as EP, kept apart from the
    forward pass's collectives). Each further model (an MTP/EAGLE drafter) needs
    a group of its own: two clients' workers on one group would interleave their
    sends and receives (gloo matches them by peer and tag; NCCL needs one issue
    order). It is made with ``new_subgroups_by_enumeration`` over every EP
    group's ranks, a collective over the whole world: vLLM registers a drafter
    on every rank (pipeline parallelism, where stages differ, is not supported).
    """
    global _eplb_group_taken
    if not _eplb_group_taken:
        _eplb_group_taken = True
        try:
            return get_eplb_group().device_group
        except AssertionError:  # vLLM made no EPLB group: same construction as below
            pass
    return _ep_subgroup(ep)


def _ep_subgroup(ep: Any) -> Any:
    """A new process group with this rank's EP group's ranks: ``new_subgroups_by_enumeration``
    over every EP group's ranks, a collective over the whole world (each EP group of a
    larger job gets its own; ``new_group`` would need every process to name the same ranks)."""
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, tuple(sorted(int(r) for r in ep.ranks)))
    groups = [list(r) for r in sorted(set(views))]
    mine, _ = dist.new_subgroups_by_enumeration(groups, backend=dist.get_backend(ep.device_group))
    return mine


def _node_of_rank(cpu_group: Any, explicit: int | None) -> tuple[int, int]:
    """(node label of this rank, number of nodes) over the EP group: the explicit
    ``EPLBD_CLIENT_NODE_ID`` labels when set, else host names numbered in rank order."""
    views: list[Any] = [None] * dist.get_world_size(cpu_group)
    dist.all_gather_object(views, (explicit, socket.gethostname()), group=cpu_group)
    if all(v[0] is not None for v in views):
        labels = [int(v[0]) for v in views]
    else:
        order: dict[str, int] = {}
        labels = [order.setdefault(host, len(order)) for _, host in views]
    return labels[dist.get_rank(cpu_group)], len(set(labels))


def _default_job(cpu_group: Any) -> str:
    """``vllm<pid of EP rank 0>``: equal on every rank, distinct between jobs on a host."""
    obj = [os.getpid()]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(cpu_group, 0), group=cpu_group)
    return f"vllm{obj[0]}"


def bridges(eplb_state: Any) -> dict[Any, ModelBridge]:
    """The bridges of an ``EplbState`` instance (model key -> bridge)."""
    return getattr(eplb_state, _ATTR, {})


# ---------------------------------------------------------------------- patches
def _add_model(self: Any, model: Any, model_config: Any, model_name: str | None = None) -> None:
    pc = self.parallel_config
    if getattr(pc, "enable_elastic_ep", False):
        raise RuntimeError(
            "eplbd-vllm: elastic EP resizes the physical slots at run time, which eplbd does not "
            "support; unset EPLBD_ENABLE or disable elastic EP"
        )
    before = dict(self.model_states)
    _originals["add_model"](self, model, model_config, model_name)
    # vLLM's async EPLB thread must never start, and its record flag must stay on:
    # eplbd wants every step's counts (vLLM turns recording off between its windows).
    self.is_async = False
    if self.should_record_tensor is not None:
        self.should_record_tensor.fill_(True)
    new = [(k, v) for k, v in self.model_states.items() if before.get(k) is not v]
    table = self.__dict__.setdefault(_ATTR, {})
    assert _settings is not None
    for key, ms in new:
        b = ModelBridge(self, ms, _settings, _client_config)
        table[key] = b
        _all_bridges.append(b)


def _step(self: Any, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
    # is_profile: vLLM's profile run would do a dummy rearrangement to reserve its
    # own transfer buffers; eplbd's staging is allocated by the client. log_stats:
    # vLLM's balancedness log costs an all-reduce; eplbd-ctl status shows beta.
    if is_profile:  # not a serving step: drop its counts, do not advance the sync schedule
        for ms in self.model_states.values():
            ms.expert_load_pass.zero_()
        return
    for b in bridges(self).values():
        b.step(is_dummy)


def _rearrange(
    self: Any, is_profile: bool = False, rank_mapping: Any = None, use_last_expert_load: bool = False
) -> None:
    self.__dict__["_eplbd_rearrange_blocked"] = self.__dict__.get("_eplbd_rearrange_blocked", 0) + 1
    if not is_profile:
        log.warning("eplbd-vllm: EplbState.rearrange called while eplbd balances; ignored")
    return None


def _start_async_loop(self: Any, rank_mapping: Any = None, is_profile: bool = False) -> None:
    return None


_PATCHES = {
    "add_model": _add_model,
    "step": _step,
    "rearrange": _rearrange,
    "start_async_loop": _start_async_loop,
}


def installed() -> bool:
    return bool(_originals)


def install(settings: PluginSettings, client_config: Any = None) -> None:
    """Patch ``EplbState`` at class level (idempotent; the first settings win).

    ``client_config``: an ``eplbd_client.ClientConfig`` (default: from ``EPLBD_CLIENT_*``)."""
    global _settings, _client_config
    from vllm.distributed.eplb.eplb_state import EplbState

    with _lock:
        if _originals:
            return
        if client_config is None:
            from eplbd_client import ClientConfig

            client_config = ClientConfig.from_env()
        _settings = settings
        _client_config = client_config
        for name, fn in _PATCHES.items():
            orig = getattr(EplbState, name)
            _originals[name] = orig
            setattr(EplbState, name, fn)
        atexit.register(_close_all)


def uninstall() -> None:
    """Restore vLLM's methods and close every client (tests; vLLM itself never needs it)."""
    global _settings, _client_config, _eplb_group_taken
    from vllm.distributed.eplb.eplb_state import EplbState

    with _lock:
        _close_all()
        _eplb_group_taken = False
        for name, orig in _originals.items():
            setattr(EplbState, name, orig)
        _originals.clear()
        _settings = _client_config = None


def _close_all() -> None:
    while _all_bridges:
        b = _all_bridges.pop()
        try:
            b.close()
        except Exception as e:  # shutdown must not fail on a closed group
            log.warning("eplbd-vllm: closing client of %s: %s", b.domain, e)
