#!/usr/bin/env bash
# The checks CI cannot run: the client and the vLLM host on a CUDA device (streams,
# events, pinned memory, NCCL, CUDA graphs, no host sync on the forward thread).
#
#   tests/gpu_check.sh            # from the repo root, on a machine with CUDA torch
#
# Uses the python on PATH (or $PYTHON) with the repo on PYTHONPATH, no install. Needs
# torch (CUDA build), numpy, posix_ipc, psutil, pytest; a posix_ipc wheel may be given
# as $POSIX_IPC_WHEEL (unpacked, not installed). Logs go to $OUT (default
# /tmp/eplbd-gpu): gpu.txt (device, versions, exit status), tests.log (pytest -v, so a
# hang shows which test; faulthandler dumps every thread's stack after 120 s in one).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/eplbd-gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
EXTRA=""
if [[ -n "${POSIX_IPC_WHEEL:-}" ]]; then
    "$PY" -m zipfile -e "$POSIX_IPC_WHEEL" "$OUT/pyipc" && EXTRA=":$OUT/pyipc"
fi
# torch.cuda.is_available() (the tests' skipif) then asks NVML instead of cuInit, so it
# does not poison fork for the test launcher's forked ranks.
export PYTORCH_NVML_BASED_CUDA_CHECK=1
export PYTHONPATH="$PWD:$PWD/clients:$PWD/clients/vllm${EXTRA}${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi -L 2>&1 || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/gpu.txt" 2>&1
timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" -m pytest -v --tb=long -rA -p no:cacheprovider \
    -o faulthandler_timeout=120 tests/test_client_cuda.py tests/vllm/test_vllm_host_cuda.py \
    > "$OUT/tests.log" 2>&1
rc=$?
echo "pytest exit status $rc" >> "$OUT/gpu.txt"
tail -40 "$OUT/tests.log"
exit $rc
