"""Two-stage query selection (docs/model.md#two-stage): anchors per token, grid NMS on token positions, gathering.

Boxes are normalized cxcywh relative to each image's valid (unpadded) area; anchor boxes are returned in
logit space with +inf marking padded or invalid anchors (their sigmoid is 1, and they never win a match).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision
from torch import Tensor

from salience_detr.layers.grid_nms import GRID_RULE_IOU_RANGE, compiled_grid_nms, grid_nms_available
from salience_detr.layers.levels import cell_coordinates, flat_valid_sizes, host_shapes, token_levels

ANCHOR_BASE_SIZE = 0.05
ANCHOR_VALID_RANGE = (0.01, 0.99)
NMS_IOU_THRESHOLD = 0.3


def encoder_output_proposals(
    memory: Tensor, mask_flatten: Tensor, spatial_shapes: Tensor | Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """Anchor proposals for every token and the memory with padded/invalid tokens zeroed (docs/model.md#proposals).

    memory (B,N,C), mask_flatten (B,N) True=padding, spatial_shapes (L,2) as (H,W).
    Returns (masked_memory (B,N,C), anchor_logits (B,N,4)); the caller applies enc_output + LayerNorm.
    """
    dtype = torch.promote_types(memory.dtype, torch.float32)
    anchor_logits, keep = anchor_proposals(mask_flatten, spatial_shapes, dtype)
    return memory * keep, anchor_logits


def anchor_proposals(
    mask_flatten: Tensor, spatial_shapes: Tensor | Sequence[tuple[int, int]], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Anchor logits (B,N,4), +inf on padded or invalid anchors, and ``keep`` (B,N,1): True where the anchor is
    valid and the token is not padding (the memory is multiplied by it, so one product zeroes both).

    They depend on the padding and the layout alone, so the transformer computes them once per forward for both
    projections of the memory. Anchor of cell (i,j) at level l: centre ((j+0.5)/valid_w, (i+0.5)/valid_h), side
    0.05*2^l; valid iff all four numbers lie in (0.01, 0.99).
    """
    batch_size, device = mask_flatten.shape[0], mask_flatten.device
    shapes = host_shapes(spatial_shapes)
    # every level at once: cells (N, 2) as (x, y), each token's level scale and anchor side, one division
    counts = [height * width for height, width in shapes]
    scale = flat_valid_sizes(mask_flatten, shapes, dtype).index_select(1, token_levels(shapes, device))  # (B, N, 2)
    sides = np.repeat([ANCHOR_BASE_SIZE * 2.0**level for level in range(len(shapes))], counts)[:, None]
    sizes = torch.as_tensor(sides, dtype=dtype, device=device).expand(batch_size, -1, 2)
    proposals = torch.cat([cell_coordinates(shapes, 0.5, dtype, device) / scale, sizes], -1)
    low, high = ANCHOR_VALID_RANGE
    keep = ((proposals > low) & (proposals < high)).all(-1, keepdim=True) & ~mask_flatten.unsqueeze(-1)
    anchor_logits = torch.log(proposals / (1 - proposals))
    return anchor_logits.masked_fill(~keep, float("inf")), keep


@torch.no_grad()
def grid_nms(
    scores: Tensor,
    token_index: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    max_keep: int,
    *,
    num_tokens: int,
    iou_threshold: float = NMS_IOU_THRESHOLD,
) -> Tensor:
    """Redundancy removal on token positions (docs/model.md#proposal-nms), the same for an image in any batch.

    scores, token_index (B,k): candidate tokens (flat indices over all levels, ``num_tokens`` per image) and their
    max class logits, best first in each row (as ``torch.topk`` returns them; equal scores keep that order). Each
    token is the box (x - 1, y - 1, x + 1, y + 1) in its level's grid units; NMS runs per (image, level).
    Returns (B, Q) flat token indices, Q = min(max_keep, k) for every image: its NMS survivors in score order, then,
    only if it has fewer than ``max_keep`` of them, its suppressed candidates in score order. With at least
    ``max_keep`` survivors (the official code's only case) these are its first survivors. No value is read back to
    the host: the size is fixed and the compiled op gives the keep mask.
    """
    num_candidates = token_index.shape[1]
    keep = nms_keep_mask(scores.float(), token_index, spatial_shapes, level_start_index, num_tokens, iou_threshold)
    position = torch.arange(num_candidates, device=token_index.device)
    key = position + num_candidates * keep.logical_not()  # distinct: survivors first, each part in score order
    rank = key.topk(min(max_keep, num_candidates), dim=1, largest=False, sorted=True).indices
    return token_index.gather(1, rank)


def nms_keep_mask(
    scores: Tensor,
    token_index: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    num_tokens: int,
    iou_threshold: float = NMS_IOU_THRESHOLD,
) -> Tensor:
    """(B, k) bool: which candidates (best first in each row) survive NMS; the compiled op when it applies.

    torchvision's NMS gives the same mask and runs instead while tracing for ONNX (it has an ONNX symbolic), when
    the op is not built, or for a threshold outside the grid rule's range (``GRID_RULE_IOU_RANGE``).
    """
    low, high = GRID_RULE_IOU_RANGE
    if torch.jit.is_tracing() or not low < iou_threshold < high or not grid_nms_available(token_index.device)[0]:
        return torchvision_keep_mask(scores, token_index, spatial_shapes, level_start_index, iou_threshold)
    return compiled_grid_nms(token_index, spatial_shapes, level_start_index, num_tokens)


def torchvision_keep_mask(
    scores: Tensor,
    token_index: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    iou_threshold: float = NMS_IOU_THRESHOLD,
) -> Tensor:
    """``nms_keep_mask`` with ``torchvision.ops.batched_nms`` on the tokens' grid boxes, one group per (image, level).

    On CUDA torchvision copies its suppression mask to the host: one sync, which the compiled op avoids.
    """
    batch_size, num_candidates = scores.shape
    flat_index = token_index.reshape(-1)
    level = torch.searchsorted(level_start_index, flat_index, right=True) - 1
    width = spatial_shapes[level, 1]
    cell = flat_index - level_start_index[level]
    x = (cell % width).to(scores.dtype)
    y = torch.div(cell, width, rounding_mode="trunc").to(scores.dtype)
    boxes = torch.stack([x - 1.0, y - 1.0, x + 1.0, y + 1.0], -1)
    image = torch.arange(batch_size, device=scores.device).repeat_interleave(num_candidates)
    groups = level + spatial_shapes.shape[0] * image
    keep = torchvision.ops.batched_nms(boxes, scores.reshape(-1), groups, iou_threshold)
    mask = torch.zeros(batch_size * num_candidates, dtype=torch.bool, device=scores.device)
    return mask.scatter(0, keep, torch.ones_like(keep, dtype=torch.bool)).view(batch_size, num_candidates)


def select_proposals(
    enc_class: Tensor,
    enc_coord: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    num_queries: int,
    query_order: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-4Q tokens by max class logit -> grid NMS -> Q' = min(Q, N) tokens; gathers their class logits and boxes.

    enc_class (B,N,K), enc_coord (B,N,4). Returns (index (B,Q'), class (B,Q',K), coord (B,Q',4)).
    ``query_order`` (B, Q) gathers those tokens, in that order, instead of the own choice, which is still returned
    as ``index``: a parity check runs the decoder on a reference's queries, so near-tied swaps cannot blur it.
    """
    num_candidates = min(4 * num_queries, enc_class.shape[1])
    top_scores, top_index = torch.topk(enc_class.max(-1)[0], num_candidates, dim=1)
    index = grid_nms(
        top_scores, top_index, spatial_shapes, level_start_index, num_queries, num_tokens=enc_class.shape[1]
    )
    if query_order is None:
        return gather_proposals(enc_class, enc_coord, index)
    return index, *gather_proposals(enc_class, enc_coord, query_order.to(index.device))[1:]


def gather_proposals(enc_class: Tensor, enc_coord: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(index, enc_class[index], enc_coord[index])`` per image: the outputs of the tokens chosen as queries."""
    gathered_class = enc_class.gather(1, index.unsqueeze(-1).expand(-1, -1, enc_class.shape[-1]))
    gathered_coord = enc_coord.gather(1, index.unsqueeze(-1).expand(-1, -1, enc_coord.shape[-1]))
    return index, gathered_class, gathered_coord
