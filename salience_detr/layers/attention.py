"""Multi-head self-attention computed from the weights of an ``nn.MultiheadAttention``, in fewer ATen calls.

The decoder keeps torch's module (its state-dict keys are the official checkpoint's) but calls
:func:`multihead_self_attention`: torch's forward projects non-contiguous 3-D tensors (a copy, a matmul and a
separate bias add per projection, the shared query/key input transposed twice) and converts a boolean mask on
every call. Here each input is laid out sequence-first once, the projections are single ``addmm`` calls and a mask
is converted once per stack of layers (:func:`additive_mask`). Values and gradients are bit-identical to torch's
``need_weights=False`` path (the weight gradients sum the rows in its order), which the seeded loss curve needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["additive_mask", "multihead_self_attention"]


def additive_mask(blocked: Tensor, dtype: torch.dtype) -> Tensor:
    """Float mask to add to attention logits: ``-inf`` where ``blocked`` (bool, True = may not attend), else 0."""
    if blocked.dtype != torch.bool:
        raise ValueError(f"blocked must be a bool mask (True = may not attend), got {blocked.dtype}")
    return torch.zeros_like(blocked, dtype=dtype).masked_fill_(blocked, float("-inf"))


def _check_module(attention: nn.MultiheadAttention) -> None:
    if not attention.batch_first or not attention._qkv_same_embed_dim or attention.in_proj_bias is None:
        raise ValueError(
            "multihead_self_attention needs nn.MultiheadAttention(embed_dim, num_heads, batch_first=True) with its "
            "packed in-projection and biases; build the module with those arguments"
        )
    if attention.bias_k is not None or attention.add_zero_attn:
        raise ValueError("multihead_self_attention does not support add_bias_kv or add_zero_attn; build without them")


def multihead_self_attention(
    attention: nn.MultiheadAttention, query_key: Tensor, value: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``attention(query_key, query_key, value, attn_mask=mask, need_weights=False)[0]`` for batch-first (B, Q, C)
    inputs, with the same values and gradients; ``mask``: an additive (Q, Q) float mask from :func:`additive_mask`.
    """
    _check_module(attention)
    batch, length, embed = query_key.shape
    heads = attention.num_heads
    head_dim = embed // heads
    weights = attention.in_proj_weight.chunk(3)
    biases = attention.in_proj_bias.chunk(3)
    # sequence-first rows as in torch's module (the weight gradients sum the rows in its order), one copy each
    rows = query_key.transpose(0, 1).reshape(-1, embed), value.transpose(0, 1).reshape(-1, embed)
    split = (batch, heads, length, head_dim)
    q, k, v = (
        F.linear(x, w, b).view(length, batch * heads, head_dim).transpose(0, 1).view(split)
        for x, w, b in zip((rows[0], rows[0], rows[1]), weights, biases)
    )
    dropout = attention.dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, mask, dropout).permute(2, 0, 1, 3)
    out = F.linear(out.reshape(-1, embed), attention.out_proj.weight, attention.out_proj.bias)
    return out.view(length, batch, embed).transpose(0, 1)
