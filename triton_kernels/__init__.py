"""Triton kernels of mem1_fast, importable under one name only: mem1_fast.triton_kernels (setup.py maps this folder
there). Found as a top-level `triton_kernels` (the repository root on sys.path) it would be a second copy of every
kernel module with its own caches, and shadow the PyPI package of that name."""
if __name__ != "mem1_fast.triton_kernels":
    raise ImportError(f"mem1_fast's Triton kernels were imported as {__name__!r}; import mem1_fast.triton_kernels "
                      "instead (this folder is that package; `triton_kernels` is also a PyPI package's name)")
