"""eplbd for vLLM: a ``vllm.general_plugins`` entry point (``eplbd_vllm:register``).

vLLM loads general plugins in every process (API server, engine core, workers)
before the model loads. :func:`register` does nothing unless ``EPLBD_ENABLE=1``;
then it checks that the running vLLM has what the plugin relies on
(:mod:`eplbd_vllm.compat`; vLLM 0.33.x), reads the ``EPLBD_*`` settings
(:mod:`eplbd_vllm.settings`) and patches ``EplbState`` (:mod:`eplbd_vllm.bridge`)
so that eplbd balances the experts and vLLM's own rearrangement never runs.

Importing this package imports nothing from vLLM (nor torch): a disabled plugin
costs vLLM one environment lookup.
"""

from __future__ import annotations

import logging

from .settings import PluginConfigError, enabled

__all__ = ["PluginConfigError", "__version__", "register"]

__version__ = "0.1.0"

log = logging.getLogger("eplbd_vllm")


def register() -> None:
    """vLLM's entry point. Inert unless ``EPLBD_ENABLE`` is set; idempotent.

    Raises :class:`eplbd_vllm.compat.VllmCompatError` (vLLM version or API
    mismatch, each named), :class:`PluginConfigError` (a bad ``EPLBD_*`` value,
    named) or ``ImportError`` (eplbd or its client missing), so that vLLM refuses to
    start instead of running unbalanced or, worse, with both balancers.
    """
    if not enabled():
        return
    from .settings import read_settings

    settings = read_settings()
    try:
        import eplbd  # noqa: F401
        import eplbd_client  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"eplbd-vllm: EPLBD_ENABLE is set but eplbd's client is not importable ({e}); "
            "install eplbd with its client extra into vLLM's environment: pip install '<eplbd repo>[client]'"
        ) from e
    from .compat import check_vllm

    version = check_vllm()
    from .bridge import install, installed

    if installed():
        return
    from .hooks import load_entry_point_hooks

    load_entry_point_hooks()
    install(settings)
    log.info(
        "eplbd-vllm %s enabled on vLLM %s: sync every %d steps, mode %s, shm prefix %r",
        __version__,
        version,
        settings.sync_interval,
        settings.mode,
        settings.shm_prefix,
    )
