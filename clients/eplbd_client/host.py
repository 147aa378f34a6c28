"""The engine-neutral seam between the client and an inference engine.

An engine (the in-repo test model, vLLM, an Ascend runtime) implements
:class:`ExpertHost`; the client never touches anything else of the engine.
Geometry names follow DESIGN.md: L MoE layers, E logical experts, R ranks,
S local slots per rank, P = R*S physical slots, K = max replicas per expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["ExpertHost"]


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
    - ``commit_layer(layer, phy2log_row, log2phy, replica_count)`` switches the
      routing tables of one layer, after the client copied the layer's new
      experts into their slots. Arrays are host numpy int32:
      ``phy2log_row`` [P] (logical expert of every physical slot),
      ``log2phy`` [E, K] (the replicas' physical slots, -1 padded, ascending;
      K = ``Geometry.max_replicas``, pad or slice if the engine's table differs),
      ``replica_count`` [E]. The host must copy them into its own tables in
      place (tables captured by graphs must keep their storage). Called on the
      forward thread, never concurrently with a forward step.
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

    def commit_layer(
        self, layer: int, phy2log_row: np.ndarray, log2phy: np.ndarray, replica_count: np.ndarray
    ) -> None:
        """Switch ``layer``'s routing tables: phy2log_row [P], log2phy [E, K], replica_count [E] (int32)."""
        ...
