"""Sine and learned position embeddings for feature maps and boxes.

Described in docs/model.md#position-embedding, #background-embedding and #decoder (the box embedding).

Numerics follow the official Salience DETR code so converted checkpoints reproduce its outputs: the sine
map embedding counts positions from 1 with an offset of -0.5 and puts y before x; the box embedding swaps
the first two coordinates (order y, x, w, h); the learned embedding puts x (columns) first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .levels import host_cell_coordinates

__all__ = ["PositionEmbeddingSine", "PositionEmbeddingLearned", "get_sine_pos_embed", "sine_frequencies"]


def sine_frequencies(
    num_pos_feats: int, temperature: float, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """``temperature ** (2 * floor(i / 2) / num_pos_feats)`` for i in [0, num_pos_feats): one rate per sin/cos pair."""
    index = torch.arange(num_pos_feats, dtype=dtype, device=device)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_pos_feats)


def _sin_cos_pairs(angles: Tensor) -> Tensor:
    """``[sin(a0), cos(a0), sin(a1), cos(a1), ...]`` along the last dim: one angle per sin/cos pair.

    The official code computes every angle twice (the frequencies come in equal pairs) and takes the sine of the
    even ones and the cosine of the odd ones; the angles are the same numbers, so this is bit-identical.
    """
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR sine embedding of a padded feature map, normalised to each image's valid extent.

    ``forward(mask)`` takes the level's padding mask (B, H, W), True on padding, and returns (B, 2F, H, W),
    y channels first; ``flat(masks)`` embeds every level at once as flattened tokens. It is computed in the dtype of
    the ``dim_tx`` buffer, so ``.double()`` gives float64.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = -0.5,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.register_buffer("dim_tx", sine_frequencies(num_pos_feats, temperature))
        self.register_buffer("dim_ty", sine_frequencies(num_pos_feats, temperature))
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """(B, 2F, H, W) embedding of one level."""
        return self.flat([mask]).view(*mask.shape, -1).permute(0, 3, 1, 2)

    def flat(self, masks: Sequence[Tensor]) -> Tensor:
        """(B, N, 2F) embedding of every level's cells, row-major and levels concatenated like the transformer's
        tokens: the sines of all levels are computed once, on their concatenated positions."""
        positions = torch.cat([self._positions(mask).flatten(1, 2) for mask in masks], 1)  # (B, N, 2) as (y, x)
        # y and x in one pass: (B, N, 2, F/2) angles from one rate per sin/cos pair, y channels first
        rates = torch.stack((self.dim_ty[0::2], self.dim_tx[0::2]))
        return _sin_cos_pairs(positions[..., None] / rates).flatten(-2)

    def _positions(self, mask: Tensor) -> Tensor:
        """(B, H, W, 2) (y, x) position of every cell, counted over the unpadded cells and normalised."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a (B, H, W) bool tensor (True = padding), got {mask.dtype} {tuple(mask.shape)}"
            )
        not_mask = (~mask).to(self.dim_tx.dtype)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        else:
            y_embed = y_embed + self.offset
            x_embed = x_embed + self.offset
        return torch.stack((y_embed, x_embed), dim=-1)


def get_sine_pos_embed(
    pos: Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000,
    exchange_xy: bool = True,
    scale: float = 2 * math.pi,
    pair_rates: Tensor | None = None,
) -> Tensor:
    """Sine embedding of each of the n coordinates in ``pos`` (..., n) -> (..., n * num_pos_feats).

    Coordinates are multiplied by ``scale`` (2*pi) before dividing by the frequencies. With ``exchange_xy`` the
    first two coordinate blocks are swapped, so boxes (cx, cy, w, h) embed as (y, x, w, h) like the official code.
    ``pair_rates``: ``sine_frequencies(num_pos_feats, temperature)[0::2]`` kept by a caller that embeds in every
    layer (a buffer), so the frequencies are not rebuilt on each call.
    """
    if exchange_xy and pos.shape[-1] < 2:
        raise ValueError(f"exchange_xy needs at least 2 coordinates in the last dim, got shape {tuple(pos.shape)}")
    if pair_rates is None:
        pair_rates = sine_frequencies(num_pos_feats, temperature, dtype=pos.dtype, device=pos.device)[0::2]
    elif pair_rates.shape != (num_pos_feats // 2,):
        raise ValueError(
            f"pair_rates must hold num_pos_feats // 2 = {num_pos_feats // 2} rates "
            f"(sine_frequencies(num_pos_feats, temperature)[0::2]), got shape {tuple(pair_rates.shape)}"
        )
    if exchange_xy:  # swapping the two coordinates swaps their embedding blocks: one gather, not three slices
        pos = pos.index_select(-1, torch.as_tensor([1, 0, *range(2, pos.shape[-1])], device=pos.device))
    return _sin_cos_pairs(pos.unsqueeze(-1) * scale / pair_rates).flatten(-2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embedding of a (H, W) grid: ``concat(col_embed[j], row_embed[i])``, x first.

    Rows/columns beyond ``num_embeddings`` reuse the last entry, so maps larger than the table still run
    (the official code crashes there).
    """

    def __init__(self, num_embeddings: int = 200, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.row_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.col_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, height: int, width: int) -> Tensor:
        """(2F, H, W) embedding of one map."""
        return self.cells([(height, width)]).view(height, width, -1).permute(2, 0, 1)

    def cells(self, shapes: Sequence[tuple[int, int]]) -> Tensor:
        """(N, 2F) embedding of every cell of every level (row-major, levels concatenated) in two lookups: the
        clamped cell positions come from the host, so no arange, clamp or broadcast runs per level."""
        positions = np.minimum(host_cell_coordinates(shapes), self.num_embeddings - 1)
        device = self.row_embed.weight.device
        x_emb = self.col_embed(torch.as_tensor(positions[:, 0], device=device))
        y_emb = self.row_embed(torch.as_tensor(positions[:, 1], device=device))
        return torch.cat((x_emb, y_emb), dim=-1)
