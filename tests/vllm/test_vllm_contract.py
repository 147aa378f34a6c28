"""Contract tests against the installed vLLM (0.33.0): every attribute, method and
signature the plugin relies on, checked by introspection; then the entry point.

Skipped, with the reason, where vLLM is not importable (the main environment).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_env import VLLM_SKIP_REASON

pytestmark = pytest.mark.skipif(VLLM_SKIP_REASON is not None, reason=VLLM_SKIP_REASON or "")

REPO = Path(__file__).resolve().parents[2]

if VLLM_SKIP_REASON is None:
    import torch
    import vllm
    from vllm.distributed import parallel_state
    from vllm.distributed.eplb import eplb_state
    from vllm.model_executor.models import interfaces

    from eplbd_vllm import compat

    CONTRACT = compat.CONTRACT
else:  # collected for the skip message only
    CONTRACT = ()


def test_installed_vllm_is_the_supported_release() -> None:
    assert vllm.__version__ == "0.33.0"
    assert compat.check_vllm({}) == "0.33.0"


@pytest.mark.parametrize("req", CONTRACT, ids=lambda r: f"{r.kind}:{r.target.split(':')[1]}")
def test_contract_requirement_holds(req: compat.Requirement) -> None:
    assert compat.check_contract((req,)) == []


def test_eplb_state_methods_the_plugin_replaces_exactly() -> None:
    """Defaults too: the replacements are called by vLLM with keywords and positions."""
    S = eplb_state.EplbState
    sig = inspect.signature(S.step)
    assert [(p.name, p.default) for p in list(sig.parameters.values())[1:]] == [
        ("is_dummy", False),
        ("is_profile", False),
        ("log_stats", False),
    ]
    sig = inspect.signature(S.rearrange)
    assert [(p.name, p.default) for p in list(sig.parameters.values())[1:]] == [
        ("is_profile", False),
        ("rank_mapping", None),
        ("use_last_expert_load", False),
    ]
    assert inspect.signature(S.add_model).parameters["model_name"].default is None
    assert inspect.signature(S.start_async_loop).parameters["is_profile"].default is False


def test_model_state_fields_and_layer_state() -> None:
    fields = {f.name: f for f in dataclasses.fields(eplb_state.EplbModelState)}
    for name in (
        "physical_to_logical_map",
        "logical_to_physical_map",
        "logical_replica_count",
        "expert_load_pass",
    ):
        assert fields[name].type in (torch.Tensor, "torch.Tensor"), name
    # Layers keep row views of the maps: the in-place commit reaches them.
    ls = eplb_state.EplbLayerState()
    ltp = torch.full((3, 4, 8), -1)
    rc = torch.ones((3, 4), dtype=torch.int64)
    load = torch.zeros((3, 12), dtype=torch.int32)
    ls.set_layer_state(2, load, ltp, rc)
    ltp[2, 1, 0] = 7
    rc[2].copy_(torch.tensor([1, 2, 3, 4]))
    load[2, 5] += 1
    assert ls.logical_to_physical_map[1, 0] == 7 and ls.logical_replica_count.tolist() == [1, 2, 3, 4]
    assert ls.expert_load_view[5] == 1
    assert {"should_record_tensor", "num_unpadded_tokens_tensors"} <= {
        f.name for f in dataclasses.fields(eplb_state.EplbLayerState)
    }


def test_mixture_of_experts_protocol() -> None:
    MoE = interfaces.MixtureOfExperts
    assert getattr(MoE, "_is_runtime_protocol", False), "MixtureOfExperts must stay runtime-checkable"
    ann = MoE.__annotations__
    for name in (
        "expert_weights",
        "num_moe_layers",
        "num_expert_groups",
        "num_logical_experts",
        "num_physical_experts",
        "num_local_physical_experts",
        "num_redundant_experts",
        "moe_layers",
    ):
        assert name in ann, name
    # The protocol's default set_eplb_state collects layer.get_expert_weights() and
    # hands every layer the maps (our test model relies on the default).
    src = inspect.getsource(MoE.set_eplb_state)
    assert "get_expert_weights" in src and "layer.set_eplb_state(" in src
    assert callable(interfaces.get_mixture_of_experts_model)


def test_parallel_state_accessors() -> None:
    for fn in ("get_ep_group", "get_eplb_group"):
        assert inspect.signature(getattr(parallel_state, fn)).parameters == {}, fn
    init_src = inspect.getsource(parallel_state.GroupCoordinator.__init__)
    for attr in (
        "self.device_group",
        "self.cpu_group",
        "self.rank_in_group",
        "self.world_size",
        "self.ranks",
    ):
        assert attr in init_src, attr


def test_vllm_builds_padded_maps_as_the_plugin_assumes() -> None:
    """add_model pads logical_to_physical_map to MAX_EXPERT_REDUNDANCY + 1 = 1024 columns."""
    src = inspect.getsource(eplb_state.EplbState.add_model)
    assert "MAX_EXPERT_REDUNDANCY = 1023" in src
    assert "max_slots_per_logical_expert" in src


def test_compat_names_a_changed_signature_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def step(self, is_dummy=False, log_stats=False):  # type: ignore[no-untyped-def]  # noqa: ANN001
        pass

    monkeypatch.setattr(eplb_state.EplbState, "step", step)
    with pytest.raises(compat.VllmCompatError) as ei:
        compat.check_vllm({})
    assert "EplbState.step(self, is_dummy, log_stats)" in str(ei.value)
    assert "0.33.x" in str(ei.value)
    monkeypatch.undo()
    monkeypatch.setattr(vllm, "__version__", "0.34.1")
    with pytest.raises(compat.VllmCompatError, match="0.34.1: untested"):
        compat.check_vllm({})
    assert compat.check_vllm({"EPLBD_VLLM_ALLOW_UNTESTED": "1"}) == "0.34.1"


def test_entry_point_loaded_by_vllm_patches_only_when_enabled() -> None:
    """vLLM's own plugin loader finds `eplbd` in vllm.general_plugins: inert, refused on an
    untested version (the error reaches vLLM's startup), then enabled."""
    code = r"""
import os, vllm.plugins as P
from vllm.distributed.eplb.eplb_state import EplbState
orig = EplbState.step
P.load_general_plugins()
assert EplbState.step is orig, "patched although EPLBD_ENABLE is unset"
os.environ["EPLBD_ENABLE"] = "1"
import vllm
from eplbd_vllm.compat import VllmCompatError
vllm.__version__, real = "0.34.0", vllm.__version__
P.plugins_loaded = False
try:
    P.load_general_plugins()
    raise AssertionError("an untested vLLM was accepted")
except VllmCompatError as e:
    assert "0.34.0: untested" in str(e), e
assert EplbState.step is orig, "patched although the version check failed"
vllm.__version__ = real
P.plugins_loaded = False
P.load_general_plugins()
import eplbd_vllm.bridge as B
assert EplbState.step is B._step and EplbState.rearrange is B._rearrange
assert EplbState.start_async_loop is B._start_async_loop and EplbState.add_model is B._add_model
print("ENTRY-POINT-OK")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=REPO
    )
    assert r.returncode == 0 and "ENTRY-POINT-OK" in r.stdout, r.stderr[-3000:]
