"""``eplbd_client.host.ExpertHost`` over vLLM's ``MixtureOfExperts`` model and ``EplbModelState``.

vLLM (0.33) keeps, per model, in its ``EplbModelState``:

- ``physical_to_logical_map`` [L, P] int64,
- ``logical_to_physical_map`` [L, E, W] int64, -1 padded, W = 1024 (vLLM's
  MAX_EXPERT_REDUNDANCY + 1) whatever the real replica count,
- ``logical_replica_count`` [L, E] int64,

and every MoE layer routes with row views of the last two (handed over by
``MixtureOfExperts.set_eplb_state``). CUDA graphs capture those storages, so a
commit must write into them in place (``copy_``), never rebind an attribute.
The expert weights are ``model.expert_weights[layer]``: a list of tensors with
the local physical slot as leading dimension [S, ...] (1-byte dtypes appear as
uint8 views, which is fine: eplbd moves bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eplbd_client.host import LayerTables

from .hooks import LayerCommit, routing_table_hooks

__all__ = ["VllmExpertHost", "expert_bytes_of"]


def expert_bytes_of(model: Any) -> int:
    """Bytes of one expert of ``model`` (one row of each of its expert tensors)."""
    return int(sum(t[0].numel() * t.element_size() for t in model.expert_weights[0]))


class VllmExpertHost:
    """One EP rank's view of one vLLM MoE model, for the eplbd client.

    ``model_state`` is vLLM's ``EplbModelState`` (duck-typed: only the fields in
    :data:`eplbd_vllm.compat.CONTRACT` are used). ``max_replicas`` is the widest
    log2phy eplbd can commit (the geometry's K); it must fit vLLM's padded map.
    """

    def __init__(self, model_state: Any, max_replicas: int) -> None:
        self.model_state = model_state
        self.model = model_state.model
        ltp = model_state.logical_to_physical_map
        L, E, W = ltp.shape
        if max_replicas > W:
            raise ValueError(
                f"eplbd may give an expert up to {max_replicas} replicas but vLLM's "
                f"logical_to_physical_map has room for {W}"
            )
        self._L, self._E, self._W = L, E, W
        weights = self.model.expert_weights
        if len(weights) != L:
            raise ValueError(f"model.expert_weights has {len(weights)} layers, the EPLB maps {L}")
        ref = [(tuple(t.shape), t.dtype) for t in weights[0]]
        for layer, ws in enumerate(weights):
            got = [(tuple(t.shape), t.dtype) for t in ws]
            if got != ref:
                raise ValueError(f"MoE layer {layer} expert tensors {got} differ from layer 0's {ref}")
        self._device = weights[0][0].device if ref else model_state.physical_to_logical_map.device
        # Columns of logical_to_physical_map[l] that may hold a replica: a commit
        # rewrites [0, max(old, new)) only, not all W (= 1024) columns.
        rc = model_state.logical_replica_count
        self._used = [int(v) for v in rc.max(dim=1).values.cpu().tolist()]
        self.commits = 0

    # ExpertHost ------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self._L

    @property
    def device(self) -> torch.device:
        return self._device

    def expert_weights(self, layer: int) -> Sequence[torch.Tensor]:
        """vLLM's live expert tensors of ``layer``, each [S, ...]."""
        return self.model.expert_weights[layer]

    def commit_layer(self, layer: int, tables: LayerTables) -> None:
        """Switch ``layer`` in vLLM's maps in place, then in any platform tables.

        Device-to-device ``copy_`` / ``fill_`` into vLLM's storages (graph-safe,
        queued on the current stream: no host sync); only the columns of
        ``logical_to_physical_map`` that held or now hold a replica are written.
        """
        ms = self.model_state
        E, K = tables.log2phy.shape
        if E != self._E or K > self._W:
            raise ValueError(
                f"log2phy of shape {tables.log2phy.shape} does not fit vLLM's map [{self._E}, {self._W}]"
            )
        ms.physical_to_logical_map[layer].copy_(tables.phy2log_dev)
        ms.logical_to_physical_map[layer, :, :K].copy_(tables.log2phy_dev)
        if self._used[layer] > K:  # columns a wider table used before
            ms.logical_to_physical_map[layer, :, K : self._used[layer]].fill_(-1)
        ms.logical_replica_count[layer].copy_(tables.replica_count_dev)
        self._used[layer] = K
        self.commits += 1
        hooks = routing_table_hooks()
        if hooks:
            c = LayerCommit(
                layer, tables.phy2log, tables.log2phy, tables.replica_count, self.model, ms, tables
            )
            for fn in hooks:
                fn(c)

    # helpers ---------------------------------------------------------------
    def phy2log(self) -> np.ndarray:
        """vLLM's placement in force [L, P] as int32 (host copy)."""
        return self.model_state.physical_to_logical_map.detach().cpu().numpy().astype(np.int32)
