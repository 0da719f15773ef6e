"""The shared CPU emulator of the CUDA kernels (csrc/cuda/emulator.h), on small kernels of its own: it must compute
what a GPU computes when the kernel is right, and make a wrong kernel visible -- a missing __syncthreads gives wrong
results under its scheduling, and a barrier only some threads reach aborts (a deadlock on a GPU)."""
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs g++")

PROGRAM = r"""
#include "emulator.h"
#include <cstdio>

// Block sum of 128 values through shared memory, then a warp shuffle reduction of the 4 warp sums.
__global__ void block_sum(const float* x, float* out, int with_barrier, int divergent) {
  __shared__ float buf[128];
  const int t = threadIdx.x;
  buf[t] = x[blockIdx.x * 128 + t];
  if (with_barrier) __syncthreads();
  if (divergent && t == 5) __syncthreads();  // only one thread reaches this barrier
  float v = 0.f;
  if (t < 32) {
    for (int i = t; i < 128; i += 32) v += buf[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (t == 0) out[blockIdx.x] = v;
  }
}

int main(int argc, char** argv) {
  const int with_barrier = argv[1][0] == '1', divergent = argc > 2;
  float x[3 * 128], out[3];
  for (int i = 0; i < 3 * 128; ++i) x[i] = float(i % 7) + 0.5f;
  int wrong = 0;
  for (int run = 0; run < 20; ++run) {
    MEM1_EMU_LAUNCH(block_sum, 3, 128, x, out, with_barrier, divergent);
    for (int b = 0; b < 3; ++b) {
      float want = 0.f;
      for (int i = 0; i < 128; ++i) want += x[b * 128 + i];
      wrong += out[b] != want;
    }
  }
  std::printf("%d\n", wrong);
  return 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu")
    (d / "t.cpp").write_text(PROGRAM)
    exe = d / "t"
    cmd = [CXX, "-std=c++20", "-O1", "-I", str(CUDA_DIR), str(d / "t.cpp"), "-o", str(exe)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    return exe


def test_correct_kernel_gives_the_exact_sums(program):
    p = subprocess.run([str(program), "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "0", p.stdout + p.stderr


def test_missing_barrier_gives_wrong_sums(program):
    """Negative control: warps drift apart between barriers, so reading the other warps' writes unsynchronized
    reads the uninitialized (or last launch's) values in some runs."""
    p = subprocess.run([str(program), "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and int(p.stdout) > 0, p.stdout + p.stderr


def test_divergent_barrier_aborts(program):
    p = subprocess.run([str(program), "1", "divergent"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "deadlock" in p.stderr
