"""transformers integration: the `mem1_fast` attention implementation.

    import mem1_fast.hf  # registers "mem1_fast" with AttentionInterface and AttentionMaskInterface
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="mem1_fast")
    hidden = packed_hidden_states(model, batch)          # packed batch, interval visibility, per-token positions

When the attention mask handed to a layer is a `Visibility`, the layer runs `ops.state_attention` over the packed
batch. Anything else (a padded batch, generation with a KV cache, a 4-D custom mask) runs transformers' SDPA path
with the mask built by SDPA's own mask function, so padding is honoured (registering only the attention function
would make transformers silently drop the padding mask).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .ops import state_attention
from .visibility import Visibility

NAME = "mem1_fast"


def mem1_fast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    vis = attention_mask if isinstance(attention_mask, Visibility) else kwargs.get("visibility")
    if vis is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"mem1_fast attention with a Visibility expects one packed row (batch 1), got batch "
                         f"{query.shape[0]}")
    if dropout and module.training:
        raise ValueError("mem1_fast attention does not implement attention dropout")
    # [1, H, T, D] -> [T, H, D]
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = state_attention(q, k, v, vis, scale=scaling)
    return out.unsqueeze(0), None  # [1, T, Hq, D], as transformers expects


def register() -> None:
    AttentionInterface.register(NAME, mem1_fast_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()


def packed_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor, visibility: Visibility):
    """Final hidden states [T, H] of one packed row. The Visibility is passed as the prepared mask of every layer
    type, so transformers builds no mask of its own (no T x T work) and each layer's attention gets the spec."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != NAME:
        raise ValueError(f"model must be created with attn_implementation='{NAME}', got "
                         f"{getattr(cfg, '_attn_implementation', None)!r}")
    masks = {t: visibility for t in set(getattr(cfg, "layer_types", None) or ["full_attention"])}
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = base(input_ids=input_ids[None], position_ids=position_ids[None], attention_mask=masks, use_cache=False)
    return out.last_hidden_state[0]


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight
