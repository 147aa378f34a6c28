"""Environment of the vLLM plugin tests (imported by conftest.py first, then by the tests).

These tests need the real vLLM 0.33 package, which lives in its own environment
(``clients/vllm/setup_test_env.sh`` builds ``.venv-vllm``; ``make test-vllm`` runs
them). Under any other interpreter the vLLM-dependent tests are skipped with
:data:`VLLM_SKIP_REASON`; the plugin's pure parts (settings, inertness) run everywhere.

Platform shim (the only one outside the test model): vLLM's CUDA wheel finds no
platform on a CPU-only host, so ``VLLM_TARGET_DEVICE=cpu`` selects vLLM's own
CpuPlatform. It must be set before ``vllm.platforms.current_platform`` is first
resolved, hence here, at conftest import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[2]
# The plugin is installed (editable) in .venv-vllm; elsewhere import it from the tree.
_PLUGIN_SRC = str(REPO / "clients" / "vllm")
if _PLUGIN_SRC not in sys.path:
    sys.path.append(_PLUGIN_SRC)


def _vllm_skip_reason() -> str | None:
    # Import a real submodule: with tests/ on sys.path, a bare `import vllm` can
    # succeed as a namespace package made of this very directory.
    try:
        import vllm.distributed.eplb.eplb_state  # noqa: F401
    except Exception as e:
        # Drop a half-imported or namespace `vllm` so that nothing else picks it up.
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]
        return (
            f"vLLM is not importable here ({type(e).__name__}: {e}); "
            "run `make test-vllm` (clients/vllm/setup_test_env.sh builds its environment)"
        )
    return None


VLLM_SKIP_REASON = _vllm_skip_reason()
