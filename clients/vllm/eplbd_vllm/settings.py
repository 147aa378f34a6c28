"""The plugin's settings, read from ``EPLBD_*`` environment variables (no vLLM import).

Every vLLM process inherits the launching shell's environment, so environment
variables reach the workers without any vLLM flag. Variables:

==============================  =========  ==================================================
variable                        default    meaning
==============================  =========  ==================================================
``EPLBD_ENABLE``                (off)      ``1``/``true``/``yes``/``on`` turns the plugin on;
                                           anything else leaves vLLM untouched
``EPLBD_SYNC_INTERVAL``         16         K: forward steps per stats sync (and per window)
``EPLBD_MODE``                  async      ``async`` (side-thread transfers) or ``stw``
``EPLBD_MAX_STAGED_EXPERTS``    S          staging entries per rank (bounds extra memory)
``EPLBD_PLAN_TIMEOUT_SYNCS``    64         abort a plan with no commit progress for this long
``EPLBD_SHM_PREFIX``            eplbd.     shm name prefix; the daemon reads the same variable
``EPLBD_JOB``                   vllm<pid>  job part of the domain name (pid of EP rank 0)
``EPLBD_DOMAIN``                (derived)  full domain name; may use ``{prefix}``, ``{job}``,
                                           ``{model}``, ``{node}``
==============================  =========  ==================================================

The default domain name is ``{prefix}{job}.{model}``: one domain per served
model (the main model and an MTP drafter get separate domains, as DESIGN.md asks).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

__all__ = ["PluginConfigError", "PluginSettings", "enabled", "model_tag", "read_settings"]

_TRUE = ("1", "true", "yes", "on")
_MODES = ("async", "stw")


class PluginConfigError(ValueError):
    """A plugin environment variable has a bad value; ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"eplbd-vllm: {variable}: {message}")
        self.variable = variable


@dataclasses.dataclass(frozen=True)
class PluginSettings:
    """Validated plugin settings (see the module docstring for each field's variable)."""

    sync_interval: int = 16
    mode: str = "async"
    max_staged_experts: int | None = None
    plan_timeout_syncs: int = 64
    shm_prefix: str = "eplbd."
    job: str | None = None
    domain: str | None = None

    def domain_name(self, job: str, model: str) -> str:
        """The shm domain name for ``model`` of ``job`` (``{node}`` is left for the client)."""
        template = self.domain if self.domain else "{prefix}{job}.{model}"
        try:
            return template.format(prefix=self.shm_prefix, job=job, model=model, node="{node}")
        except (KeyError, IndexError, ValueError) as e:
            raise PluginConfigError("EPLBD_DOMAIN", f"bad template {template!r}: {e}") from None


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``EPLBD_ENABLE`` asks for the plugin."""
    env = os.environ if env is None else env
    return env.get("EPLBD_ENABLE", "").strip().lower() in _TRUE


def _int(env: Mapping[str, str], name: str, default: int | None, lo: int) -> int | None:
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        v = int(text.strip(), 10)
    except ValueError:
        raise PluginConfigError(name, f"must be an integer, got {text!r}") from None
    if v < lo:
        raise PluginConfigError(name, f"must be >= {lo}, got {v}")
    return v


def read_settings(env: Mapping[str, str] | None = None) -> PluginSettings:
    """Parse the ``EPLBD_*`` plugin variables; raises :class:`PluginConfigError` naming a bad one."""
    env = os.environ if env is None else env
    mode = env.get("EPLBD_MODE", "async").strip().lower() or "async"
    if mode not in _MODES:
        raise PluginConfigError("EPLBD_MODE", f"must be one of {_MODES}, got {mode!r}")
    prefix = env.get("EPLBD_SHM_PREFIX", "eplbd.")
    if not prefix or "/" in prefix or "\0" in prefix:
        raise PluginConfigError("EPLBD_SHM_PREFIX", f"must be non-empty without '/' or NUL, got {prefix!r}")
    job = env.get("EPLBD_JOB") or None
    if job is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", job):
        raise PluginConfigError("EPLBD_JOB", f"only letters, digits, '_', '.', '-' allowed, got {job!r}")
    return PluginSettings(
        sync_interval=_int(env, "EPLBD_SYNC_INTERVAL", 16, 1),  # type: ignore[arg-type]
        mode=mode,
        max_staged_experts=_int(env, "EPLBD_MAX_STAGED_EXPERTS", None, 1),
        plan_timeout_syncs=_int(env, "EPLBD_PLAN_TIMEOUT_SYNCS", 64, 2),  # type: ignore[arg-type]
        shm_prefix=prefix,
        job=job,
        domain=env.get("EPLBD_DOMAIN") or None,
    )


def model_tag(model_name: str, limit: int = 48) -> str:
    """A domain-name-safe tag for a served model name (``org/Model-V3`` -> ``Model-V3``).

    The last path component (HF ids and local paths end in the model's name),
    characters outside ``[A-Za-z0-9_.-]`` replaced by ``_``, at most ``limit``
    characters, never empty.
    """
    base = model_name.rstrip("/").rsplit("/", 1)[-1]
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", base).lstrip("._-")[:limit]
    return tag or "model"
