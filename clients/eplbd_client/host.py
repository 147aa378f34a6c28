"""The engine-neutral seam between the client and an inference engine.

An engine (the in-repo test model, vLLM, an Ascend runtime) implements
:class:`ExpertHost`; the client never touches anything else of the engine.
Geometry names follow DESIGN.md: L MoE layers, E logical experts, R ranks,
S local slots per rank, P = R*S physical slots, K = max replicas per expert.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .device import DeviceOps

__all__ = ["ExpertHost", "LayerTables", "check_host"]


@dataclasses.dataclass(frozen=True)
class LayerTables:
    """One layer's routing tables after a commit, on the host and already on the device.

    Host copies (numpy int32): ``phy2log`` [P] (logical expert of every physical
    slot), ``log2phy`` [E, K] (the replicas' physical slots, ascending, -1 padded;
    K = ``Geometry.max_replicas``), ``replica_count`` [E]. The same tables as
    int64 tensors on the host's device: ``phy2log_dev``, ``log2phy_dev``,
    ``replica_count_dev``. The client moves them there off the forward thread
    (its transfer thread, on its own stream, before the commit), so a host's
    commit is device-to-device ``copy_`` calls: queued, with no host sync, where
    a copy from host memory would make the forward thread wait for its stream.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    replica_count: np.ndarray
    phy2log_dev: torch.Tensor
    log2phy_dev: torch.Tensor
    replica_count_dev: torch.Tensor

    @classmethod
    def build(
        cls,
        phy2log: np.ndarray,
        log2phy: np.ndarray,
        replica_count: np.ndarray,
        device: DeviceOps | torch.device | str,
    ) -> LayerTables:
        """Tables from host arrays, copied to ``device`` on its current stream
        (:meth:`DeviceOps.to_device`: pinned and non-blocking where the device has streams)."""
        dev = device if isinstance(device, DeviceOps) else DeviceOps(device)
        h = [np.ascontiguousarray(a, dtype=np.int32) for a in (phy2log, log2phy, replica_count)]
        d = [dev.to_device(a) for a in h]
        return cls(h[0], h[1], h[2], d[0], d[1], d[2])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.phy2log_dev, self.log2phy_dev, self.replica_count_dev


@runtime_checkable
class ExpertHost(Protocol):
    """What the client needs from the model on one EP rank.

    Contract:

    - ``expert_weights(layer)`` returns the *live* expert tensors of MoE layer
      ``layer`` (for example ``[w13, w2]``), each shaped ``[S, ...]`` with the
      local slot as leading dimension, contiguous along that dimension. The
      client reads them (to send experts) from its transfer thread and writes
      rows of them in place (``t[s].copy_(...)``) only from the forward thread,
      inside :meth:`commit_layer`'s caller, between two forward steps. Every MoE
      layer must return tensors of the same shapes and dtypes (the staging pool
      is shared between layers).
    - ``commit_layer(layer, tables)`` switches the routing tables of one layer
      (:class:`LayerTables`), after the client copied the layer's new experts
      into their slots. The host copies the device tensors into its own tables
      in place (``copy_``: tables captured by graphs must keep their storage;
      pad or slice if the engine's log2phy is wider or narrower than K) and
      must not copy from host memory to the device there (that waits for the
      stream); the numpy copies are for host-side bookkeeping. Called on the
      forward thread, with the forward stream current and already ordered
      after the tables' copies, never concurrently with a forward step.
    - ``device``: where the expert weights (and the load accumulator) live.
    """

    @property
    def num_moe_layers(self) -> int:
        """L, the number of MoE layers (index 0..L-1 in every call)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the expert weights; the recorder accumulates there."""
        ...

    def expert_weights(self, layer: int) -> Sequence[torch.Tensor]:
        """Live expert tensors of ``layer``, each [S, ...]; updated in place by the client."""
        ...

    def commit_layer(self, layer: int, tables: LayerTables) -> None:
        """Switch ``layer``'s routing tables to ``tables`` (in place, device-to-device)."""
        ...


def check_host(host: object) -> None:
    """Raise TypeError naming what ``host`` lacks of :class:`ExpertHost`.

    Checked once, when the client is made: a mistake found at the first commit would
    leave a layer's new weights in place under its old routing tables."""
    members = ("num_moe_layers", "device", "expert_weights", "commit_layer")
    missing = [m for m in members if not hasattr(host, m)]
    if missing:
        raise TypeError(f"{type(host).__name__} is not an ExpertHost: it has no {', '.join(missing)}")
    try:
        inspect.signature(host.commit_layer).bind(0, None)  # type: ignore[attr-defined]
    except TypeError:
        sig = inspect.signature(host.commit_layer)  # type: ignore[attr-defined]
        raise TypeError(
            f"{type(host).__name__}.commit_layer{sig} must take (layer, tables): the routing "
            "tables come as one eplbd_client.host.LayerTables (host and device copies)"
        ) from None
    except ValueError:  # no signature (a builtin): trust it
        pass
