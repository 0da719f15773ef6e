"""The README's drop-in examples for other trainers, against the formulas those trainers compute from logits.

TRL's GRPOTrainer: per-token log-probs of logits / temperature (selective_log_softmax), the clipped ratio loss
-min(r A, clip(r, 1 - eps, 1 + eps) A) plus beta * k3 KL, aggregated by loss_type ("grpo": per-sequence mean then
batch mean; "bnpo": mean over the batch's tokens; "dr_grpo": sum / (batch * max_completion_length)).
verl's actor: log_probs = log_softmax(logits / T) at the labels, entropy = logsumexp(logits / T) - sum(softmax *
logits / T) -- what its fused `linear_cross_entropy(hidden, weight, labels, temperature)` returns.
The formulas below are written from those trainers' definitions, over full [B, L, V] logits."""
import pytest
import torch

from mem1_fast.ops import logprob_entropy, ppo_loss


# --- TRL GRPO -----------------------------------------------------------------------------------------------------
def trl_grpo_loss(logits, completion_ids, completion_mask, advantages, old_logps, ref_logps, beta, epsilon,
                  loss_type, max_completion_length):
    logps = torch.log_softmax(logits.double(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
    if beta:
        d = ref_logps - logps
        per_token_loss = per_token_loss + beta * (torch.exp(d) - d - 1)
    m = completion_mask
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_completion_length)


def grpo_loss_from_hidden(hidden, lm_head_weight, completion_ids, completion_mask, advantages, old_logps, ref_logps,
                          beta=0.04, epsilon=0.2, temperature=1.0, loss_type="grpo", max_completion_length=None):
    """The README's TRL example: the same loss from hidden states [B, L, H], the logits never formed."""
    B, L = completion_ids.shape
    keep = completion_mask.bool().reshape(-1)  # only the completion tokens reach the LM head
    m = completion_mask.float()
    weights, normalizer = {
        "grpo": ((1 / m.sum(-1).clamp(min=1))[:, None].expand(B, L), B),  # per-sequence mean
        "bnpo": (torch.ones_like(m), m.sum().clamp(min=1)),
        "dr_grpo": (torch.ones_like(m), B * (max_completion_length or L)),
    }[loss_type]
    loss, logp, entropy = ppo_loss(
        hidden.reshape(B * L, -1)[keep], lm_head_weight, completion_ids.reshape(-1)[keep],
        old_logps.reshape(-1)[keep], advantages[:, None].expand(B, L).reshape(-1)[keep],
        ref_logp=ref_logps.reshape(-1)[keep], temperature=temperature, clip_eps=epsilon, kl_coef=beta,
        normalizer=float(normalizer), token_weights=weights.reshape(-1)[keep])
    return loss


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_trl_grpo_loss_from_hidden_states(loss_type, backend, monkeypatch):
    if backend:
        monkeypatch.setenv("MEM1_FAST_PPO_BACKEND", backend)
    torch.manual_seed(7)
    B, L, H, V, tau = 3, 9, 16, 120, 0.9
    hidden = torch.randn(B, L, H, dtype=torch.float64)
    weight = (0.3 * torch.randn(V, H, dtype=torch.float64)).requires_grad_()
    hidden.requires_grad_()
    ids = torch.randint(0, V, (B, L))
    mask = torch.ones(B, L)
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        logits = (hidden @ weight.T) / tau
        logps = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = logps + 0.3 * torch.randn(B, L, dtype=torch.float64)  # ratios inside and outside the clip range
    ref = logps + 0.2 * torch.randn(B, L, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    want = trl_grpo_loss((hidden @ weight.T) / tau, ids, mask, adv, old, ref, 0.04, 0.2, loss_type, 12)
    gw_want, gh_want = torch.autograd.grad(want, (weight, hidden))
    got = grpo_loss_from_hidden(hidden, weight, ids, mask, adv.float(), old.float(), ref.float(), beta=0.04,
                                temperature=tau, loss_type=loss_type, max_completion_length=12)
    gw, gh = torch.autograd.grad(got, (weight, hidden))
    assert abs(float(got.detach()) - float(want.detach())) < 1e-5 * max(1.0, abs(float(want.detach())))
    assert (gw - gw_want).abs().max() < 1e-5 and (gh - gh_want).abs().max() < 1e-5
    assert gh[2, 2:].abs().max() == 0  # masked tokens get no gradient
    # negative control: the other aggregations give another loss
    other = trl_grpo_loss((hidden @ weight.T) / tau, ids, mask, adv, old, ref, 0.04, 0.2,
                          "bnpo" if loss_type != "bnpo" else "grpo", 12)
    assert abs(float(other.detach()) - float(want.detach())) > 1e-3


# --- verl actor ---------------------------------------------------------------------------------------------------
def verl_logprobs_entropy(logits, labels):
    logits = logits.double()
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    pd = torch.softmax(logits, -1)
    entropy = torch.logsumexp(logits, -1) - (pd * logits).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_actor_logprobs_and_entropy_from_hidden_states(dtype):
    """verl's actor with `use_fused_kernels`: (log_probs, entropy) = linear_cross_entropy(hidden, weight, labels,
    temperature) over the unpadded tokens; mem1_fast's op takes the same four arguments."""
    torch.manual_seed(8)
    T, H, V, tau = 50, 32, 500, 0.7
    hidden = torch.randn(T, H).to(dtype).requires_grad_()
    weight = (0.2 * torch.randn(V, H)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,))
    log_probs, entropy = logprob_entropy(hidden, weight, labels, tau)  # the README's verl example
    want_lp, want_ent = verl_logprobs_entropy((hidden.double() @ weight.double().T) / tau, labels)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (log_probs - want_lp).abs().max() < tol * max(1.0, want_lp.abs().max())
    assert (entropy - want_ent).abs().max() < tol * max(1.0, want_ent.abs().max())
    # gradients of a verl-style objective: pg term on log_probs minus an entropy bonus
    adv = torch.randn(T)
    g = torch.autograd.grad((-(adv * log_probs) - 0.01 * entropy).mean(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lp, ent = verl_logprobs_entropy((h64 @ w64.T) / tau, labels)
    g_want = torch.autograd.grad((-(adv.double() * lp) - 0.01 * ent).mean(), (h64, w64))
    for a, b in zip(g, g_want):
        assert (a.double() - b).abs().max() < tol * max(1.0, b.abs().max())
