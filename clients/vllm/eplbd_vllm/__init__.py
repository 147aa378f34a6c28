"""eplbd for vLLM: a ``vllm.general_plugins`` entry point (``eplbd_vllm:register``).

vLLM loads general plugins in every process (API server, engine core, workers)
before the model loads. :func:`register` does nothing unless ``EPLBD_ENABLE=1``;
then it checks that the running vLLM has what the plugin relies on
(:mod:`eplbd_vllm.compat`; vLLM 0.33.x), reads the ``EPLBD_*`` settings
(:mod:`eplbd_vllm.settings`) and the client's ``EPLBD_CLIENT_*`` ones, and
patches ``EplbState`` (:mod:`eplbd_vllm.bridge`)
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
    mismatch, each named), :class:`PluginConfigError` (a bad ``EPLBD_*`` or
    ``EPLBD_CLIENT_*`` value, named) or ``ImportError`` (eplbd or its client missing), so that vLLM refuses to
    start instead of running unbalanced or, worse, with both balancers.
    """
    if not enabled():
        return
    from .settings import read_settings

    settings = read_settings()
    try:
        import eplbd  # noqa: F401
        from eplbd_client import ClientConfig
    except ImportError as e:
        raise ImportError(
            f"eplbd-vllm: EPLBD_ENABLE is set but eplbd's client is not importable ({e}); "
            "install eplbd with its client extra into vLLM's environment: pip install '<eplbd repo>[client]'"
        ) from e
    try:
        client_config = ClientConfig.from_env()  # EPLBD_CLIENT_* variables
    except ValueError as e:
        # from_env names an unknown or unparsable variable; a value out of range is
        # named by its field (first word): turn that into the variable's name.
        msg, word = str(e), str(e).split(" ", 1)[0].rstrip(":")
        var = word if word.startswith("EPLBD_CLIENT_") else "EPLBD_CLIENT_" + word.upper()
        raise PluginConfigError(var, msg) from None
    from .compat import check_vllm

    version = check_vllm()
    from .bridge import install, installed

    if installed():
        return
    from .hooks import load_entry_point_hooks

    load_entry_point_hooks()
    install(settings, client_config)
    log.info(
        "eplbd-vllm %s enabled on vLLM %s: sync every %d steps, mode %s, shm prefix %r",
        __version__,
        version,
        client_config.sync_interval,
        client_config.mode,
        settings.shm_prefix,
    )
