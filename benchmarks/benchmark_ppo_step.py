"""One PPO update (policy + critic) on MEM1-shaped trajectories: mem1_fast's path against the MEM1-style path on the
same model, data and math.

- mem1_fast: the trajectories packed into one padding-free row in the `recompute` layout, interval visibility
  (`ops.state_attention`), the fused `ops.ppo_loss` on the trained tokens' hidden states only (no logits), a separate
  critic on the same packed row.
- MEM1-style (the strongest version of what MEM1's code does): one right-padded row per trajectory in the same
  layout, a dense 4-D boolean mask [N, 1, L, L] through transformers' SDPA attention, full logits [N, L, V], a
  per-token log_softmax, the same PPO formula; the critic's value head on every position.

Both then take an AdamW step on policy and critic. Qwen2, hidden 512, 8 layers, 8 / 4 heads, vocabulary 32,000 (43M
parameters), fp32, 4 trajectories of one question with 4, then 1-4 MEM1 turns (question 256 tokens, turns of 256-512
tokens; a rollout batch is ragged: agents answer at different turns). Each variant in
its own process (OMP_NUM_THREADS=2): time = best of 2 updates after a warm-up, peak memory = the resident set's
growth during one update. The two paths' losses are compared (they compute the same function).

Also (no timing): training tokens per trajectory at 4, 8 and 16 turns for one sample per turn with its full
prompt (what verl's and SkyRL's multi-turn agent loops train on), against one packed trajectory, and with the
question shared by a group of 4 samples (`--share-question`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import best_of, record

HERE = Path(__file__).resolve().parent
N_TRAJ, TURNS, Q_LEN, TURN_LEN, VOCAB, T = 4, 4, 256, (256, 512), 32_000, 0.7


def trajectories(turns=TURNS, n=N_TRAJ, q_len=Q_LEN, turn_len=TURN_LEN, seed=0, ragged=True):
    """n trajectories of one question; ragged: the first has `turns` turns, the others 1 to `turns` (agents answer
    at different turns), else all have `turns`."""
    import random

    from mem1_fast.trajectory import Trajectory
    rng = random.Random(seed)
    q = [rng.randrange(3, VOCAB) for _ in range(q_len)]
    out = []
    for i in range(n):
        tr, lps = [("PROMPT", 0, q)], [None]
        nt = turns if i == 0 or not ragged else rng.randint(1, turns)
        for j in range(nt):
            m = rng.randint(*turn_len)
            state, action = m // 4, 32
            tr += [("STATE", j, [rng.randrange(3, VOCAB) for _ in range(state)]),
                   ("ACTION", j, [rng.randrange(3, VOCAB) for _ in range(action)])]
            lps += [[-rng.random() * 5 for _ in range(state)], [-rng.random() * 5 for _ in range(action)]]
            if j < nt - 1:
                tr.append(("OBS", j, [rng.randrange(3, VOCAB) for _ in range(m - state - action)]))
                lps.append(None)
        out.append(Trajectory.from_triples(tr, lps, reward=rng.random()))
    return out


def setup():
    import torch

    from mem1_fast.critic import Critic
    from mem1_fast.tiny import tiny_model, word_tokenizer
    torch.manual_seed(0)
    tok = word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])
    model = tiny_model(len(tok), arch="qwen2", hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    critic = Critic.from_policy(model)
    torch.nn.init.normal_(critic.head.proj.weight, std=0.02)
    trajs = trajectories()
    g = torch.Generator().manual_seed(1)
    adv = [torch.randn(t.num_generated(), generator=g) for t in trajs]
    ret = [torch.randn(t.num_generated(), generator=g) for t in trajs]
    return model, critic, trajs, adv, ret


def mem1_fast_update(model, critic, trajs, adv, ret, opt, copt):
    from mem1_fast import advantages
    from mem1_fast.consolidation import pack
    from mem1_fast.critic import value_loss
    from mem1_fast.ops import ppo_loss
    from mem1_fast.scoring import PackedLM
    b = pack(trajs, "recompute")[0]
    n = int(b.loss_mask.sum())
    old, a, r = b.old_logprobs[b.loss_positions()], advantages.per_token(adv, b), advantages.per_token(ret, b)
    loss, _, _ = PackedLM(model)(b, lambda rows, w, t: ppo_loss(rows, w, t, old, a, None, T, 0.2, 0.01,
                                                                normalizer=n))
    v = critic(b)
    vloss, _ = value_loss(v, v.detach(), r, 0.0, None, n)
    return _apply(loss, vloss, opt, copt)


def _apply(loss, vloss, opt, copt):
    """Backward of policy + value loss, then both optimizers' steps (the same for both paths)."""
    (loss + vloss).backward()
    for o in (opt, copt):
        o.step()
        o.zero_grad(set_to_none=True)
    return float(loss), float(vloss)


def padded(trajs, device="cpu"):
    """One right-padded row per trajectory (recompute layout), its dense [N, 1, L, L] mask and loss positions."""
    import torch

    from mem1_fast.consolidation import pack
    rows = [pack([t], "recompute")[0] for t in trajs]
    L = max(r.num_tokens for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    pos = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(len(rows), 1, 1, 1)  # a pad row sees itself: no empty softmax
    loss = torch.zeros(len(rows), L, dtype=torch.bool)
    old = torch.zeros(len(rows), L)
    for i, r in enumerate(rows):
        n = r.num_tokens
        ids[i, :n], pos[i, :n], loss[i, :n], old[i, :n] = r.input_ids, r.position_ids, r.loss_mask, r.old_logprobs
        mask[i, 0, :n, :n] = r.visibility.dense()
    return ids, pos, mask, loss, old


def mem1_style_update(model, critic, trajs, adv, ret, opt, copt):
    import torch
    ids, pos, mask, loss_mask, old_lp = padded(trajs)
    n = int(loss_mask.sum())
    a = torch.zeros(loss_mask.shape)
    r = torch.zeros(loss_mask.shape)
    for i in range(len(trajs)):
        a[i, loss_mask[i]], r[i, loss_mask[i]] = adv[i], ret[i]
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    logits = out.logits / T  # [N, L, V]: every position through the LM head
    logp_all = torch.log_softmax(logits.float(), -1)
    # token t is predicted by row t - 1
    logp = logp_all[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp_all[:, :-1].exp() * logp_all[:, :-1]).sum(-1)
    m = loss_mask[:, 1:]
    ratio = torch.exp(logp - old_lp[:, 1:])
    A = a[:, 1:]
    tok = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2)) - 0.01 * ent
    loss = (tok * m).sum() / n
    h = critic.decoder(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
    v = critic.head(h)[:, :-1]
    vloss = 0.5 * (((v - r[:, 1:]) ** 2) * m).sum() / n
    return _apply(loss, vloss, opt, copt)


def worker(variant: str) -> dict:
    import threading
    import time

    import torch
    model, critic, trajs, adv, ret = setup()
    if variant == "mem1-style":
        model.config._attn_implementation = "sdpa"  # the same weights through transformers' SDPA + dense mask
        critic.decoder.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the same weights for every repetition
    copt = torch.optim.AdamW(critic.parameters(), lr=0.0)
    step = mem1_fast_update if variant == "mem1_fast" else mem1_style_update
    losses = step(model, critic, trajs, adv, ret, opt, copt)  # warm-up (allocator pools, block maps)
    seconds = best_of(lambda: step(model, critic, trajs, adv, ret, opt, copt), n=2)
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page  # noqa: E731
    base, peak, done = rss(), [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    step(model, critic, trajs, adv, ret, opt, copt)
    done[0] = True
    th.join()
    tokens = sum(len(t) for t in trajs)
    return {"seconds": seconds, "peak_mb": max(peak[0] - base, 0) / 2**20, "loss": losses[0], "value_loss": losses[1],
            "tokens": tokens}


def _run(variant):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(HERE / "benchmark_ppo_step.py"), variant], capture_output=True,
                         text=True, timeout=3600, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1][:200])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ppo_step(benchmark):
    group = (f"PPO update, policy + critic: Qwen2 43M, vocab {VOCAB}, {N_TRAJ} trajectories x {TURNS} MEM1 turns, "
             "fp32 CPU")
    res = {v: _run(v) for v in ("mem1-style", "mem1_fast")}
    for v, r in res.items():
        record(group, v, r["seconds"], baseline=v == "mem1-style", peak_mb=round(r["peak_mb"]),
               loss=round(r["loss"], 6), value_loss=round(r["value_loss"], 6))
    # the same function: the losses agree (the baseline is not doing less work)
    assert abs(res["mem1_fast"]["loss"] - res["mem1-style"]["loss"]) < 1e-4 * max(1.0, abs(res["mem1-style"]["loss"]))
    assert abs(res["mem1_fast"]["value_loss"] - res["mem1-style"]["value_loss"]) < 1e-4
    benchmark.extra_info.update(res)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("turns", [4, 8, 16])
def test_training_tokens_per_trajectory(benchmark, turns):
    """Tokens a trainer runs through the model per trajectory: one sample per turn with its full prompt, against
    one packed trajectory (`recompute`), and with the question shared by a group of 4 (`--share-question`)."""
    from mem1_fast.consolidation import pack
    from mem1_fast.trajectory import GENERATED
    trajs = trajectories(turns=turns, n=4, q_len=512, turn_len=(512, 1024), ragged=False)
    per_turn = 0
    for t in trajs:
        prev = []
        for j in range(t.num_turns):
            gen = sum(len(s) for s in t.segments if s.turn == j and s.kind in GENERATED)
            per_turn += len(t.prompt) + len(prev) + gen  # [q | t_{j-1} r_{j-1} i_{j-1}] + the turn's generation
            prev = [i for s in t.segments[1:] if s.turn == j for i in s.token_ids]
    packed = pack(trajs, "recompute")[0].num_tokens
    shared = pack(trajs, "recompute", share_question=True)[0].num_tokens
    group = "training tokens per trajectory (recompute, question 512, turns 512-1024; the value is tokens, not s)"
    record(group, f"{turns} turns: per-turn samples", per_turn / 4, baseline=True)
    record(group, f"{turns} turns: packed trajectory", packed / 4, ratio_vs_per_turn=round(packed / per_turn, 3))
    record(group, f"{turns} turns: packed, question shared by 4", shared / 4,
           ratio_vs_per_turn=round(shared / per_turn, 3))
    assert shared < packed < per_turn
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
