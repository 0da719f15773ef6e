"""The `mem1_fast` transformers attention: packed rows with interval visibility, and padded batches."""
import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from mem1_fast.hf import NAME, lm_head_weight, packed_hidden_states
from mem1_fast.tiny import tiny_qwen2
from mem1_fast.visibility import Visibility


def causal_packed(lengths):
    lo, hi, pos = [], [], []
    off = 0
    for n in lengths:
        for p in range(n):
            lo.append([off]); hi.append([off + p + 1]); pos.append(p)
        off += n
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return Visibility(torch.tensor(lo, dtype=torch.int32), torch.tensor(hi, dtype=torch.int32), cu), torch.tensor(pos)


def llama(vocab):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    m.config._attn_implementation = NAME
    return m


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_equals_separate_sdpa_forward_and_backward(arch):
    V = 97
    torch.manual_seed(0)
    model = tiny_qwen2(V, init_std=0.1) if arch == "qwen2" else llama(V)
    lengths = [7, 1, 12, 5]
    ids = [torch.randint(0, V, (n,)) for n in lengths]
    vis, pos = causal_packed(lengths)
    packed = torch.cat(ids)
    h = packed_hidden_states(model, packed, pos, vis)
    loss = (h @ lm_head_weight(model).T).logsumexp(-1).sum()
    loss.backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config._attn_implementation = "sdpa"
    hs = [model.model(input_ids=x[None]).last_hidden_state[0] for x in ids]
    ref = torch.cat(hs)
    (ref @ lm_head_weight(model).T).logsumexp(-1).sum().backward()
    assert (h - ref).abs().max() < 1e-5
    for n, p in model.named_parameters():
        assert (g_packed[n] - p.grad).abs().max() <= 1e-4 * max(1.0, p.grad.abs().max()), n


def test_padded_batch_honours_padding():
    V = 50
    model = tiny_qwen2(V, init_std=0.1).eval()
    ids = torch.randint(3, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        model.config._attn_implementation = "sdpa"
        ref = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, 4:]).logits
    assert (ours - ref).abs().max() < 1e-5
    assert (ours[1, -1] - alone[0, -1]).abs().max() < 1e-4


def test_negative_control_without_mask_registration():
    """Registering only the attention function (no AttentionMaskInterface entry) silently drops padding."""
    from mem1_fast.hf import mem1_fast_attention
    AttentionInterface.register("mem1_nomask", mem1_fast_attention)
    V = 50
    model = tiny_qwen2(V, init_std=0.1, attn_implementation="mem1_nomask").eval()
    ids = torch.randint(3, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        broken = model(input_ids=ids, attention_mask=mask).logits
        model.config._attn_implementation = "sdpa"
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert (broken[1] - ref[1]).abs().max() > 1e-3


def test_requires_the_registered_implementation():
    model = tiny_qwen2(20)
    model.config._attn_implementation = "sdpa"
    vis, pos = causal_packed([3])
    with pytest.raises(ValueError, match="attn_implementation='mem1_fast'"):
        packed_hidden_states(model, torch.tensor([1, 2, 3]), pos, vis)


@pytest.mark.parametrize("mode", ["recompute", "retain"])
def test_activation_checkpointing_keeps_the_visibility(mode):
    """With transformers' gradient checkpointing each layer runs again in the backward pass, after the
    `visibility(...)` block has exited: the layers get the Visibility as their mask argument, so the recomputed
    attention is the same and so are the gradients (--activation-checkpointing)."""
    from test_pack import groups_of_rollouts

    from mem1_fast.consolidation import pack
    from mem1_fast.scoring import PackedLM
    from mem1_fast.tiny import tiny_model_and_tokenizer
    b = pack(groups_of_rollouts(n_groups=2, G=2, seed=4), mode)[0]
    grads = []
    for ckpt in (False, True):
        model, _ = tiny_model_and_tokenizer(seed=3)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        PackedLM(model).logprobs(b, 0.7).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert ((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item() < 1e-6
