"""A tiny expert-parallel MoE model implementing vLLM's ``MixtureOfExperts`` protocol (CPU, gloo).

It subclasses vLLM's protocol and keeps vLLM's own ``EplbLayerState`` per layer,
so vLLM's default ``MixtureOfExperts.set_eplb_state`` wires it exactly as it wires
a real model: ``expert_weights[l] = layer.get_expert_weights()`` (tensors [S, ...])
and every layer gets row views of ``EplbState``'s maps and load buffer.

On a CUDA build vLLM maps logical to physical ids and records per-slot counts in
a Triton kernel (``eplb_map_to_physical_and_record``); on CPU that function is the
identity. :meth:`TinyMoELayer.route` is the CPU stand-in (the only platform shim
in the model), computing what the kernel computes: replica
``hash(token) % replica_count[e]`` with the kernel's Knuth hash, physical id from
``logical_to_physical_map``, and ``expert_load_view[phys] += 1`` for the rank's own
tokens when ``should_record_tensor`` is set.

Exactness: tokens and expert weights are small integers in float64 and the
combine weights are 1/2, 1/4, so every output is exact whatever the summation
order, and a balanced model's outputs must *equal* the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from vllm.distributed.eplb.eplb_state import EplbLayerState
from vllm.model_executor.models.interfaces import MixtureOfExperts

KNUTH = 2654435769
H, F, TOPK = 6, 4, 2
COMBINE = (0.5, 0.25)


def logical_weights(L: int, E: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth expert weights: w1 [L, E, H, F], w2 [L, E, F, H], small integers (float64)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randint(-2, 3, (L, E, H, F), generator=g).double()
    w2 = torch.randint(-2, 3, (L, E, F, H), generator=g).double()
    return w1, w2


class TinyMoELayer(torch.nn.Module):
    def __init__(self, idx: int, w1: torch.Tensor, w2: torch.Tensor, rank: int, S: int, E: int) -> None:
        super().__init__()
        self.idx, self.rank, self.S, self.E = idx, rank, S, E
        self.eplb_state = EplbLayerState()
        # Initial placement as vLLM builds it: slot p holds p % E.
        slots = [(rank * S + s) % E for s in range(S)]
        self.w1 = torch.nn.Parameter(w1[slots].clone(), requires_grad=False)  # [S, H, F]
        self.w2 = torch.nn.Parameter(w2[slots].clone(), requires_grad=False)  # [S, F, H]
        g = torch.Generator().manual_seed(1000 + idx)
        self.gate = torch.randint(-1, 2, (H, E), generator=g).double()  # replicated router
        self.gate_bias = torch.zeros(E, dtype=torch.float64)
        self.last_topk = torch.zeros((0, TOPK), dtype=torch.int64)

    # what vLLM's FusedMoE offers the protocol -----------------------------
    def get_expert_weights(self) -> list[torch.Tensor]:
        return [self.w1.data, self.w2.data]

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        self.eplb_state.set_layer_state(
            moe_layer_idx, expert_load_view, logical_to_physical_map, logical_replica_count
        )

    # forward -----------------------------------------------------------------
    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Logical top-k experts [T, TOPK]: a fixed integer router plus a drifting hot-expert bias."""
        return (x @ self.gate + self.gate_bias).topk(TOPK, dim=1).indices

    def route(self, topk: torch.Tensor, record: bool) -> torch.Tensor:
        """CPU stand-in of vLLM's eplb_map_to_physical_and_record: logical -> physical [T, TOPK]."""
        st = self.eplb_state
        ltp, rc = st.logical_to_physical_map, st.logical_replica_count
        tok = torch.arange(topk.shape[0], dtype=torch.int64)[:, None].expand_as(topk)
        rep = ((tok * KNUTH) & 0xFFFFFFFF) % rc[topk].clamp(min=1)
        phys = ltp[topk, rep]
        if record and bool(st.should_record_tensor):
            st.expert_load_view.index_add_(
                0, phys.reshape(-1), torch.ones_like(phys.reshape(-1), dtype=torch.int32)
            )
        return phys

    def expert(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return torch.relu(x @ self.w1[slot]) @ self.w2[slot]

    def forward_ep(self, x: torch.Tensor, record: bool, group: Any) -> torch.Tensor:
        """One EP MoE layer: this rank's tokens x [T, H] -> [T, H]. Collective over ``group``."""
        R = dist.get_world_size(group)
        T = x.shape[0]
        self.last_topk = self.select(x)
        phys = self.route(self.last_topk, record)  # each rank maps its own tokens, as in vLLM
        xs = [torch.empty_like(x) for _ in range(R)]
        ps = [torch.empty_like(phys) for _ in range(R)]
        dist.all_gather(xs, x, group=group)
        dist.all_gather(ps, phys, group=group)
        X, PH = torch.cat(xs), torch.cat(ps)  # every rank's tokens and their physical slots
        out = torch.zeros_like(X)
        lo = self.rank * self.S
        for k in range(TOPK):
            for s in range(self.S):
                sel = (PH[:, k] == lo + s).nonzero().view(-1)
                if sel.numel():
                    out[sel] += COMBINE[k] * self.expert(X[sel], s)
        dist.all_reduce(out, group=group)
        return out[self.rank * T : (self.rank + 1) * T]


class TinyVllmMoE(torch.nn.Module, MixtureOfExperts):
    """L MoE layers, E logical experts, R ranks x S local slots; residual between layers."""

    def __init__(self, L: int, E: int, R: int, S: int, rank: int, seed: int = 0) -> None:
        torch.nn.Module.__init__(self)
        self.w1_log, self.w2_log = logical_weights(L, E, seed)
        self.layers = torch.nn.ModuleList(
            [TinyMoELayer(i, self.w1_log[i], self.w2_log[i], rank, S, E) for i in range(L)]
        )
        self.rank = rank
        # MixtureOfExperts protocol attributes
        self.expert_weights: list[list[torch.Tensor]] = []
        self.num_moe_layers = L
        self.num_expert_groups = 1
        self.num_logical_experts = E
        self.num_physical_experts = R * S
        self.num_local_physical_experts = S
        self.num_routed_experts = E
        self.num_shared_experts = 0
        self.num_redundant_experts = R * S - E
        self.moe_layers = list(self.layers)

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        raise NotImplementedError("elastic EP is not part of this test")

    def set_hot(self, step: int) -> None:
        """Hot experts drift every 40 steps, differently per layer: there is always work for eplbd."""
        for i, layer in enumerate(self.layers):
            layer.gate_bias.zero_()
            hot = [(step // 40 + 3 * i + j) % layer.E for j in range(2)]
            layer.gate_bias[hot] = 6.0

    def forward(self, x: torch.Tensor, record: bool, group: Any) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer.forward_ep(x, record, group)
        return x

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The unbalanced model on this rank's tokens, from the logical weights (no EP)."""
        for i, layer in enumerate(self.layers):
            top = layer.select(x)
            y = torch.zeros_like(x)
            for k in range(TOPK):
                for e in range(layer.E):
                    sel = (top[:, k] == e).nonzero().view(-1)
                    if sel.numel():
                        y[sel] += COMBINE[k] * (torch.relu(x[sel] @ self.w1_log[i, e]) @ self.w2_log[i, e])
            x = x + y
        return x

    def slot_mismatches(self, phy2log: Any) -> list[tuple[int, int]]:
        """(layer, slot) whose weights differ from their logical expert's under ``phy2log`` [L, P]."""
        bad = []
        S = self.num_local_physical_experts
        for i, layer in enumerate(self.layers):
            for s in range(S):
                e = int(phy2log[i][self.rank * S + s])
                if not (
                    torch.equal(layer.w1[s], self.w1_log[i, e])
                    and torch.equal(layer.w2[s], self.w2_log[i, e])
                ):
                    bad.append((i, s))
        return bad
