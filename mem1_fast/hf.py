"""transformers integration: the `mem1_fast` attention implementation.

    import mem1_fast.hf  # registers "mem1_fast" with AttentionInterface and AttentionMaskInterface
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="mem1_fast")
    with mem1_fast.hf.visibility(vis):                   # one packed row, interval visibility
        out = model(input_ids=ids[None], position_ids=pos[None])
    out = model(input_ids=ids[None], position_ids=pos[None], visibility=vis)  # the same; torch.compile-able
    hidden = packed_hidden_states(model, ids, pos, vis)  # the same, returning the final hidden states [T, H]

Inside `visibility(vis)`, the registered mask function hands the `Visibility` to every layer as its mask (no mask
is built: no T x T work), and the attention runs `ops.state_attention` over the packed row. Anything else (a
padded batch, generation with a KV cache, a 4-D custom mask) runs transformers' SDPA path with SDPA's own mask
function, so padding is honoured (registering only the attention function would make transformers silently drop
the padding mask).

Under torch.compile pass the visibility as the `visibility=` keyword of the model's forward (transformers hands it
to every attention layer): compiled code cannot read the context variable, and `torch.compile(fullgraph=True)`
then traces the whole model, the registered op `torch.ops.mem1_fast.state_attention` included, without a break.
A compiled forward inside `visibility(vis)` without the keyword raises instead of silently attending causally.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .ops import state_attention
from .visibility import Visibility

NAME = "mem1_fast"
_ACTIVE: contextvars.ContextVar[Visibility | None] = contextvars.ContextVar("mem1_fast_visibility", default=None)
_OPEN = 0  # visibility() blocks open in any thread: a plain int compiled code can read (and guard on)
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def visibility(vis: Visibility):
    """Run the model's forward passes inside this block over one packed row with visibility `vis`."""
    global _OPEN
    token = _ACTIVE.set(vis)
    with _OPEN_LOCK:
        _OPEN += 1
    try:
        yield vis
    finally:
        with _OPEN_LOCK:
            _OPEN -= 1
        _ACTIVE.reset(token)


def mem1_fast_mask(*args, **kwargs):
    if torch.compiler.is_compiling():  # compiled code cannot read the context variable (see mem1_fast_attention)
        return sdpa_mask(*args, **kwargs)  # ignored by the attention when `visibility=` is given
    vis = _ACTIVE.get()
    return vis if vis is not None else sdpa_mask(*args, **kwargs)


def mem1_fast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    vis = attention_mask if isinstance(attention_mask, Visibility) else kwargs.get("visibility")
    if vis is None and _OPEN and torch.compiler.is_compiling():
        # a visibility() block is open (in some thread) and this compiled forward got no `visibility=`: most likely
        # the block is around it, which compiled code cannot see -- refuse rather than attend causally
        raise RuntimeError("mem1_fast: a compiled forward cannot see the visibility() block around it; pass "
                           "visibility=vis to the model's forward instead")
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
    AttentionMaskInterface.register(NAME, mem1_fast_mask)


register()


def packed_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor, vis: Visibility):
    """Final hidden states [T, H] of one packed row under visibility `vis`."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != NAME:
        raise ValueError(f"model must be created with attn_implementation='{NAME}', got "
                         f"{getattr(cfg, '_attn_implementation', None)!r}")
    if vis.T != input_ids.numel():
        raise ValueError(f"visibility covers {vis.T} tokens, the row has {input_ids.numel()}")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    with visibility(vis):
        out = base(input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False)
    return out.last_hidden_state[0]


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight
