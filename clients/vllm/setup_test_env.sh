#!/usr/bin/env bash
# Create (once) and refresh the vLLM test environment for tests/vllm.
#
#   clients/vllm/setup_test_env.sh            # prints the venv's python path last
#
# The venv ($EPLBD_VLLM_VENV, default .venv-vllm in the repo root) holds CPU torch
# 2.13.0, vLLM 0.33.0 installed with --no-deps and the exact packages vLLM needs to
# import on CPU (requirements-vllm-test.txt). It is rebuilt only when that file,
# this script or a pyproject.toml changes (a stamp holds their hash), so a cached
# run costs a few seconds: it only re-points the editable installs of eplbd and
# eplbd-vllm at this checkout (a venv kept outside the repo can serve many clones).
# Never let pip resolve vllm's own dependencies: they pin torch 2.14 and CUDA wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
VENV="${EPLBD_VLLM_VENV:-.venv-vllm}"
PY3="${PY:-python3}"
REQ=clients/vllm/requirements-vllm-test.txt
STAMP="$VENV/.eplbd-vllm-stamp"
HASH="$(cat "$REQ" clients/vllm/setup_test_env.sh pyproject.toml clients/vllm/pyproject.toml | sha256sum | cut -c1-16)"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

quiet() { # pip prints a WARNING per unreadable local index entry on some hosts: keep the real errors
    "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    return "${PIPESTATUS[0]}"
}

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$HASH" ]]; then
    echo "eplbd-vllm: building $VENV (stamp ${HASH})" >&2
    rm -rf "$VENV"
    "$PY3" -m venv "$VENV"
    # CPU torch first, pinned: anything unpinned that depends on torch must find it satisfied.
    quiet "${PIP[@]}" install torch==2.13.0
    quiet "${PIP[@]}" install -e '.[client,test]'
    quiet "${PIP[@]}" install --no-deps -r "$REQ"
    echo "$HASH" > "$STAMP"
fi
# Cheap, every time: point the editable installs at this checkout (no dependency resolution).
quiet "${PIP[@]}" install --no-deps --no-build-isolation -e . -e clients/vllm
"$VENV/bin/python" - <<'PYEOF'
import importlib, importlib.metadata as md, sys
import torch
if not torch.__version__.startswith("2.13.0") or torch.version.cuda is not None:
    sys.exit(f"eplbd-vllm test env: expected CPU torch 2.13.0, found {torch.__version__} (cuda={torch.version.cuda})")
for m in ("vllm.distributed.eplb.eplb_state", "vllm.distributed.eplb.rebalance_execute",
          "vllm.model_executor.models.interfaces", "vllm.plugins", "eplbd_client", "eplbd_vllm"):
    importlib.import_module(m)
if md.version("vllm") != "0.33.0":
    sys.exit(f"eplbd-vllm test env: expected vllm 0.33.0, found {md.version('vllm')}")
eps = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.name == "eplbd"]
if eps != ["eplbd_vllm:register"]:
    sys.exit(f"eplbd-vllm test env: entry point vllm.general_plugins:eplbd missing or wrong: {eps}")
PYEOF
echo "$VENV/bin/python"
