"""Three PPO updates (policy with the fused ppo_loss on its tied LM head, and a separate critic) run twice on every
rank: unsharded on all trajectories (the reference), and FSDP2-sharded over the ranks with each rank on its own
share of the trajectories, as mem1_fast.train does it (loss scale, padding passes, gradient sync on the last
micro-batch). Writes the largest parameter difference per rank to OUT/rank<r>.json.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT
"""
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mem1_fast import advantages, distributed  # noqa: E402
from mem1_fast.consolidation import pack  # noqa: E402
from mem1_fast.critic import Critic, value_loss  # noqa: E402
from mem1_fast.ops import ppo_loss  # noqa: E402
from mem1_fast.rollout import full_state_dict  # noqa: E402
from mem1_fast.scoring import PackedLM  # noqa: E402
from mem1_fast.tiny import tiny_model_and_tokenizer  # noqa: E402
from test_pack import groups_of_rollouts  # noqa: E402


def update(policy, critic, trajs, old_lp, adv, ret, total_tokens, d, budget, loss_scale=None, steps=3):
    """`steps` clipped SGD steps of policy (PPO loss) and critic (value loss) on `trajs`, normalized by
    `total_tokens`; returns the last step's gradients, whole, and (batches, passes). (SGD, not Adam: Adam's first
    step is sign-like and would blow float noise in near-zero gradients up to the learning rate.)"""
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    copt = torch.optim.SGD(critic.parameters(), lr=0.1)
    batches = pack(trajs, "recompute", budget)
    todo = distributed.pad_passes(batches, d)
    norm = total_tokens / (d.loss_scale if loss_scale is None else loss_scale)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        copt.zero_grad(set_to_none=True)
        for i, (b, weight) in enumerate(todo):
            for m in (policy, critic):
                distributed.set_gradient_sync(m, i == len(todo) - 1)
            lp_b, adv_b, ret_b = (advantages.per_token(x, b) for x in (old_lp, adv, ret))
            loss, _, _ = policy(b, lambda rows, w, t: ppo_loss(rows, w, t, lp_b, adv_b, None, 0.7, 0.2, 0.01,
                                                               normalizer=norm))
            vloss, _ = value_loss(critic(b), torch.zeros_like(ret_b), ret_b, 0.0, None, norm)
            ((loss + vloss) * weight).backward()
        grads = {}
        for name, m, o in (("policy", policy, opt), ("critic", critic, copt)):
            for k, p in m.named_parameters():  # before clipping, which would hide a wrong scale
                grads[f"{name}.{k}"] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
    return grads, (len(batches), len(todo))


def main(out: Path):
    d = distributed.init("cpu")
    torch.manual_seed(0)
    model, _ = tiny_model_and_tokenizer(seed=0)
    critic = Critic.from_policy(model)
    torch.nn.init.normal_(critic.head.proj.weight, std=0.1)
    trajs = groups_of_rollouts(n_groups=4, G=2, seed=5)  # the same 8 trajectories on every rank
    lengths = [t.num_generated() for t in trajs]
    g = torch.Generator().manual_seed(1)
    adv = [torch.randn(n, generator=g, dtype=torch.float64) for n in lengths]
    ret = [torch.randn(n, generator=g, dtype=torch.float64) for n in lengths]
    with torch.no_grad():  # old log-probs near the current policy's, so that ratios land on both sides of the clip
        b = pack(trajs, "recompute")[0]
        lp = PackedLM(model).logprobs(b, 0.7) + 0.1 * torch.randn(int(b.loss_mask.sum()), generator=g)
        old_lp = advantages.gather_per_trajectory([b], [lp], lengths)
    total = sum(lengths)
    # the reference: one process, every trajectory
    ref_policy, ref_critic = PackedLM(copy.deepcopy(model)), copy.deepcopy(critic)
    want_g, _ = update(ref_policy, ref_critic, trajs, old_lp, adv, ret, total, distributed.Dist(), budget=None)
    # sharded: rank 0 takes 3 trajectories in one batch, rank 1 the other 5 in several (uneven passes)
    mine = list(range(3)) if d.rank == 0 else list(range(3, 8))
    pick = lambda xs: [xs[i] for i in mine]  # noqa: E731
    fresh = copy.deepcopy(model), copy.deepcopy(critic)  # for the negative control below
    policy = distributed.shard(PackedLM(model), model.get_decoder().layers, d)
    critic = distributed.shard(critic, critic.decoder.layers, d)
    budget = None if d.rank == 0 else max(pack([t], "recompute")[0].num_tokens for t in trajs)
    got_g, passes = update(policy, critic, pick(trajs), pick(old_lp), pick(adv), pick(ret), total, d, budget)
    got_p, got_c = full_state_dict(policy.lm), full_state_dict(critic)
    want_p, want_c = ref_policy.lm.state_dict(), ref_critic.state_dict()
    moved = max(float((want_p[k] - model_k).abs().max()) for k, model_k in
                tiny_model_and_tokenizer(seed=0)[0].state_dict().items())
    diff = max([float((got_p[k] - want_p[k]).abs().max()) for k in want_p]
               + [float((got_c[k] - want_c[k]).abs().max()) for k in want_c])
    assert set(got_g) == set(want_g), sorted(set(got_g) ^ set(want_g))
    grad_rel = max(float((got_g[k] - want_g[k]).abs().max() / want_g[k].abs().max().clamp(min=1e-12))
                   for k in want_g)
    grad_scale = max(float(want_g[k].abs().max()) for k in want_g)
    # negative control: without the world-size loss scale FSDP2's averaging halves every gradient
    m2, c2 = fresh
    bad_g, _ = update(distributed.shard(PackedLM(m2), m2.get_decoder().layers, d),
                      distributed.shard(c2, c2.decoder.layers, d), pick(trajs), pick(old_lp), pick(adv), pick(ret),
                      total, d, budget, loss_scale=1.0)
    bad_rel = max(float((bad_g[k] - want_g[k]).abs().max() / want_g[k].abs().max().clamp(min=1e-12))
                  for k in want_g)
    (out / f"rank{d.rank}.json").write_text(json.dumps({
        "max_param_diff": diff, "moved": moved, "max_grad_rel_diff": grad_rel, "grad_scale": grad_scale,
        "unscaled_grad_rel_diff": bad_rel, "world": d.world, "sharded": type(policy).__name__,
        "batches": passes[0], "passes": passes[1]}))
    d.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
