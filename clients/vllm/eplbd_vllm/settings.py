"""The plugin's own settings, read from ``EPLBD_*`` environment variables (no vLLM import).

Every vLLM process inherits the launching shell's environment, so environment
variables reach the workers without any vLLM flag. The plugin's variables:

==============================  =========  ==================================================
variable                        default    meaning
==============================  =========  ==================================================
``EPLBD_ENABLE``                (off)      ``1``/``true``/``yes``/``on`` turns the plugin on;
                                           anything else leaves vLLM untouched
``EPLBD_SHM_PREFIX``            eplbd.     shm name prefix; the daemon reads the same variable
``EPLBD_JOB``                   vllm<pid>  job part of the domain name (pid of EP rank 0)
``EPLBD_DOMAIN``                (derived)  full domain name; may use ``{prefix}``, ``{job}``,
                                           ``{model}``, ``{node}``
==============================  =========  ==================================================

The client's settings are the engine-neutral ``EPLBD_CLIENT_<FIELD>`` variables
of :meth:`eplbd_client.ClientConfig.from_env` (``EPLBD_CLIENT_SYNC_INTERVAL``,
``EPLBD_CLIENT_MODE``, ``EPLBD_CLIENT_MAX_STAGED_EXPERTS``, ...), read by
:func:`eplbd_vllm.register` when the plugin is enabled.

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


class PluginConfigError(ValueError):
    """A plugin environment variable has a bad value; ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"eplbd-vllm: {variable}: {message}")
        self.variable = variable


@dataclasses.dataclass(frozen=True)
class PluginSettings:
    """Validated plugin settings (see the module docstring for each field's variable)."""

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


def read_settings(env: Mapping[str, str] | None = None) -> PluginSettings:
    """Parse the ``EPLBD_*`` plugin variables; raises :class:`PluginConfigError` naming a bad one."""
    env = os.environ if env is None else env
    prefix = env.get("EPLBD_SHM_PREFIX", "eplbd.")
    if not prefix or "/" in prefix or "\0" in prefix:
        raise PluginConfigError("EPLBD_SHM_PREFIX", f"must be non-empty without '/' or NUL, got {prefix!r}")
    job = env.get("EPLBD_JOB") or None
    if job is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", job):
        raise PluginConfigError("EPLBD_JOB", f"only letters, digits, '_', '.', '-' allowed, got {job!r}")
    return PluginSettings(
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
