"""vLLM's real EplbState + a MixtureOfExperts model on 4 gloo ranks + a live eplbd daemon.

The plugin is loaded the way vLLM loads it (``vllm.plugins.load_general_plugins``
with ``EPLBD_ENABLE=1``); vLLM's parallel state is set up by vLLM's own
``init_distributed_environment`` / ``initialize_model_parallel`` on gloo, and the
model is registered by vLLM's ``EplbState.add_model``. Then, step by step:

- outputs equal the unbalanced model's, exactly (including while plans commit);
- vLLM's maps always equal what vLLM itself derives from the placement in force
  (``compute_logical_maps``, padded), keep their storage (in-place commits) and
  are the very tensors the layers route with;
- every window the daemon receives equals the true logical loads of the real
  (non-dummy) tokens of all ranks: vLLM's [L, P] counts were reduce-scattered
  into each rank's [L, S] and mapped back correctly;
- at the end every slot holds its logical expert's weights, and vLLM's own
  rearrangement machinery (EplbState.rearrange, the policy, the weight shuffle,
  the map commit, the async worker) was never called — although vLLM's config
  asks it to rearrange every 6 steps, asynchronously.

Platform shims, test-side only: ``VLLM_TARGET_DEVICE=cpu`` (vllm_env.py), EPLB
switched on after vLLM's config validation (it refuses CPU), a ModelConfig
stand-in with ``compute_hash``/``model``, and the model's CPU routing stand-in
(vllm_tiny_moe.py).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vllm_env import VLLM_SKIP_REASON

pytestmark = [
    pytest.mark.skipif(VLLM_SKIP_REASON is not None, reason=VLLM_SKIP_REASON or ""),
    pytest.mark.timeout(300),
]

REPO = Path(__file__).resolve().parents[2]
WORLD, L, E, S = 4, 3, 8, 3  # P = 12: 4 redundant slots
K = 2  # EPLBD_CLIENT_SYNC_INTERVAL
T = 12  # tokens per rank per step
MAX_STEPS = 600
WANT_COMMITS = 3


# (model name, MoE layers, weight seed): a main model, and a drafter as vLLM's MTP has.
MODELS = {
    1: [("tiny-org/Tiny-MoE", L, 0)],
    2: [("tiny-org/Tiny-MoE", L, 0), ("Tiny-MoE-draft", 2, 7)],
}


class _ModelConfig:
    """Stand-in for vllm.config.ModelConfig: EplbState.add_model reads only these two."""

    def __init__(self, model: str) -> None:
        self.model = model

    def compute_hash(self) -> str:
        return "hash-" + self.model


def _spy(counter: dict[str, int], name: str, fn: Any) -> Any:
    @functools.wraps(fn)  # keeps the signature: the plugin's compat check inspects it
    def wrapped(*a: Any, **kw: Any) -> Any:
        counter[name] = counter.get(name, 0) + 1
        return fn(*a, **kw)

    return wrapped


def _tokens(step: int, rank: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(step * 1009 + rank)
    return torch.randint(-2, 3, (T, 6), generator=g).double()


def rank_main(rank: int, port: int, env: dict[str, str], n_models: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    os.environ.update(env)
    import vllm.plugins
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.config.parallel import EPLBConfig
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.eplb import eplb_state as es
    from vllm.distributed.eplb.policy import DefaultEplbPolicy
    from vllm_tiny_moe import TinyVllmMoE

    from eplbd.shm import Domain
    from eplbd_vllm.bridge import bridges, uninstall

    # Spies on vLLM's own rearrangement path, installed *before* the plugin so
    # that the plugin's saved "originals" are spies too.
    calls: dict[str, int] = {}
    es.EplbState.rearrange = _spy(calls, "EplbState.rearrange", es.EplbState.rearrange)
    es.EplbState.start_async_loop = _spy(calls, "EplbState.start_async_loop", es.EplbState.start_async_loop)
    es.rearrange_expert_weights_inplace = _spy(
        calls, "rearrange_expert_weights_inplace", es.rearrange_expert_weights_inplace
    )
    es._commit_eplb_maps = _spy(calls, "_commit_eplb_maps", es._commit_eplb_maps)
    es._move_to_workspace = _spy(calls, "_move_to_workspace", es._move_to_workspace)
    es.start_async_worker = _spy(calls, "start_async_worker", es.start_async_worker)
    DefaultEplbPolicy.rebalance_experts = classmethod(
        _spy(calls, "DefaultEplbPolicy.rebalance_experts", DefaultEplbPolicy.rebalance_experts.__func__)
    )

    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()  # -> eplbd_vllm.register()

    pc = ParallelConfig(
        tensor_parallel_size=WORLD,
        enable_expert_parallel=True,
        # vLLM would rearrange every 6 steps, asynchronously: the plugin must prevent both.
        eplb_config=EPLBConfig(window_size=4, step_interval=6, use_async=True, communicator="torch_gloo"),
    )
    vc = VllmConfig(parallel_config=pc)
    pc = vc.parallel_config
    pc.enable_eplb = True  # shim: vLLM's validator allows EPLB on CUDA/ROCm/XPU only
    pc.eplb_config.num_redundant_experts = WORLD * S - E
    out: dict[str, Any] = {"rank": rank}
    with set_current_vllm_config(vc):
        ps.init_distributed_environment(
            world_size=WORLD,
            rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=rank,
            backend="gloo",
        )
        ps.initialize_model_parallel(tensor_model_parallel_size=WORLD, backend="gloo")
        group = ps.get_ep_group().device_group
        state = es.EplbState(pc, torch.device("cpu"))
        tracks: list[dict[str, Any]] = []
        for i, (name, layers, seed) in enumerate(MODELS[n_models]):
            model = TinyVllmMoE(layers, E, WORLD, S, rank, seed=seed)
            # vLLM registers a drafter with an explicit model_name, the main model without.
            state.add_model(model, _ModelConfig(name), model_name=name if i else None)
            tracks.append({"model": model, "L": layers, "ms": state.model_states["hash-" + name]})
        if state.is_async:  # the runner starts vLLM's worker thread when this is set
            state.start_async_loop()
        table = bridges(state)
        for tr in tracks:
            ms = tr["ms"]
            (tr["bridge"],) = [b for b in table.values() if b.model_state is ms]
            tr["client"] = tr["bridge"].client
            tr["maps"] = (ms.physical_to_logical_map, ms.logical_to_physical_map, ms.logical_replica_count)
            tr["ptrs"] = [t.data_ptr() for t in tr["maps"]]
            tr["p2l0"] = tr["client"].phy2log.copy()
            tr["expected"] = np.zeros((MAX_STEPS // K + 1, tr["L"], E), dtype=np.int64)
            tr["model"](_tokens(10**6, rank), True, group)  # vLLM's profile run: a dummy forward records...
        state.step(is_dummy=True, is_profile=True)  # ...then no rearrangement, no sync, counts dropped
        for tr in tracks:
            assert not tr["ms"].expert_load_pass.any()
            assert np.array_equal(tr["p2l0"], tr["ms"].physical_to_logical_map.numpy())

        exact = dummies = 0
        t0 = time.perf_counter()
        step = 0
        want = WANT_COMMITS if n_models == 1 else 2
        for step in range(MAX_STEPS):  # noqa: B007 - used after the loop
            dummy = step % 7 == rank  # an idle DP rank runs a dummy batch; its counts must not count
            x = _tokens(step, rank)
            for tr in tracks:
                model = tr["model"]
                model.set_hot(step)
                y = model(x, True, group)
                if not dummy:
                    ref = model.reference(x)
                    assert torch.equal(y, ref), f"step {step}: max diff {(y - ref).abs().max()}"
                    exact += 1
                    for i, layer in enumerate(model.layers):
                        tr["expected"][step // K, i] += np.bincount(
                            layer.last_topk.reshape(-1).numpy(), minlength=E
                        )
            dummies += dummy
            state.step(is_dummy=dummy, log_stats=True)
            assert bool(state.should_record_tensor)  # vLLM would switch recording off between windows
            for tr in tracks:
                ms, client = tr["ms"], tr["client"]
                # vLLM's maps: in place, equal to vLLM's own derivation from the placement in force.
                assert [t.data_ptr() for t in tr["maps"]] == tr["ptrs"]
                assert np.array_equal(ms.physical_to_logical_map.numpy(), client.phy2log)
                ltp, rc = es.compute_logical_maps(ms.physical_to_logical_map.clone(), E)
                assert torch.equal(ms.logical_replica_count, rc)
                assert torch.equal(ms.logical_to_physical_map[..., : ltp.shape[-1]], ltp)
                assert (ms.logical_to_physical_map[..., ltp.shape[-1] :] == -1).all()
                for i, layer in enumerate(tr["model"].layers):
                    assert (
                        layer.eplb_state.logical_to_physical_map.data_ptr()
                        == ms.logical_to_physical_map[i].data_ptr()
                    )
            if all(t["client"].stats.plans_committed >= want and t["client"].active_plan < 0 for t in tracks):
                break
        out["seconds"] = time.perf_counter() - t0
        out.update(steps=step + 1, exact=exact, dummies=dummies, is_async=state.is_async)
        out["models"] = []
        for tr in tracks:
            client, bridge = tr["client"], tr["bridge"]
            res = {
                "mismatches": tr["model"].slot_mismatches(client.phy2log),
                "phy2log": client.phy2log.copy(),
                "moved": int((client.phy2log != tr["p2l0"]).sum()),
                "stats": {k: v for k, v in vars(client.stats).items() if k != "history"},
                "history": list(client.stats.history),
                "bytes_per_sync": bridge.bytes_per_sync(),
                "domain": client.domain_name,
                "L": tr["L"],
            }
            # The windows the daemon was given vs the true loads of all ranks' real tokens.
            exp_t = torch.from_numpy(tr["expected"])
            torch.distributed.all_reduce(exp_t, group=group)
            if rank == 0:
                dom = Domain.attach(client.domain_name)
                deadline = time.monotonic() + 10
                want_last = bridge.syncs - 2  # the last gathered window is published at the next sync
                while dom.latest_window_id() < want_last and time.monotonic() < deadline:
                    time.sleep(0.01)
                wins = dom.read_windows(64)
                res["windows_checked"] = len(wins)
                res["window_mismatch"] = [
                    w.window_id for w in wins if not np.array_equal(w.loads, exp_t[w.window_id].numpy())
                ]
                res["window_steps_ok"] = all(
                    (w.step_begin, w.step_end) == (w.window_id * K, (w.window_id + 1) * K) for w in wins
                )
                dom.close()
            out["models"].append(res)
        if rank == 0:
            st = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from eplbd.ctl import main; sys.exit(main(sys.argv[1:]))",
                    "status",
                    "--prefix",
                    env["EPLBD_SHM_PREFIX"],
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            out["ctl_status"] = st.stdout + st.stderr
        torch.distributed.barrier(group=group)
        uninstall()  # closes the client (the leader unlinks the domain)
    out["calls"] = calls
    return out


def _child(rank: int, port: int, env: dict[str, str], n_models: int, q: Any, hang_s: float) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(hang_s, exit=True)  # a hang shows where, in the test output
    try:
        q.put((rank, True, rank_main(rank, port, env, n_models)))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()  # the queue's feeder thread must flush before the hard exit
        os._exit(0)  # skip atexit/finalizers inherited from the forked test process


def _launch(env: dict[str, str], n_models: int, timeout: float) -> list[dict[str, Any]]:
    from eplbd_client.testing import free_port

    ctx = mp.get_context("fork")  # vLLM is already imported here: fork saves ~10 s per rank
    q = ctx.Queue()
    port = free_port()
    hang_s = timeout - 15
    procs = [
        ctx.Process(target=_child, args=(r, port, env, n_models, q, hang_s), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < WORLD and time.monotonic() < deadline:
            try:
                rank, ok, res = q.get(timeout=1.0)
            except queue.Empty:
                if errors:
                    deadline = min(deadline, time.monotonic() + 10)
                continue
            (results.__setitem__(rank, res) if ok else errors.append(f"rank {rank}:\n{res}"))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(2)
    if errors or len(results) < WORLD:
        raise RuntimeError("\n".join(errors) or f"only {len(results)} of {WORLD} ranks finished")
    return [results[r] for r in range(WORLD)]


def _start_daemon(tmp: Path, prefix: str) -> tuple[subprocess.Popen[bytes], Path]:
    conf = tmp / "eplbd.toml"
    conf.write_text(
        f'shm_prefix = "{prefix}"\nnum_iterations = 8\nhistory_windows = 4\nmin_gain = 0.01\n'
        "poll_interval_s = 0.02\ndiscovery_interval_s = 0.05\nheartbeat_interval_s = 0.2\n"
        "owner_grace_s = 1.0\n"
    )
    log = tmp / "eplbd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPLBD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eplbd.cli", "run", "--config", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=env,
            cwd=REPO,
        )
    return proc, log


@pytest.mark.parametrize("n_models", [1, 2], ids=["model", "model+drafter"])
def test_vllm_eplb_state_balanced_by_live_daemon(shm_prefix: str, tmp_path: Path, n_models: int) -> None:
    daemon, log = _start_daemon(tmp_path, shm_prefix)
    env = {
        "EPLBD_ENABLE": "1",
        "EPLBD_SHM_PREFIX": shm_prefix,
        "EPLBD_CLIENT_SYNC_INTERVAL": str(K),
        "EPLBD_CLIENT_MAX_STAGED_EXPERTS": str(WORLD * S),
    }
    try:
        res = _launch(env, n_models, timeout=float(os.environ.get("EPLBD_TEST_TIMEOUT", "240")))
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
    from eplbd_client.control import NUM_WORDS

    r0 = res[0]
    print(f"\n{r0['steps']} steps in {r0['seconds']:.1f} s")
    for m in r0["models"]:
        print(
            f"{m['domain']}: {m['stats']['plans_committed']} plans committed, {m['moved']} slots moved, "
            f"bytes per sync {m['bytes_per_sync']}, {m['windows_checked']} windows checked"
        )
    print(r0["ctl_status"])
    for r in res:
        assert r["calls"] == {}, f"vLLM's own rearrangement ran on rank {r['rank']}: {r['calls']}"
        assert not r["is_async"] and r["exact"] > 0 and r["dummies"] > 0
        for m, m0 in zip(r["models"], r0["models"], strict=True):
            assert m["mismatches"] == [], m["mismatches"]
            assert np.array_equal(m["phy2log"], m0["phy2log"]) and m["history"] == m0["history"]
    tags = [".Tiny-MoE", ".Tiny-MoE-draft"][:n_models]
    for m, tag in zip(r0["models"], tags, strict=True):
        assert m["stats"]["plans_committed"] >= 2, (m["stats"], log.read_text()[-3000:])
        assert m["moved"] > 0
        assert m["windows_checked"] >= 4 and m["window_mismatch"] == [] and m["window_steps_ok"]
        assert m["domain"].startswith(shm_prefix + "vllm") and m["domain"].endswith(tag)
        assert m["domain"] in r0["ctl_status"]
        assert m["bytes_per_sync"] == {
            "reduce_scatter_in": m["L"] * WORLD * S * 8,
            "all_gather_send": (m["L"] * S + NUM_WORDS) * 8,
        }
    assert r0["models"][0]["stats"]["plans_committed"] >= (WANT_COMMITS if n_models == 1 else 2)
