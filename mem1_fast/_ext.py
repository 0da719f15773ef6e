"""Loading the mem1_fast C++ extension, and compile checks of the CUDA sources.

``load()`` returns the extension module, which registers the ops under ``torch.ops.mem1_fast`` (e.g.
``torch.ops.mem1_fast.block_map``). It imports ``mem1_fast._C`` when ``setup.py`` built it, else JIT-builds the
same sources with ``torch.utils.cpp_extension.load`` into ``$MEM1_FAST_BUILD_DIR`` (default
``~/.cache/mem1_fast/<torch version>-<python tag>``); ``MAX_JOBS`` bounds the parallel compile jobs as usual.
Set ``MEM1_FAST_FORCE_JIT=1`` to skip ``mem1_fast._C``.

``load_cuda()`` imports ``mem1_fast._C_cuda`` (built by setup.py on CUDA builds of torch only) and says whether it
registered its ops; ``cuda_error()`` says why not.

``source_list()`` reads ``csrc/sources.txt``, the one list of native sources and CUDA architectures (setup.py and
CMakeLists.txt read it too); ``cpu_sources()`` / ``cuda_sources()`` / ``cuda_archs()`` are its parts;
``nvcc_compile(src, arch)`` compiles one of them with nvcc (no GPU needed) and returns ptxas' per-kernel
register / spill / shared-memory figures.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = [
    "load",
    "available",
    "has_cpu_op",
    "load_cuda",
    "cuda_error",
    "csrc_dir",
    "cpu_sources",
    "cuda_sources",
    "cuda_archs",
    "source_list",
    "find_nvcc",
    "cuda_include_dir",
    "nvcc_compile",
    "parse_ptxas",
    "CXX_FLAGS",
    "LD_FLAGS",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_JIT_NAME = "mem1_fast_C"

# Compile / link flags of the CPU extension (shared with setup.py). -fopenmp makes at::parallel_for parallel
# (ATen's OpenMP backend is header-inlined); at run time it binds to the libgomp torch already loaded.
CXX_FLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]
LD_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: BaseException | None = None


def csrc_dir() -> Path:
    """The ``csrc/`` folder of the source checkout (the JIT build and the nvcc checks need it)."""
    env = os.environ.get("MEM1_FAST_CSRC")
    d = Path(env) if env else _REPO_ROOT / "csrc"
    if not (d / "bindings.cpp").is_file():
        raise RuntimeError(
            f"mem1_fast: C++ sources not found at {d} (the JIT build needs a source checkout; "
            "set MEM1_FAST_CSRC or install with `pip install --no-build-isolation -e .` so mem1_fast._C is built)"
        )
    return d


def source_list(csrc: Path | None = None) -> dict[str, list[str]]:
    """``csrc/sources.txt``, the one list of native sources and CUDA architectures (setup.py and CMakeLists.txt read
    it too): {"cpu": [path, ...], "cuda": [...], "arch": ["80", "90a"]}, paths relative to the csrc folder."""
    csrc = csrc_dir() if csrc is None else csrc
    out: dict[str, list[str]] = {"cpu": [], "cuda": [], "arch": []}
    for n, line in enumerate((csrc / "sources.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            kind, _, value = line.partition(" ")
            if kind not in out or not value.strip():
                raise RuntimeError(f"csrc/sources.txt:{n}: expected 'cpu|cuda|arch <value>', got {line!r}")
            out[kind].append(value.strip())
    return out


def cpu_sources() -> list[Path]:
    """Sources of the CPU extension (``cpu`` lines of csrc/sources.txt)."""
    return [csrc_dir() / p for p in source_list()["cpu"]]


def cuda_sources() -> list[Path]:
    """The ``.cu`` sources of the CUDA extension (``cuda`` lines of csrc/sources.txt; compile-checked with nvcc)."""
    return [csrc_dir() / p for p in source_list()["cuda"] if p.endswith(".cu")]


def cuda_archs() -> list[str]:
    """The CUDA architectures compiled for, as ptxas names them ("sm_80", "sm_90a")."""
    return ["sm_" + a for a in source_list()["arch"]]


def _build_dir() -> Path:
    env = os.environ.get("MEM1_FAST_BUILD_DIR")
    if env:
        d = Path(env).expanduser()
    else:
        import torch

        tag = f"torch{torch.__version__}-{sys.implementation.cache_tag}"
        d = Path.home() / ".cache" / "mem1_fast" / re.sub(r"[^A-Za-z0-9_.+-]", "_", tag)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _check_toolchain() -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        raise RuntimeError(
            f"mem1_fast: no C++ compiler found (looked for `{cxx}`; set CXX or install g++/clang++) -- the C++ "
            "extension was not built at install time, so it must be JIT-compiled"
        )
    if sysconfig.get_paths().get("include") is None or not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        raise RuntimeError("mem1_fast: Python development headers (Python.h) not found; install python3-dev")


def _jit_build(verbose: bool) -> ModuleType:
    _check_toolchain()
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(s) for s in cpu_sources()],
            extra_include_paths=[str(csrc_dir() / "include")],
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            build_directory=str(_build_dir()),
            verbose=verbose,
        )
    except Exception as e:  # compiler / ninja errors arrive as RuntimeError or CalledProcessError
        msg = str(e)
        out = getattr(e, "output", None)
        if isinstance(out, bytes | str) and out:
            msg += "\n" + (out.decode(errors="replace") if isinstance(out, bytes) else out)
        raise RuntimeError(f"mem1_fast: JIT build of the C++ extension failed (compiler error below)\n{msg}") from e


def load(verbose: bool = False) -> ModuleType:
    """Return the C++ extension module (importing it registers ``torch.ops.mem1_fast.*``); cached.

    Imports ``mem1_fast._C`` if it was built by setup.py and matches this torch, else JIT-builds it.
    Raises RuntimeError (with the compiler's message) when neither works.
    """
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(str(_error)) from _error
        import torch  # noqa: F401  (the extension needs libtorch loaded first)

        mod = None
        if os.environ.get("MEM1_FAST_FORCE_JIT", "") in ("", "0"):
            try:
                mod = importlib.import_module("mem1_fast._C")
            except ImportError:  # not built, or built against another torch (undefined symbols)
                mod = None
        if mod is None:
            try:
                mod = _jit_build(verbose)
            except RuntimeError as e:
                _error = e
                raise
        _module = mod
        return mod


def available() -> bool:
    """True when the C++ extension is importable or can be built here (builds it if needed)."""
    try:
        load()
        return True
    except RuntimeError:
        return False


def has_cpu_op(name: str) -> bool:
    """True when the C++ extension loads and registers torch.ops.mem1_fast.<name> (a stale build may lack a newer
    op: rebuild with `python setup.py build_ext --inplace`)."""
    if not available():
        return False
    import torch

    return hasattr(torch.ops.mem1_fast, name)


# ---------------------------------------------------------------------------------------------------------------
# nvcc compile checks (no GPU needed)

_ARCH_GENCODE = {
    "sm_80": "arch=compute_80,code=sm_80",
    "sm_90a": "arch=compute_90a,code=sm_90a",
    "sm_90": "arch=compute_90,code=sm_90",
}


_cuda_ok: bool | None = None
_cuda_error: str | None = None


def load_cuda() -> bool:
    """Import the CUDA extension (registers torch.ops.mem1_fast.*_cuda_* ops); cached. False when it is not built
    (CPU torch, no nvcc at install) or does not load (built against another torch / CUDA)."""
    global _cuda_ok, _cuda_error
    if _cuda_ok is None:
        try:
            importlib.import_module("mem1_fast._C_cuda")
            import torch

            _cuda_ok = hasattr(torch.ops.mem1_fast, "state_attention_cuda_fwd")
            if not _cuda_ok:
                _cuda_error = "mem1_fast._C_cuda imported but registered no ops"
        except (ImportError, OSError, RuntimeError) as e:
            _cuda_ok, _cuda_error = False, f"{type(e).__name__}: {e}"
    return _cuda_ok


def cuda_error() -> str | None:
    """Why load_cuda() is False (None when it is True or was not called)."""
    return None if _cuda_ok else _cuda_error


def find_nvcc() -> str | None:
    """Path of nvcc ($NVCC, $CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda/bin/nvcc), or None."""
    cands = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        dem = out.splitlines()
        if len(dem) == len(names):
            return dict(zip(names, dem))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {n: n for n in names}


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(text: str) -> dict[str, dict]:
    """Per-kernel figures from nvcc ``--resource-usage`` output (``ptxas info`` lines).

    Returns {mangled name: {"name": demangled, "arch", "registers", "spill_stores", "spill_loads", "stack",
    "smem", "barriers"}}; only entry functions (kernels) are listed.
    """
    kernels: dict[str, dict] = {}
    cur: str | None = None
    for line in text.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            cur = m.group(1)
            kernels[cur] = {
                "arch": m.group(2),
                "registers": 0,
                "spill_stores": 0,
                "spill_loads": 0,
                "stack": 0,
                "smem": 0,
                "barriers": 0,
            }
            continue
        m = _RE_PROPS.search(line)
        if m:
            cur = m.group(1) if m.group(1) in kernels else None  # device functions are not kernels
            continue
        if cur is None:
            continue
        m = _RE_STACK.search(line)
        if m:
            kernels[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _RE_USED.search(line)
        if m:
            kernels[cur]["registers"] = int(m.group(1))
            s = _RE_SMEM.search(line)
            kernels[cur]["smem"] = int(s.group(1)) if s else 0
            b = _RE_BARRIERS.search(line)
            kernels[cur]["barriers"] = int(b.group(1)) if b else 0
    names = _demangle(list(kernels))
    for k, v in kernels.items():
        v["name"] = names[k]
    return kernels


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder (the one holding cuda_runtime_api.h), or None: $CUDA_HOME, $CUDA_PATH,
    /usr/local/cuda, then the toolkit of the nvcc found. Host-only compile checks need it, no GPU."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    return None


def nvcc_compile(src: str | os.PathLike, arch: str = "sm_80", extra_flags: list[str] | None = None) -> dict:
    """Compile one ``.cu`` file to an object with nvcc for ``arch`` (``sm_80`` or ``sm_90a``; no GPU needed).

    Returns {"ok", "returncode", "cmd", "output", "kernels": parse_ptxas(output)}. Raises FileNotFoundError
    when nvcc is absent.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set $NVCC or $CUDA_HOME, or put nvcc on PATH)")
    gencode = _ARCH_GENCODE.get(arch)
    if gencode is None:
        num = arch.removeprefix("sm_")
        gencode = f"arch=compute_{num},code=sm_{num}"
    src = Path(src)
    with tempfile.TemporaryDirectory(prefix="mem1_nvcc_") as tmp:
        cmd = [
            nvcc,
            "-c",
            str(src),
            "-o",
            str(Path(tmp) / (src.stem + ".o")),
            "-std=c++17",
            "-O3",
            "--resource-usage",
            "-Xptxas=-warn-spills",
            "-gencode",
            gencode,
            "-I",
            str(csrc_dir() / "include"),
            "-I",
            str(src.parent),
            *(extra_flags or []),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    return {"ok": p.returncode == 0, "returncode": p.returncode, "cmd": cmd, "output": out, "kernels": parse_ptxas(out)}
