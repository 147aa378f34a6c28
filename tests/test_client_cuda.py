"""The client on a CUDA device (skipped without one): streams, events, pinned memory.

One GPU means one rank (NCCL will not put two ranks on one GPU), so every move
is a local COPY; what this checks is the stream machinery: the recorder on the
device, the all-gather on a side stream with its copy to pinned host memory,
staging on the transfer stream, commits that wait for it, and release of
staging entries, with NCCL and with a gloo group (weights on the GPU, the
gathered counts hop through host memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from eplbd.geometry import Geometry
from eplbd_client import ClientConfig, EplbClient
from eplbd_client.testing import PlanDriver, TinyMoE, launch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(300),
]

G1 = Geometry(4, 16, 1, 16)


def _checked(fn: Callable[[], object], strict: bool = True) -> str:
    """Run ``fn`` (with CUDA's sync debug mode "error" when ``strict``: any synchronising
    call raises); the RuntimeError it raised, as text, or ""."""
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return ""


def rank_main(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    model = TinyMoE(G1, rank, tokens=64, seed=1, device="cuda", distributed=world > 1)
    mode = spec["mode"]
    cfg = ClientConfig(
        sync_interval=2, mode=mode.split("-")[0], max_staged_experts=32, sync_thread=mode == "async"
    )
    client = EplbClient(model, G1, spec["domain"], config=cfg)
    maxdiff = 0.0
    # With the sync thread, step() -- commits included: expert copies from staging and the
    # routing tables, which the transfer thread moved to the device -- must never wait for
    # the device. CUDA's sync debug mode is process-wide: a synchronising call on the sync
    # or transfer thread in that window raises too (and aborts the plan, which fails below).
    strict = mode == "async"
    commit_synced = ""
    step = 0
    # Phase 1: the model's forward (which itself synchronises: .tolist(), masks) between
    # steps; with the sync thread, each step() inside the sync-debug window.
    for step in range(3000):
        y = model.forward(step, client.record)
        maxdiff = max(maxdiff, float((y - model.reference_forward(step)).abs().max()))
        commit_synced = _checked(client.step, strict)
        if commit_synced:
            break
        done = 1 if strict else 3
        if client.stats.plans_committed >= done and client.active_plan < 0:
            break
    if strict and not commit_synced:
        # Phase 2: no forward, so the window stays open the whole time while plans flow:
        # record + step on the forward thread, the sync thread's all-gathers and decisions,
        # the transfer thread's staging and every commit, until two more plans committed.
        ones = torch.ones(G1.slots_per_rank, dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()

        def plans_flow() -> None:
            for _ in range(20000):
                for layer in range(G1.num_layers):
                    client.record(layer, ones)
                client.step()
                if client.stats.plans_committed >= 3 and client.active_plan < 0:
                    break
                time.sleep(0.001)

        commit_synced = _checked(plans_flow)
        # The model runs the placement those commits made: same outputs as without balancing.
        for k in range(1, 9):
            y = model.forward(step + k)
            maxdiff = max(maxdiff, float((y - model.reference_forward(step + k)).abs().max()))
    res_same = bool(np.array_equal(model.phy2log, client.phy2log))
    mismatches, tables_ok, stats = (
        model.weight_mismatches(),
        model.tables_consistent(),
        dict(vars(client.stats)),
    )
    client.close()
    # Forward-thread cost of record (L device adds) + step on this device, K = 16, no plans,
    # with the sync thread (the forward thread makes no collective call: nothing to subtract).
    client = EplbClient(
        model, G1, spec["domain"] + "b", config=ClientConfig(sync_interval=16), phy2log=model.phy2log
    )
    counts = torch.ones(G1.slots_per_rank, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    per, sync = [], []
    for i in range(1600):
        t0 = time.perf_counter_ns()
        for layer in range(G1.num_layers):
            client.record(layer, counts)
        client.step()
        is_sync = (i + 1) % 16 == 0
        per.append(time.perf_counter_ns() - t0)
        sync.append(is_sync)
        time.sleep(0.0002)
    torch.cuda.synchronize()
    per_a, sync_a = np.array(per[160:]), np.array(sync[160:])
    # The forward thread must never wait for the device: with CUDA's sync debug mode set to
    # "error", any synchronising call inside record/step raises (with gloo too: the hop of
    # the counts through host memory is the sync thread's, which only polls its events).
    def record_and_step() -> None:
        for _ in range(64):
            for layer in range(G1.num_layers):
                client.record(layer, counts)
            client.step()

    synced = _checked(record_and_step)
    out = {
        "maxdiff": maxdiff,
        "mismatches": mismatches,
        "tables_ok": tables_ok,
        "stats": stats,
        "same": res_same,
        "overhead_us_p50_p99": (float(np.percentile(per_a, 50)) / 1e3, float(np.percentile(per_a, 99)) / 1e3),
        "sync_overhead_us_p50": float(np.percentile(per_a[sync_a], 50)) / 1e3,
        "synced": synced,
        "commit_synced": commit_synced,
    }
    client.close()
    return out


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
@pytest.mark.parametrize("mode", ["async", "async-inline", "stw"])
def test_cuda_single_rank_plans_exact(shm_prefix: str, backend: str, mode: str) -> None:
    name = shm_prefix + "cuda"
    driver = PlanDriver(name, G1, plans=3, source="random", seed=2, timeout=200)
    res = launch(
        rank_main,
        1,
        {"domain": name, "mode": mode, "backend": backend},
        timeout=240,
        backend=backend,
        on_started=driver.run,
        # Not fork: this process called torch.cuda.is_available() (pytestmark), which
        # poisons fork for CUDA (the child's first CUDA call raises).
        start_method="spawn",
    )[0]
    driver.stop()
    assert driver.error is None, driver.error
    print(
        f"{backend}/{mode}: record+step overhead (K=16, L=4) p50/p99 us {res['overhead_us_p50_p99']}, "
        f"sync steps p50 {res['sync_overhead_us_p50']:.1f} us"
    )
    assert res["commit_synced"] == "", f"step() raised in the sync-debug window: {res['commit_synced']}"
    assert res["stats"]["plans_committed"] >= 3 and res["stats"]["plans_aborted"] == 0, res["stats"]
    assert res["mismatches"] == [] and res["tables_ok"] and res["same"]
    assert res["maxdiff"] < 1e-4
    assert res["synced"] == "", f"record/step synchronised with the device: {res['synced']}"
