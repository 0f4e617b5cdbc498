"""Salience scoring and hierarchical token filtering before the encoder (docs/model.md#salience-scores, #token-ranking).

Every token gets a salience logit from a small MLP; coarse levels modulate the scoring of finer levels
(top-down fusion); per-level keep counts and one global descending ranking then give each encoder layer a
nested prefix of tokens to update. Ratios and truncations follow the official code so the same tokens are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience_detr.layers.levels import flatten_levels, host_ints, host_shapes

__all__ = ["MaskPredictor", "TokenBudgets", "salience_maps", "select_salient_tokens", "token_budgets"]


class MaskPredictor(nn.Module):
    """Token salience MLP; half of its hidden features is replaced by their mean over the level (global context).

    ``forward(x)`` takes one level's tokens (B, N_l, C) and returns logits (B, N_l, 1). The mean runs over all
    tokens of the level, padding included, as in the official model.
    """

    def __init__(self, in_dim: int = 256, hidden_dim: int = 256) -> None:
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(f"hidden_dim must be divisible by 4, got {hidden_dim}")
        self.hidden_dim = hidden_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2),
            nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4),
            nn.GELU(),
            nn.Linear(hidden_dim // 4, 1),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # True on the hidden features that take their level mean (not in the state dict)
        self.register_buffer("global_features", torch.arange(hidden_dim) >= hidden_dim // 2, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # the linears run on (rows, C) matrices (one addmm each); only the level mean needs the (B, N_l) layout
        batch, tokens, channels = x.shape
        z = self.layer1(x.reshape(-1, channels)).view(batch, tokens, self.hidden_dim)
        # one selection instead of a split, an expand and a concatenation (the local half's mean is not used)
        fused = torch.where(self.global_features, z.mean(dim=1, keepdim=True), z).view(-1, self.hidden_dim)
        return self.layer2(fused).view(batch, tokens, 1)


def _level_slices(
    spatial_shapes: Tensor | Sequence[tuple[int, int]], level_start_index: Tensor | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """(start, end, H, W) of each level in the flattened token axis (no sync when given host lists)."""
    shapes = host_shapes(spatial_shapes)
    starts = host_ints(level_start_index)
    return [(start, start + h * w, h, w) for start, (h, w) in zip(starts, shapes)]


def salience_maps(
    memory: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    level_start_index: Tensor | Sequence[int],
    predictor: MaskPredictor,
    alpha: Tensor,
) -> list[Tensor]:
    """Per-level salience logit maps, predicted coarse to fine with top-down fusion (docs/model.md#top-down-fusion).

    ``memory`` (B, N, C) is the scoring memory (enc_output + LayerNorm of feature + position + level embedding).
    The coarsest level is scored directly; each finer level l is first modulated as
    ``m_l + m_l * up(s_{l+1}) * alpha[l]`` with ``up`` bilinear (align_corners=True) on the raw logits.
    Returns [(B, 1, H_l, W_l)] ordered finest first, unmasked.
    """
    levels = _level_slices(spatial_shapes, level_start_index)
    if alpha.numel() != len(levels) - 1:
        raise ValueError(f"alpha needs one weight per receiving level ({len(levels) - 1}), got {alpha.numel()}")
    batch = memory.shape[0]
    alphas = alpha.unbind()  # one call, not an indexing per level
    maps: list[Tensor] = []
    coarser = None
    for level in range(len(levels) - 1, -1, -1):
        start, end, height, width = levels[level]
        level_memory = memory[:, start:end]
        if coarser is not None:
            upsampled = F.interpolate(coarser, size=(height, width), mode="bilinear", align_corners=True)
            upsampled = upsampled.view(batch, 1, height * width).transpose(1, 2)
            level_memory = torch.addcmul(level_memory, level_memory, upsampled * alphas[level])
        coarser = predictor(level_memory).transpose(1, 2).reshape(batch, 1, height, width)
        maps.append(coarser)
    return maps[::-1]


class TokenBudgets(NamedTuple):
    """How many tokens the encoder updates, as host ints (docs/model.md#token-ranking)."""

    per_image: list[int]  # focus_token_nums: each image's own budget, summed over levels
    level_k: list[int]  # each level's top-k: the batch maximum of the images' keep counts
    layer_counts: list[int]  # each encoder layer's prefix of the M = sum(level_k) ranked tokens


def _truncate(counts: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """``int(count * ratio)`` computed in float32, like the official float32 buffers (even after ``.double()``)."""
    return (counts.astype(np.float32) * np.asarray(ratios, dtype=np.float32)).astype(np.int64)


def token_budgets(
    valid_counts: Sequence[Sequence[int]], level_filter_ratio: Sequence[float], layer_filter_ratio: Sequence[float]
) -> TokenBudgets:
    """The keep counts from the (B, L) valid tokens of every image and level, on the host: no value is read back,
    so the top-k sizes and prefix lengths are known before any device work."""
    focus = _truncate(np.asarray(valid_counts, dtype=np.int64).reshape(len(valid_counts), -1), level_filter_ratio)
    level_max = focus.max(0)
    layer_counts = _truncate(level_max.sum(), layer_filter_ratio)
    return TokenBudgets(focus.sum(-1).tolist(), level_max.tolist(), layer_counts.tolist())


def _host_floats(values: Tensor | Sequence[float]) -> list[float]:
    """Filter ratios as Python floats: free for the host copies the transformer passes, one read for a tensor."""
    return [float(value) for value in (values.tolist() if isinstance(values, Tensor) else values)]


def _check_levels(
    salience: Sequence[Tensor],
    level_masks: Sequence[Tensor],
    num_starts: int,
    num_ratios: int,
    valid_counts: Sequence[Sequence[int]] | None,
) -> None:
    if not (len(salience) == len(level_masks) == num_starts == num_ratios):
        raise ValueError(
            f"salience ({len(salience)}), level_masks ({len(level_masks)}), level_start_index "
            f"({num_starts}) and level_filter_ratio ({num_ratios}) must all have one entry per level"
        )
    for level, (scores, mask) in enumerate(zip(salience, level_masks)):
        if scores.shape[0] != mask.shape[0] or scores.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"level {level}: salience {tuple(scores.shape)} does not match mask {tuple(mask.shape)}")
    batch = level_masks[0].shape[0]
    if valid_counts is not None and (len(valid_counts) != batch or any(len(row) != num_ratios for row in valid_counts)):
        raise ValueError(
            f"valid_counts must hold {num_ratios} counts (one per level) for each of the {batch} images, got "
            f"{[len(row) for row in valid_counts]}; compute them with meta_arch.level_valid_counts"
        )


def select_salient_tokens(
    salience: Sequence[Tensor],
    level_masks: Sequence[Tensor],
    level_start_index: Tensor | Sequence[int],
    level_filter_ratio: Tensor | Sequence[float],
    layer_filter_ratio: Tensor | Sequence[float],
    valid_counts: Sequence[Sequence[int]] | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Rank tokens by salience and give every encoder layer its prefix of the ranking (docs/model.md#token-ranking).

    Per image and level ``int(valid_tokens * level_filter_ratio[l])`` tokens are kept; each level takes the
    batch maximum of that with ``topk`` (padding scored at the level's minimum logit), the picks of all levels
    are sorted by score descending into one ranking of length M, and layer i gets its first
    ``int(M * layer_filter_ratio[i])`` entries. ``valid_counts`` (B, L) host ints, the unpadded tokens of each
    image and level, make the budgets host work; without them they are counted on the masks and read once.

    Returns ``foreground_score`` (B, N): flattened logits with padding set to their global minimum (as the
    official code passes them to the encoder), ``focus_token_nums`` (B,) int64: the per-image budget, and
    ``layer_indices``: one (B, M_i) int64 tensor of flattened token indices per layer.
    """
    starts = host_ints(level_start_index)
    level_ratios = _host_floats(level_filter_ratio)
    _check_levels(salience, level_masks, len(starts), len(level_ratios), valid_counts)
    if valid_counts is None:
        valid_counts = torch.stack([(~mask).sum((1, 2)) for mask in level_masks], dim=-1).tolist()
    budgets = token_budgets(valid_counts, level_ratios, _host_floats(layer_filter_ratio))
    focus_token_nums = torch.tensor(budgets.per_image, dtype=torch.int64, device=salience[0].device)

    picked_scores, picked_indices = [], []
    for scores, mask, k, start in zip(salience, level_masks, budgets.level_k, starts):
        flat = scores.flatten(1)
        ranked = flat.masked_fill(mask.flatten(1), flat.min())
        top_scores, top_indices = ranked.topk(k, dim=1)
        picked_scores.append(top_scores)
        picked_indices.append(top_indices + start)
    order = torch.sort(torch.cat(picked_scores, 1), dim=1, descending=True)[1]
    ranking = torch.cat(picked_indices, 1).gather(1, order)

    layer_indices = [ranking[:, :count] for count in budgets.layer_counts]

    foreground_score = torch.cat([scores.flatten(1) for scores in salience], 1)
    mask_flatten = flatten_levels(level_masks)
    foreground_score = foreground_score.masked_fill(mask_flatten, foreground_score.min())
    return foreground_score, focus_token_nums, layer_indices
