"""Multi-head self-attention computed from the weights of an ``nn.MultiheadAttention``, in fewer ATen calls.

The encoder and the decoder keep torch's module (its state-dict keys are the official checkpoint's) but call
:func:`multihead_self_attention`: torch's forward projects non-contiguous 3-D tensors (a copy, a matmul and a
separate bias add per projection, the shared query/key input transposed twice) and converts a boolean mask on
every call. Here the batch-first rows are projected as they lie (no layout copy), query and key, which share their
input, come from one ``addmm`` on the first two thirds of the packed weight, and a mask is converted once per stack
of layers (:func:`additive_mask`). Values and gradients equal torch's ``need_weights=False`` path up to float
rounding (the weight gradients sum the rows in another order).
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
    inputs, equal up to float rounding; ``mask``: an additive (Q, Q) float mask from :func:`additive_mask`.
    """
    _check_module(attention)
    batch, length, embed = query_key.shape
    heads = attention.num_heads
    head_dim = embed // heads
    weight_qk, weight_v = attention.in_proj_weight.split([2 * embed, embed])
    bias_qk, bias_v = attention.in_proj_bias.split([2 * embed, embed])
    qk = F.linear(query_key.reshape(-1, embed), weight_qk, bias_qk).view(batch, length, 2, heads, head_dim)
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, Q, head_dim) views, no copy
    v = F.linear(value.reshape(-1, embed), weight_v, bias_v).view(batch, length, heads, head_dim).transpose(1, 2)
    dropout = attention.dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, mask, dropout).transpose(1, 2).reshape(-1, embed)
    return F.linear(out, attention.out_proj.weight, attention.out_proj.bias).view(batch, length, embed)
