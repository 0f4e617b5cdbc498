"""What the RoI head reads and what it returns."""

from __future__ import annotations

import dataclasses

from torch import Tensor


@dataclasses.dataclass
class RoIInputs:
    """What the head reads besides the decoder outputs: features per level (B,C,H_l,W_l) of the padded batch."""

    query_features: Tensor
    features: list[Tensor]
    image_sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]


@dataclasses.dataclass
class RoIRefinement:
    """Refined predictions of the selected queries, flattened over the batch (R rows, image-major order).

    ``boxes``/``logits`` are the full (B, Q, ...) last-layer predictions with the selected rows replaced. R is a
    host value: ``valid`` is False on the rows past the selected ones (unselected queries, left unchanged).
    """

    boxes: Tensor
    logits: Tensor
    batch_index: Tensor
    query_index: Tensor
    input_boxes: Tensor
    refined_boxes: Tensor
    iou_logits: Tensor | None
    valid: Tensor
