"""Which queries the RoI head refines, and which refined rows train on which ground-truth box.

The counterpart of detectron2's ``ROIHeads.label_and_sample_proposals``: the decoder's top queries take the place
of the proposals, the Hungarian matching that of the proposal-to-box matcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert

from salience_detr.layers.box_ops import paired_iou_giou

from ..criterion import MatchIndices
from .structures import RoIRefinement


def select_queries(logits: Tensor, num_rois: int, extra: Tensor | None = None) -> Tensor:
    """(B, Q) bool: the top-``num_rois`` queries by maximum sigmoid class score, OR ``extra`` (e.g. matched ones)."""
    scores = logits.detach().sigmoid().amax(-1)
    top = scores.topk(min(num_rois, scores.shape[1]), dim=1).indices
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, torch.ones_like(top, dtype=torch.bool))
    return selected if extra is None else selected | extra


def selected_rows(selected: Tensor, max_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(batch_index, query_index, valid) of the refined rows: the ``selected`` (B, Q) queries in image-major order,
    then unselected ones up to ``max_rows`` rows (``valid`` False), so the row count is a host value and nothing
    is read back. ``max_rows`` must bound the selected count; None counts them (one host read)."""
    flat = selected.flatten()
    num_rows = int(flat.sum()) if max_rows is None else min(max_rows, len(flat))
    order = torch.sort(~flat, stable=True).indices[:num_rows]
    batch_index = torch.div(order, selected.shape[1], rounding_mode="floor")
    return batch_index, order - batch_index * selected.shape[1], flat[order]


def matched_queries(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(image, query) of every match, flat in the matching's order; the images from the host lengths."""
    images = np.repeat(np.arange(len(indices)), [len(query) for query, _ in indices])
    return torch.as_tensor(images, device=device), torch.cat([query for query, _ in indices]).to(device)


def matched_mask(indices: MatchIndices, shape: tuple[int, int], device: torch.device) -> Tensor:
    """(B, Q) bool marking the queries the Hungarian matcher assigned to a ground-truth box."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    return mask.index_put(matched_queries(indices, device), torch.ones((), dtype=torch.bool, device=device))


MISSING_MATCH = "a matched query was not refined; pass the matched queries as extra_selected in forward."


def matched_rows(refinement: RoIRefinement, indices: MatchIndices, check: bool = True) -> Tensor:
    """The refined row of every matched query, in the matching's order, -1 for one that was not refined: refused
    with ``check`` (one host read; without it the caller guarantees the matches were refined)."""
    device = refinement.refined_boxes.device
    row_of = torch.full((len(indices), refinement.boxes.shape[1]), -1, dtype=torch.long, device=device)
    row = torch.where(refinement.valid, torch.arange(len(refinement.valid), device=device), -1)
    row_of = row_of.index_put((refinement.batch_index, refinement.query_index), row)
    rows = row_of[matched_queries(indices, device)]
    if check and len(rows) and bool((rows < 0).any()):
        raise ValueError(MISSING_MATCH)
    return rows


def positive_targets(
    refinement: RoIRefinement,
    targets: Sequence[dict[str, Tensor]],
    indices: MatchIndices,
    positive_iou: float | None,
    check: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, target boxes, weights) the box losses train on: every matched query with its ground truth, and with
    ``positive_iou`` also every other refined query whose input box overlaps a ground truth by that much (its
    best-overlapping one), as R-CNN heads train on all proposals near an object.

    A fixed number of rows known on the host (the matches, then every refined row), so no host read: weight 1 for
    a positive, 0 for the rest, whose target is the whole image (a finite loss for any finite box). ``check``
    refuses a match that was not refined (one host read)."""
    counts = [len(t["boxes"]) for t in targets]
    rows = matched_rows(refinement, indices, check)
    target_boxes = torch.cat([t["boxes"][gt] for t, (_, gt) in zip(targets, indices)]).to(refinement.refined_boxes)
    weights = torch.ones(len(rows), dtype=target_boxes.dtype, device=rows.device)
    if positive_iou is None or max(counts, default=0) == 0:
        return rows, target_boxes, weights
    # every refined row against every ground truth of its image at once; padded slots and matched rows never win
    gt_boxes = pad_sequence([t["boxes"].to(target_boxes) for t in targets], batch_first=True)  # (B, n, 4)
    real = torch.as_tensor(np.arange(max(counts))[None] < np.array(counts)[:, None], device=rows.device)
    candidate_xyxy = box_convert(refinement.input_boxes, "cxcywh", "xyxy")[:, None]
    iou = paired_iou_giou(candidate_xyxy, box_convert(gt_boxes, "cxcywh", "xyxy")[refinement.batch_index])[0]
    best_iou, best_gt = torch.where(real[refinement.batch_index], iou, -1.0).max(1)
    unmatched = refinement.valid.index_put((rows,), torch.zeros((), dtype=torch.bool, device=rows.device))
    positive = unmatched & (best_iou >= positive_iou)
    whole_image = target_boxes.new_tensor([0.5, 0.5, 1.0, 1.0])
    positive_boxes = torch.where(positive[:, None], gt_boxes[refinement.batch_index, best_gt], whole_image)
    every_row = torch.arange(len(positive), device=rows.device)
    return (
        torch.cat([rows, every_row]),
        torch.cat([target_boxes, positive_boxes]),
        torch.cat([weights, positive.to(weights.dtype)]),
    )
