"""CUDA-graph safety of the plugin's commit (needs a CUDA device; skipped elsewhere).

vLLM captures its routing in CUDA graphs, reading ``logical_to_physical_map`` and
``logical_replica_count`` (and the expert weights) by address. This captures a
graph that routes exactly like vLLM's EPLB kernel (replica = Knuth hash of the
token index mod replica count, physical id from the padded map) and gathers one
weight row per routed slot, commits new placements with
``VllmExpertHost.commit_layer`` and in-place weight copies, and replays the *same*
graph: it must route with the new tables and read the new weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")

from eplbd.geometry import Geometry  # noqa: E402
from eplbd.placement import default_phy2log, log2phy_padded, replica_count  # noqa: E402
from eplbd.policy import rebalance  # noqa: E402
from eplbd_client.host import LayerTables  # noqa: E402
from eplbd_vllm.host import VllmExpertHost  # noqa: E402

KNUTH = 2654435769


@contextlib.contextmanager
def _sync_debug_error() -> Iterator[None]:
    """Any synchronising CUDA call inside raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)

L, E, R, S, W = 2, 8, 4, 3, 1024  # W: vLLM pads the replica dimension to 1024
P = R * S


def _vllm_maps(p2l: np.ndarray, g: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps as vLLM 0.33 lays them out: int64, log2phy padded to W columns with -1."""
    l2p = np.full((g.num_layers, g.num_experts, W), -1, dtype=np.int64)
    l2p[..., : g.max_replicas] = log2phy_padded(p2l, g)
    return (
        torch.from_numpy(p2l.astype(np.int64)).cuda(),
        torch.from_numpy(l2p).cuda(),
        torch.from_numpy(replica_count(p2l, g).astype(np.int64)).cuda(),
    )


def _route_reference(topk: np.ndarray, p2l_row: np.ndarray, g1: Geometry) -> np.ndarray:
    l2p = log2phy_padded(p2l_row[None], g1)[0]
    rc = replica_count(p2l_row[None], g1)[0]
    tok = np.arange(topk.shape[0])[:, None]
    rep = ((tok * KNUTH) & 0xFFFFFFFF) % rc[topk]
    return l2p[topk, rep]


def test_commit_reaches_a_captured_cuda_graph() -> None:
    g, g1 = Geometry(L, E, R, S), Geometry(1, E, R, S)
    p2l0 = default_phy2log(g)
    ptl, ltp, rc = _vllm_maps(p2l0, g)
    # Weights of all P slots on one device (row p = the expert in slot p, value = expert id).
    w = torch.from_numpy(p2l0[0].astype(np.float32)).cuda()[:, None].repeat(1, 16).contiguous()
    model = type("M", (), {})()
    model.expert_weights = [[w[r * S : (r + 1) * S] for r in range(1)] for _ in range(L)]  # rank 0's rows
    ms = type("MS", (), {})()
    ms.physical_to_logical_map, ms.logical_to_physical_map, ms.logical_replica_count = ptl, ltp, rc
    ms.model = model
    host = VllmExpertHost(ms, g.max_replicas)
    assert host.device.type == "cuda"

    rng = np.random.default_rng(0)
    topk_np = rng.integers(0, E, size=(64, 2))
    topk = torch.from_numpy(topk_np).cuda()
    tok = torch.arange(64, device="cuda")[:, None]
    phys = torch.empty_like(topk)
    rows = torch.empty((64, 2, 16), device="cuda")
    layer = 1
    ltp_l, rc_l = ltp[layer], rc[layer]  # the row views a vLLM layer holds

    def route() -> None:
        rep = ((tok * KNUTH) & 0xFFFFFFFF) % rc_l[topk].clamp(min=1)
        phys.copy_(ltp_l[topk, rep])
        rows.copy_(w[phys])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        route()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        route()
    graph.replay()
    torch.cuda.synchronize()
    assert np.array_equal(phys.cpu().numpy(), _route_reference(topk_np, p2l0[layer], g1))

    ptrs = [t.data_ptr() for t in (ptl, ltp, rc, w)]
    for seed in range(3):
        # A new placement for the layer: eplbd's policy on random skewed loads.
        loads = np.random.default_rng(seed + 1).zipf(1.5, size=(1, E)).astype(np.int64) * 100
        row = rebalance(loads, host.phy2log()[layer][None], g1, policy="greedy")[0]
        row = row.astype(np.int32)
        # Weights first (the client does this), then the tables: both in place.
        w.copy_(torch.from_numpy(row.astype(np.float32)).cuda()[:, None].expand(P, 16))
        tables = LayerTables.build(
            row, log2phy_padded(row[None], g1)[0], replica_count(row[None], g1)[0], host.device
        )
        torch.cuda.synchronize()
        with _sync_debug_error():  # the commit itself is device-to-device: no host sync
            host.commit_layer(layer, tables)
        graph.replay()
        torch.cuda.synchronize()
        want = _route_reference(topk_np, row, g1)
        assert np.array_equal(phys.cpu().numpy(), want), seed
        assert torch.equal(rows[..., 0].cpu(), torch.from_numpy(row[want].astype(np.float32)))
        assert [t.data_ptr() for t in (ptl, ltp, rc, w)] == ptrs
        assert (ltp[layer, :, g.max_replicas :] == -1).all()
