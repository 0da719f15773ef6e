"""Layouts, interval specs, block maps and the dense expansion agree, for every mode, on random trajectories."""
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mem1_fast import _ext
from mem1_fast.consolidation import MODES, pack
from mem1_fast.trajectory import Kind, Trajectory
from mem1_fast.visibility import Visibility, VisibilityError, build_block_map, canonical

TILES = [(16, 16), (32, 16), (16, 64), (64, 64), (128, 32)]
BACKENDS = ["torch"] + (["cpp"] if _ext.available() else [])


@st.composite
def trajectories(draw, max_turns=5):
    tok = st.integers(3, 99)
    n_turns = draw(st.integers(1, max_turns))
    triples = [("PROMPT", 0, draw(st.lists(tok, min_size=1, max_size=12)))]
    for j in range(n_turns):
        state = draw(st.lists(tok, max_size=9))
        action = draw(st.lists(tok, min_size=0 if state else 1, max_size=9))
        triples += [("STATE", j, state), ("ACTION", j, action)]
        last = j == n_turns - 1
        obs = draw(st.lists(tok, min_size=0 if last else 1, max_size=12))
        if obs:
            triples.append(("OBS", j, obs))
    lps = [None if k in ("PROMPT", "OBS") else [-float(i % 7) / 3 for i in range(len(ids))] for k, _, ids in triples]
    return Trajectory.from_triples(triples, lps)


def oracle(traj: Trajectory, mode: str):
    """Token list and visibility straight from the rules of docs/design.md §3, pairwise, with no interval
    arithmetic."""
    segs = traj.segments
    q = list(traj.prompt.token_ids)
    toks = [(t, Kind.PROMPT, 0, -1, False) for t in q]  # (id, kind, turn, block, loss)
    pos = list(range(len(q)))
    if mode == "recompute":
        for j in range(traj.num_turns):
            block_pos = len(q)
            for s in segs[1:]:
                if s.turn == j - 1:
                    for t in s.token_ids:
                        toks.append((t, s.kind, j - 1, j, False)); pos.append(block_pos); block_pos += 1
            for s in segs[1:]:
                if s.turn == j and s.kind in (Kind.STATE, Kind.ACTION):
                    for t in s.token_ids:
                        toks.append((t, s.kind, j, j, True)); pos.append(block_pos); block_pos += 1
    else:
        for s in segs[1:]:
            for t in s.token_ids:
                toks.append((t, s.kind, s.turn, -2, s.kind != Kind.OBS)); pos.append(len(pos))
    L = len(toks)
    mask = torch.zeros(L, L, dtype=torch.bool)
    for p, (_, kp, jp, bp, _) in enumerate(toks):
        for c in range(p + 1):
            _, kc, jc, bc, _ = toks[c]
            if kp == Kind.PROMPT:
                ok = kc == Kind.PROMPT
            elif mode == "recompute":
                ok = kc == Kind.PROMPT or bc == bp
            elif mode == "full":  # the whole history
                ok = True
            elif mode == "retain":
                gen = kp in (Kind.STATE, Kind.ACTION)
                ok = kc == Kind.PROMPT or (jc == jp - 1 if gen else False) or jc == jp
            elif mode == "paper":  # attn_mask_utils.make_attention_mask
                if kp == Kind.OBS:
                    ok = kc == Kind.OBS and jc == jp
                else:
                    ok = (kc == Kind.PROMPT or (jc == jp - 1 and kc in (Kind.ACTION, Kind.OBS))
                          or (jc == jp and kc == Kind.STATE)
                          or (kp == Kind.ACTION and jc == jp and kc == Kind.ACTION))
            else:
                raise AssertionError(f"no oracle rule for mode {mode!r}")
            mask[p, c] = ok
    return [t[0] for t in toks], pos, [t[4] for t in toks], mask


def tiles_from_dense(mask, BM, BN):
    T = mask.shape[0]
    full, partial = set(), set()
    for qb in range(-(-T // BM)):
        for kb in range(-(-T // BN)):
            tile = mask[qb * BM:(qb + 1) * BM, kb * BN:(kb + 1) * BN]
            c = int(tile.sum())
            if c == tile.numel():
                full.add((qb, kb))
            elif c:
                partial.add((qb, kb))
    return full, partial


def tiles_from_map(bm):
    out = []
    for ptr, idx in ((bm.full_ptr, bm.full_idx), (bm.partial_ptr, bm.partial_idx)):
        s = set()
        for qb in range(ptr.numel() - 1):
            ks = idx[ptr[qb]:ptr[qb + 1]].tolist()
            assert ks == sorted(ks), "key blocks must ascend within a query block"
            s |= {(qb, k) for k in ks}
        out.append(s)
    return tuple(out)


@settings(max_examples=60, deadline=None)
@given(st.lists(trajectories(), min_size=1, max_size=4), st.sampled_from(MODES))
def test_layout_matches_mode_rules(trajs, mode):
    b = pack(trajs, mode)[0]
    b.visibility.validate()
    dense = b.visibility.dense()
    off = 0
    for i, t in enumerate(trajs):
        ids, pos, loss, mask = oracle(t, mode)
        L = len(ids)
        sl = slice(off, off + L)
        assert b.input_ids[sl].tolist() == ids
        assert b.position_ids[sl].tolist() == pos
        assert b.loss_mask[sl].tolist() == loss
        assert torch.equal(dense[sl, sl], mask), f"trajectory {i} visibility differs from the {mode} rules"
        assert not dense[sl, :off].any() and not dense[sl, off + L:].any(), "visibility crosses trajectories"
        assert (b.traj_ids[sl] == i).all()
        # the sampled log-probs travel with their tokens
        gen_lps = [x for s in t.segments if s.logprobs is not None for x in s.logprobs]
        assert b.old_logprobs[sl][b.loss_mask[sl]].tolist() == pytest.approx(gen_lps)
        off += L
    assert off == b.num_tokens == int(b.cu_seqlens[-1])


@settings(max_examples=40, deadline=None)
@given(st.lists(trajectories(), min_size=1, max_size=5), st.sampled_from(MODES), st.sampled_from(TILES),
       st.sampled_from(BACKENDS))
def test_block_map_agrees_with_dense(trajs, mode, tile, backend):
    b = pack(trajs, mode)[0]
    BM, BN = tile
    bm = build_block_map(b.visibility.lo, b.visibility.hi, BM, BN, backend)
    full, partial = tiles_from_dense(b.visibility.dense(), BM, BN)
    assert tiles_from_map(bm) == (full, partial)
    # the transpose lists the same tiles by key block
    tf, tp = tiles_from_map(bm.transpose())
    assert {(q, k) for k, q in tf} == full and {(q, k) for k, q in tp} == partial
    assert bm.tile_area() >= b.visibility.visible_pairs()


def test_block_maps_are_cached_per_batch():
    """Built once per (tiles) and reused by every layer; the transposed map (dK/dV pass) is cached beside it."""
    t = Trajectory.from_triples([("PROMPT", 0, [5] * 40), ("STATE", 0, [6] * 30), ("OBS", 0, [7] * 50),
                                 ("STATE", 1, [6] * 30), ("ACTION", 1, [8] * 9)])
    vis = pack([t], "retain")[0].visibility
    bm = vis.block_map(16, 32)
    assert vis.block_map(16, 32) is bm and vis.block_map(32, 16) is not bm
    bt = vis.transposed_block_map(16, 32)
    assert vis.transposed_block_map(16, 32) is bt
    assert tiles_from_map(bt) == tiles_from_map(bm.transpose())
    tf, tp = tiles_from_map(bt)
    assert ({(q, k) for k, q in tf}, {(q, k) for k, q in tp}) == tiles_from_map(bm)


def test_block_map_negative_control():
    """A map from a different spec must disagree with the dense tiles (the comparison can fail)."""
    t = Trajectory.from_triples([("PROMPT", 0, [5] * 20), ("STATE", 0, [6] * 20), ("OBS", 0, [7] * 20),
                                 ("STATE", 1, [6] * 20), ("OBS", 1, [7] * 20), ("ACTION", 2, [8] * 20)])
    a, r = pack([t], "paper")[0], pack([t], "retain")[0]
    assert tiles_from_map(build_block_map(a.visibility.lo, a.visibility.hi, 16, 16, "torch")) != \
        tiles_from_dense(r.visibility.dense(), 16, 16)


def test_budget_packing_and_errors():
    t = Trajectory.from_triples([("PROMPT", 0, [5] * 10), ("ACTION", 0, [6] * 5)])
    batches = pack([t] * 5, "retain", max_tokens=31)
    assert [b.num_tokens for b in batches] == [30, 30, 15] and sum(len(b.cu_seqlens) - 1 for b in batches) == 5
    assert batches[1].traj_ids.unique().tolist() == [2, 3]
    with pytest.raises(ValueError, match="token budget 14 is smaller than trajectory 0"):
        pack([t], "retain", max_tokens=14)
    with pytest.raises(ValueError, match="no trajectories"):
        pack([], "retain")
    with pytest.raises(ValueError, match="unknown consolidation mode"):
        pack([t], "forget")


def vis(lo, hi, cu=None):
    return Visibility(torch.tensor(lo, dtype=torch.int32), torch.tensor(hi, dtype=torch.int32),
                      None if cu is None else torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize("lo,hi,cu,msg", [
    ([[0], [0], [1]], [[1], [3], [2]], None, "hi > p \\+ 1"),
    ([[0], [1], [0]], [[1], [0], [3]], None, "lo > hi"),
    ([[0, 0], [0, 1], [0, 0]], [[1, 0], [1, 2], [3, 0]], None, "overlapping, touching or unsorted"),
    ([[0, 0], [1, 0], [0, 1]], [[1, 0], [2, 0], [1, 3]], None, "overlapping, touching or unsorted"),
    ([[0, 0], [0, 0], [0, 2]], [[1, 0], [0, 0], [0, 3]], None, "empty interval slot before"),
    ([[0], [-1], [0]], [[1], [1], [3]], None, "lo < 0"),
    ([[0], [0], [0]], [[1], [2], [3]], [0, 2, 3], "crosses into another trajectory"),
    ([[0], [0], [2]], [[1], [2], [3]], [0, 2, 4], "cu_seqlens must rise"),
])
def test_bad_interval_specs_are_named(lo, hi, cu, msg):
    with pytest.raises(VisibilityError, match=msg):
        vis(lo, hi, cu).validate()


def test_wrong_dtype_and_shape():
    with pytest.raises(VisibilityError, match="int32"):
        Visibility(torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1, dtype=torch.int64)).validate()
    with pytest.raises(VisibilityError, match="one shape"):
        Visibility(torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 2, dtype=torch.int32)).validate()


def test_canonical_merges_and_sorts():
    lo, hi = canonical(torch.tensor([[5, 0, 3], [2, 2, 0]]), torch.tensor([[7, 3, 5], [2, 3, 1]]))
    assert lo.tolist() == [[0, 0, 0], [0, 2, 0]] and hi.tolist() == [[7, 0, 0], [1, 3, 0]]
    v = Visibility(lo, hi)
    assert v.dense()[0, :7].all()


def test_no_square_tensor_at_large_T():
    """Packing and block maps at T ~ 1M tokens: a T x T bool would need 1 TB, an nQ x nK int64 map 2 GB.
    Peak RSS growth is measured in a fresh process."""
    code = textwrap.dedent("""
        import resource, torch, json
        from mem1_fast.trajectory import Trajectory
        from mem1_fast.consolidation import pack
        from mem1_fast.visibility import build_block_map
        import sys
        backend = sys.argv[1]
        def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tr = [("PROMPT", 0, [5] * 256)]
        for j in range(16):
            tr += [("STATE", j, [6] * 40), ("ACTION", j, [7] * 8)] + ([("OBS", j, [8] * 200)] if j < 15 else [])
        t = Trajectory.from_triples(tr)
        base = rss()
        b = pack([t] * 256, "retain")[0]
        T = b.num_tokens
        packed = rss()
        bm = build_block_map(b.visibility.lo, b.visibility.hi, 64, 64, backend)
        print(json.dumps({"T": T, "pack_mb": packed - base, "map_mb": rss() - packed,
                          "tiles": int(bm.full_idx.numel() + bm.partial_idx.numel())}))
    """)
    import json
    for backend in BACKENDS:
        out = subprocess.run([sys.executable, "-c", code, backend], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["T"] > 1_000_000
        assert r["pack_mb"] < 1024 and r["map_mb"] < 512, r
        nq = -(-r["T"] // 64)
        assert r["tiles"] < nq * 40, r  # bounded by the turn window, not by T
