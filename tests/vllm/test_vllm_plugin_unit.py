"""The plugin's parts that need no vLLM: settings, inertness, the in-place commit, hooks.

Runs under any interpreter with torch (the main suite included).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eplbd.placement import log2phy_padded, replica_count  # noqa: E402
from eplbd_client.host import LayerTables  # noqa: E402
from eplbd_vllm.hooks import (  # noqa: E402
    LayerCommit,
    register_routing_table_hook,
    routing_table_hooks,
    unregister_routing_table_hook,
)
from eplbd_vllm.host import VllmExpertHost  # noqa: E402
from eplbd_vllm.settings import PluginConfigError, enabled, model_tag, read_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "clients" / "vllm"), str(REPO), e.get("PYTHONPATH", "")])
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=60)


def test_settings_defaults_and_domain_name() -> None:
    s = read_settings({})
    assert (s.shm_prefix, s.job, s.domain) == ("eplbd.", None, None)
    assert s.domain_name("vllm123", "DeepSeek-V3") == "eplbd.vllm123.DeepSeek-V3"
    s = read_settings(
        {
            "EPLBD_SHM_PREFIX": "t1.",
            "EPLBD_JOB": "j-1",
            "EPLBD_DOMAIN": "{prefix}x.{job}.{model}.n{node}",
        }
    )
    assert s.job == "j-1"
    # {node} is left for the client, which formats it with the rank's node id.
    assert s.domain_name("j-1", "m") == "t1.x.j-1.m.n{node}"


@pytest.mark.parametrize(
    "var,value",
    [
        ("EPLBD_SHM_PREFIX", "a/b"),
        ("EPLBD_JOB", "my job"),
    ],
)
def test_bad_setting_names_its_variable(var: str, value: str) -> None:
    with pytest.raises(PluginConfigError) as ei:
        read_settings({var: value})
    assert ei.value.variable == var and var in str(ei.value)


def test_bad_domain_template_names_variable() -> None:
    with pytest.raises(PluginConfigError, match="EPLBD_DOMAIN"):
        read_settings({"EPLBD_DOMAIN": "{nope}"}).domain_name("j", "m")


def test_enabled_and_model_tag() -> None:
    assert not enabled({}) and not enabled({"EPLBD_ENABLE": "0"}) and not enabled({"EPLBD_ENABLE": "no"})
    assert enabled({"EPLBD_ENABLE": "1"}) and enabled({"EPLBD_ENABLE": " True "})
    assert model_tag("deepseek-ai/DeepSeek-V3") == "DeepSeek-V3"
    assert model_tag("/models/Qwen3 30B:A3B/") == "Qwen3_30B_A3B"
    assert model_tag("///") == "model" and len(model_tag("x" * 300)) == 48


def test_import_and_disabled_register_touch_neither_vllm_nor_torch() -> None:
    code = (
        "import sys, eplbd_vllm\n"
        "eplbd_vllm.register()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'eplbd_client'))\n"
        "print('LOADED', bad)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout


@pytest.mark.parametrize(
    "var,value",
    [("EPLBD_SHM_PREFIX", "a/b"), ("EPLBD_CLIENT_MODE", "turbo"), ("EPLBD_CLIENT_SYNC_INTERVALL", "8")],
)
def test_enabled_register_with_bad_setting_fails_naming_it(var: str, value: str) -> None:
    """Checked before vLLM is even imported: a typo stops vLLM at startup, named."""
    r = _run("import eplbd_vllm; eplbd_vllm.register()", EPLBD_ENABLE="1", **{var: value})
    assert r.returncode != 0 and var in r.stderr, r.stderr


# ---------------------------------------------------------------- the in-place commit


def _fake_state(L: int, E: int, R: int, S: int, W: int = 16) -> SimpleNamespace:
    """vLLM-shaped EplbModelState stand-in: maps as vLLM 0.33 builds them (int64, padded to W)."""
    P = R * S
    p2l = (torch.arange(P) % E).repeat(L, 1)
    rc = torch.zeros((L, E), dtype=torch.int64)
    ltp = torch.full((L, E, W), -1, dtype=torch.int64)
    for l in range(L):
        for p in range(P):
            e = int(p2l[l, p])
            ltp[l, e, rc[l, e]] = p
            rc[l, e] += 1
    model = SimpleNamespace(expert_weights=[[torch.zeros(S, 3), torch.zeros(S, 2, 2)] for _ in range(L)])
    return SimpleNamespace(
        physical_to_logical_map=p2l,
        logical_to_physical_map=ltp,
        logical_replica_count=rc,
        expert_load_pass=torch.zeros((L, P), dtype=torch.int32),
        model=model,
        model_name="m",
    )


def test_commit_layer_writes_in_place_and_clears_old_replicas() -> None:
    from eplbd.geometry import Geometry

    g = Geometry(2, 4, 4, 2)  # P = 8: every expert starts with 2 replicas
    g1 = Geometry(1, 4, 4, 2)  # one layer's tables
    ms = _fake_state(2, 4, 4, 2)
    ptrs = [
        t.data_ptr()
        for t in (ms.physical_to_logical_map, ms.logical_to_physical_map, ms.logical_replica_count)
    ]
    views = [ms.logical_to_physical_map[1], ms.logical_replica_count[1]]  # what a vLLM layer holds
    host = VllmExpertHost(ms, g.max_replicas)
    assert host.num_moe_layers == 2 and host.device == torch.device("cpu")
    # Expert 0 gets 4 replicas (one per rank), expert 1 two, the others one each.
    row = np.array([0, 1, 0, 2, 3, 0, 0, 1], dtype=np.int32)
    l2p = log2phy_padded(row[None], g1)[0]
    rc = replica_count(row[None], g1)[0]
    seen: list[LayerCommit] = []
    register_routing_table_hook(seen.append)
    register_routing_table_hook(seen.append)  # once only
    try:
        host.commit_layer(1, LayerTables.build(row, l2p, rc, host.device))
    finally:
        unregister_routing_table_hook(seen.append)
    assert seen and len(seen) == 1 and seen[0].layer == 1 and seen[0].model is ms.model
    assert seen[0].tables is not None and seen[0].tables.phy2log_dev.tolist() == row.tolist()
    assert seen.append not in routing_table_hooks()
    assert [
        t.data_ptr()
        for t in (ms.physical_to_logical_map, ms.logical_to_physical_map, ms.logical_replica_count)
    ] == ptrs
    assert ms.physical_to_logical_map[1].tolist() == row.tolist()
    assert ms.physical_to_logical_map[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # other layer untouched
    assert views[0][0, :5].tolist() == [0, 2, 5, 6, -1] and (views[0][0, 4:] == -1).all()
    assert views[0][1].tolist()[:3] == [1, 7, -1] and views[1].tolist() == [4, 2, 1, 1]
    # Back to 2 replicas each: the columns used by the 4-replica layout must be cleared.
    row2 = np.array([0, 1, 2, 3, 3, 2, 1, 0], dtype=np.int32)
    host.commit_layer(
        1, LayerTables.build(row2, log2phy_padded(row2[None], g1)[0], replica_count(row2[None], g1)[0], 'cpu')
    )
    assert views[0][0, :3].tolist() == [0, 7, -1] and (views[0][:, 2:] == -1).all()
    assert host.commits == 2


def test_host_rejects_maps_too_narrow_and_mixed_layer_shapes() -> None:
    ms = _fake_state(2, 4, 2, 4, W=2)
    with pytest.raises(ValueError, match="room for 2"):
        VllmExpertHost(ms, 3)
    ms = _fake_state(2, 4, 2, 4)
    ms.model.expert_weights[1][0] = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="layer 1"):
        VllmExpertHost(ms, 2)


def test_elastic_ep_is_refused_before_vllm_builds_anything() -> None:
    from eplbd_vllm import bridge

    state = SimpleNamespace(parallel_config=SimpleNamespace(enable_elastic_ep=True), model_states={})
    with pytest.raises(RuntimeError, match="elastic EP"):
        bridge._add_model(state, object(), object())
