"""What the plugin relies on in vLLM, checked by introspection before anything is patched.

:data:`CONTRACT` lists every vLLM module attribute, class, method signature,
dataclass field and protocol member the plugin uses; :func:`check_vllm` resolves
each one in the running vLLM and raises :class:`VllmCompatError` naming every
mismatch (so an upgrade that renames ``EplbState.step``'s arguments fails at
startup with that name, not with a hang at the first rearrangement).

Supported: vLLM 0.33.x (:data:`SUPPORTED_VLLM`; tested against 0.33.0). Another
version is refused unless ``EPLBD_VLLM_ALLOW_UNTESTED=1``, and even then the
contract must hold.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from typing import Any

__all__ = ["CONTRACT", "SUPPORTED_VLLM", "Requirement", "VllmCompatError", "check_contract", "check_vllm"]

SUPPORTED_VLLM: tuple[str, ...] = ("0.33",)
"""vLLM release series (major.minor) this plugin is written and tested for."""

_EPLB = "vllm.distributed.eplb.eplb_state"
_MOE = "vllm.model_executor.models.interfaces"
_PS = "vllm.distributed.parallel_state"
_CFG = "vllm.config.parallel"


class VllmCompatError(RuntimeError):
    """The running vLLM lacks something the plugin relies on; ``mismatches`` lists each."""

    def __init__(self, version: str, mismatches: list[str]) -> None:
        lines = "\n  - ".join(mismatches)
        super().__init__(
            f"eplbd-vllm supports vLLM {', '.join(s + '.x' for s in SUPPORTED_VLLM)}; "
            f"the running vLLM {version} does not match:\n  - {lines}"
        )
        self.version = version
        self.mismatches = mismatches


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One thing the plugin uses: ``target`` is ``module:Qual.name``.

    kind:
      - ``"callable"``: a function/method; ``params`` are its parameter names in order
        (exact: the plugin replaces or calls it with those arguments).
      - ``"class"``: a class must exist.
      - ``"fields"``: dataclass ``target`` has the fields in ``params``.
      - ``"members"``: protocol/class ``target`` declares the members in ``params``
        (annotations or attributes).
      - ``"init_attrs"``: ``target.__init__`` assigns ``self.<name>`` for each name in ``params``.
      - ``"value"``: module attribute equal to ``value``.
    """

    target: str
    kind: str
    params: tuple[str, ...] = ()
    value: Any = None
    why: str = ""


CONTRACT: tuple[Requirement, ...] = (
    Requirement(
        "vllm.plugins:DEFAULT_PLUGINS_GROUP",
        "value",
        value="vllm.general_plugins",
        why="the entry-point group the plugin is registered in",
    ),
    Requirement(f"{_EPLB}:EplbState", "class", why="the state object whose control logic is replaced"),
    Requirement(
        f"{_EPLB}:EplbState.__init__",
        "callable",
        ("self", "parallel_config", "device"),
        why="attributes read: parallel_config, device",
    ),
    Requirement(
        f"{_EPLB}:EplbState.add_model",
        "callable",
        ("self", "model", "model_config", "model_name"),
        why="wrapped: the eplbd client of a model is created after vLLM built its maps",
    ),
    Requirement(
        f"{_EPLB}:EplbState.step",
        "callable",
        ("self", "is_dummy", "is_profile", "log_stats"),
        why="replaced: feeds expert_load_pass to eplbd once per forward step",
    ),
    Requirement(
        f"{_EPLB}:EplbState.rearrange",
        "callable",
        ("self", "is_profile", "rank_mapping", "use_last_expert_load"),
        why="replaced: vLLM's own rearrangement must never run",
    ),
    Requirement(
        f"{_EPLB}:EplbState.start_async_loop",
        "callable",
        ("self", "rank_mapping", "is_profile"),
        why="replaced: vLLM's async EPLB worker thread must never start",
    ),
    Requirement(
        f"{_EPLB}:EplbState",
        "init_attrs",
        ("model_states", "should_record_tensor", "is_async", "parallel_config", "device"),
        why="per-model states, the shared record flag, the async switch",
    ),
    Requirement(
        f"{_EPLB}:EplbModelState",
        "fields",
        (
            "physical_to_logical_map",
            "logical_to_physical_map",
            "logical_replica_count",
            "expert_load_pass",
            "model",
            "model_name",
        ),
        why="the maps eplbd commits into (in place) and the per-slot counts it reads",
    ),
    Requirement(
        f"{_EPLB}:EplbLayerState.set_layer_state",
        "callable",
        ("self", "moe_layer_idx", "expert_load_view", "logical_to_physical_map", "logical_replica_count"),
        why="layers route with row views of the model-state maps: in-place commits reach them",
    ),
    Requirement(
        f"{_MOE}:MixtureOfExperts",
        "members",
        (
            "expert_weights",
            "num_moe_layers",
            "num_expert_groups",
            "num_logical_experts",
            "num_physical_experts",
            "num_local_physical_experts",
            "num_redundant_experts",
            "moe_layers",
            "set_eplb_state",
        ),
        why="geometry and the live expert weights [S, ...] per layer",
    ),
    Requirement(
        f"{_MOE}:MixtureOfExperts.set_eplb_state",
        "callable",
        ("self", "expert_load_view", "logical_to_physical_map", "logical_replica_count"),
        why="how vLLM hands the maps to the layers (views, so in-place updates are seen)",
    ),
    Requirement(
        f"{_PS}:get_ep_group", "callable", (), why="the EP group: counts reduce-scatter, stats gather"
    ),
    Requirement(
        f"{_PS}:get_eplb_group",
        "callable",
        (),
        why="vLLM's separate EPLB group: eplbd's weight transfers (p2p)",
    ),
    Requirement(
        f"{_PS}:GroupCoordinator",
        "init_attrs",
        ("device_group", "cpu_group", "rank_in_group", "world_size", "ranks"),
        why="process groups and rank of the EP / EPLB coordinators",
    ),
    Requirement(
        f"{_CFG}:ParallelConfig",
        "fields",
        ("enable_eplb", "enable_elastic_ep", "eplb_config"),
        why="refuse elastic EP (it resizes slots), read the EPLB config",
    ),
    Requirement(
        f"{_CFG}:EPLBConfig",
        "fields",
        ("use_async", "num_redundant_experts"),
        why="async EPLB is switched off; redundant experts give P - E",
    ),
)


def _resolve(target: str) -> Any:
    mod_name, _, qual = target.partition(":")
    obj: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _check_one(req: Requirement) -> str | None:
    name = req.target.split(":", 1)[1]
    try:
        obj = _resolve(req.target)
    except ImportError as e:
        return f"{req.target}: cannot import ({e})"
    except AttributeError:
        return f"{name}: missing ({req.why})"
    if req.kind == "value":
        return None if obj == req.value else f"{name}: is {obj!r}, expected {req.value!r}"
    if req.kind == "class":
        return None if inspect.isclass(obj) else f"{name}: not a class ({type(obj).__name__})"
    if req.kind == "callable":
        if not callable(obj):
            return f"{name}: not callable"
        try:
            got = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError) as e:
            return f"{name}: no signature ({e})"
        if got != req.params:
            return f"{name}{_fmt(got)}: expected {name}{_fmt(req.params)} ({req.why})"
        return None
    if req.kind == "fields":
        if not dataclasses.is_dataclass(obj):
            return f"{name}: not a dataclass"
        have = {f.name for f in dataclasses.fields(obj)}
        missing = [p for p in req.params if p not in have]
        return f"{name}: missing fields {missing} ({req.why})" if missing else None
    if req.kind == "members":
        ann: set[str] = set()
        for klass in inspect.getmro(obj):
            ann |= set(getattr(klass, "__annotations__", {}))
        missing = [p for p in req.params if p not in ann and not hasattr(obj, p)]
        return f"{name}: missing members {missing} ({req.why})" if missing else None
    if req.kind == "init_attrs":
        try:
            src = inspect.getsource(obj.__init__)
        except (OSError, TypeError) as e:
            return f"{name}.__init__: source unavailable ({e})"
        missing = [p for p in req.params if f"self.{p}" not in src]
        return f"{name}: __init__ sets no {missing} ({req.why})" if missing else None
    raise ValueError(f"unknown requirement kind {req.kind!r}")


def _fmt(params: tuple[str, ...]) -> str:
    return "(" + ", ".join(params) + ")"


def check_contract(contract: tuple[Requirement, ...] = CONTRACT) -> list[str]:
    """Every mismatch between ``contract`` and the importable vLLM, as readable lines (empty: all hold)."""
    out = []
    for req in contract:
        msg = _check_one(req)
        if msg is not None:
            out.append(msg)
    return out


def check_vllm(env: dict[str, str] | None = None) -> str:
    """Check the running vLLM's version and :data:`CONTRACT`; return the version.

    Raises :class:`VllmCompatError` naming the version and each mismatch.
    """
    env = dict(os.environ) if env is None else env
    try:
        import vllm
    except ImportError as e:
        raise VllmCompatError("(not importable)", [f"import vllm failed: {e}"]) from e
    version = str(getattr(vllm, "__version__", "unknown"))
    problems = []
    series = ".".join(version.split(".")[:2])
    if series not in SUPPORTED_VLLM and env.get("EPLBD_VLLM_ALLOW_UNTESTED", "") != "1":
        problems.append(
            f"vllm.__version__ is {version}: untested (set EPLBD_VLLM_ALLOW_UNTESTED=1 to try it; "
            "the contract below is still enforced)"
        )
    problems += check_contract()
    if problems:
        raise VllmCompatError(version, problems)
    return version
