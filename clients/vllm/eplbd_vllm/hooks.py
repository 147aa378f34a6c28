"""Extension point: routing tables a platform keeps besides vLLM's EPLB maps.

vLLM's router reads ``logical_to_physical_map`` / ``logical_replica_count``
(and the maps' owner, ``EplbModelState``); eplbd updates those in place. A
platform plugin that routes with tables of its own (vLLM-Ascend keeps per-layer
expert maps for its fused MoE kernels) registers a hook, called once per
committed layer *after* vLLM's maps were switched, on the forward thread,
between two forward steps (never concurrently with one):

.. code-block:: python

    from eplbd_vllm.hooks import LayerCommit, register_routing_table_hook

    @register_routing_table_hook
    def update_ascend_tables(c: LayerCommit) -> None:
        layer = c.model.moe_layers[c.layer]
        # in place (graph-safe), device to device (no host sync on the forward thread)
        layer.my_expert_map[...].copy_(c.tables.phy2log_dev)

A hook may also be declared as an entry point in the group
``eplbd_vllm.routing_tables`` (``name = "pkg.module:function"``); the plugin
loads those when it is enabled, so a platform package needs no code in the
user's launch script. A hook that raises stops the commit with that error:
tables that disagree with the weights would route tokens to wrong experts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from eplbd_client.host import LayerTables

__all__ = [
    "ENTRY_POINT_GROUP",
    "LayerCommit",
    "RoutingTableHook",
    "load_entry_point_hooks",
    "register_routing_table_hook",
    "routing_table_hooks",
    "unregister_routing_table_hook",
]

log = logging.getLogger("eplbd_vllm")

ENTRY_POINT_GROUP = "eplbd_vllm.routing_tables"


@dataclasses.dataclass(frozen=True)
class LayerCommit:
    """One committed MoE layer, as handed to routing-table hooks.

    - ``layer``: MoE layer index (0..L-1, vLLM's ``moe_layer_idx``).
    - ``phy2log_row`` [P] int32: logical expert of every physical slot.
    - ``log2phy`` [E, K] int32: replicas' physical slots, ascending, -1 padded.
    - ``replica_count`` [E] int32.
    - ``model``: vLLM's ``MixtureOfExperts`` model; ``model_state``: its ``EplbModelState``.
    - ``tables``: the same tables already on the device (int64), for in-place
      device-to-device copies (``eplbd_client.host.LayerTables``): a copy from
      the numpy arrays to the device would make the forward thread wait.
    """

    layer: int
    phy2log_row: np.ndarray
    log2phy: np.ndarray
    replica_count: np.ndarray
    model: Any
    model_state: Any
    tables: LayerTables | None = None


RoutingTableHook = Callable[[LayerCommit], None]

_HOOKS: list[RoutingTableHook] = []


def register_routing_table_hook(fn: RoutingTableHook) -> RoutingTableHook:
    """Add ``fn`` (once; usable as a decorator). Hooks run in registration order."""
    if fn not in _HOOKS:
        _HOOKS.append(fn)
    return fn


def unregister_routing_table_hook(fn: RoutingTableHook) -> None:
    if fn in _HOOKS:
        _HOOKS.remove(fn)


def routing_table_hooks() -> tuple[RoutingTableHook, ...]:
    return tuple(_HOOKS)


def load_entry_point_hooks() -> list[str]:
    """Register every hook declared in the ``eplbd_vllm.routing_tables`` entry-point group.

    Returns the names loaded. A hook that cannot be imported is an error (raised):
    running with a platform's tables left stale would misroute tokens.
    """
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            fn = ep.load()
        except Exception as e:
            raise RuntimeError(
                f"eplbd-vllm: cannot load routing-table hook {ep.name} = {ep.value}: {e}"
            ) from e
        register_routing_table_hook(fn)
        names.append(ep.name)
        log.info("eplbd-vllm: routing-table hook %s = %s", ep.name, ep.value)
    return names
