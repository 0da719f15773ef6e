"""Building the visibility of a packed batch: interval spec + block map vs the dense T x T mask MEM1 ships."""
import pytest

from conftest import best_of, record
from mem1_fast import _ext
from mem1_fast.visibility import build_block_map
from shapes import mem1_batch


@pytest.mark.parametrize("turns", [4, 8, 16])
@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_block_map_vs_dense_mask(benchmark, turns, mode):
    b = mem1_batch(turns, mode, n_traj=1)
    vis = b.visibility
    T = vis.T
    group = f"visibility {mode} {turns} turns (T={T})"
    dense = best_of(lambda: vis.dense())
    record(group, "dense T x T bool mask", dense, baseline=True, mem_mb=round(T * T / 2**20, 1))
    torch_map = best_of(lambda: build_block_map(vis.lo, vis.hi, 64, 64, "torch"))
    bm = build_block_map(vis.lo, vis.hi, 64, 64, "torch")
    area = bm.tile_area() / vis.visible_pairs()
    record(group, "block map (torch ops)", torch_map, tile_area_over_visible=round(area, 3),
           visible_fraction=round(vis.visible_pairs() / (T * (T + 1) / 2), 3))
    if _ext.available():
        benchmark(lambda: build_block_map(vis.lo, vis.hi, 64, 64, "cpp"))
        record(group, "block map (C++ op)", best_of(lambda: build_block_map(vis.lo, vis.hi, 64, 64, "cpp")))
    else:
        benchmark(lambda: build_block_map(vis.lo, vis.hi, 64, 64, "torch"))


@pytest.mark.parametrize("turns", [4, 16])
def test_pack(benchmark, turns):
    from mem1_fast.consolidation import pack
    from shapes import mem1_trajectory
    trajs = [mem1_trajectory(turns, i) for i in range(8)]
    benchmark(lambda: pack(trajs, "retain"))
    record(f"pack 8 trajectories, {turns} turns", "pack (retain)", best_of(lambda: pack(trajs, "retain")),
           baseline=True, tokens=sum(len(t) for t in trajs))
