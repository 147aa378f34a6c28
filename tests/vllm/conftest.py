"""Imports :mod:`vllm_env` before any test module, so vLLM's platform shim is set in time."""

import vllm_env  # noqa: F401
