"""Stages of the parity check against the official Salience DETR code (``tools/parity_official``).

Both models see the same seeded random normalized images (``parity_images``; the weights come from
``checkpoint.synthetic``). ``record_outputs`` reads a forward pass with hooks on submodules both implementations
name alike; ``our_stages`` turns this project's run into named stages (neck maps, salience maps, encoder token
sets, memories, proposals, query choice, every decoder layer, final detections). The official side lives in the
tool, so this module never imports official code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from salience_detr.layers.levels import flatten_levels

from .official import coco_category_ids


def parity_images(seed: int, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Normalized (3, H, W) float32 images: smooth random structure plus fine noise, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for height, width in sizes:
        coarse = torch.randn(1, 3, height // 16 + 1, width // 16 + 1, generator=generator)
        smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
        images.append(smooth + 0.3 * torch.randn(3, height, width, generator=generator))
    return images


@contextlib.contextmanager
def record_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
    """Collect every output of the named submodules during the ``with`` block: ``{name: [output per call]}``."""
    records: dict[str, list[Any]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: records[name].append(out))
        for name in names
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


#: Submodules whose outputs name the stages; both implementations use these names (the converter maps 1:1).
RECORDED_MODULES = (
    "neck",
    "transformer",
    "transformer.enc_output_norm",
    "transformer.encoder",
    "transformer.neck",
    "transformer.encoder_class_head",
    "transformer.encoder_bbox_head",
)
#: Stages holding token or query indices or labels: compared for agreement, not closeness. ``encoder_tokens.*``
#: and ``enc_candidates`` are sorted (only membership matters there); ``query_index`` keeps the query order.
SELECTION_PREFIXES = ("encoder_tokens.", "enc_candidates", "query_index", "detections.")


def is_selection(name: str) -> bool:
    """Index and label stages (exact agreement); the rest are floats (closeness)."""
    return name.startswith(SELECTION_PREFIXES) and not name.endswith((".scores", ".boxes"))


def common_stages(
    records: Mapping[str, list[Any]],
    neck_maps: Sequence[Tensor],
    salience: Sequence[Tensor],
    encoder_tokens: Sequence[Tensor],
) -> dict[str, Tensor]:
    """Stages both models expose the same way, from ``record_outputs(model, RECORDED_MODULES)``.

    ``enc_output_norm`` runs twice (salience input, then proposal memory); the class head's last call is the
    proposal head on all tokens (the encoder's earlier calls score the selected tokens).
    """
    stages = {f"neck.{level}": feature for level, feature in enumerate(neck_maps)}
    stages["salience_input"] = records["transformer.enc_output_norm"][0]
    stages.update({f"salience.{level}": scores for level, scores in enumerate(salience)})
    stages.update({f"encoder_tokens.{layer}": tokens.sort(1).values for layer, tokens in enumerate(encoder_tokens)})
    stages["encoder_memory"] = records["transformer.encoder"][-1]
    stages["transformer_neck"] = flatten_levels(records["transformer.neck"][-1])
    stages["proposal_memory"] = records["transformer.enc_output_norm"][-1]
    stages["enc_logits_all"] = records["transformer.encoder_class_head"][-1]
    stages["enc_box_deltas_all"] = records["transformer.encoder_bbox_head"][-1]
    return stages


def query_stages(
    enc_logits_all: Tensor,
    num_queries: int,
    own_index: Tensor,
    enc_logits: Tensor,
    enc_boxes: Tensor,
    logits: Tensor,
    boxes: Tensor,
) -> dict[str, Tensor]:
    """Two-stage selection and decoder: the top-4Q candidates by max class logit (as a set), the model's own
    query choice (indices, in order, and their max class logits), the queries' encoder outputs, every decoder layer.

    The query scores agree even where two near-tied queries swap places, which tells such a float flip from a
    real difference.
    """
    token_scores = enc_logits_all.max(-1).values
    num_candidates = min(4 * num_queries, token_scores.shape[1])
    stages = {"enc_candidates": token_scores.topk(num_candidates, dim=1).indices.sort(1).values}
    stages["query_index"] = own_index
    stages["query_scores"] = token_scores.gather(1, own_index)
    stages["enc_logits"], stages["enc_boxes"] = enc_logits, enc_boxes
    for layer, (layer_logits, layer_boxes) in enumerate(zip(logits, boxes)):
        stages[f"decoder.{layer}.logits"] = layer_logits
        stages[f"decoder.{layer}.boxes"] = layer_boxes
    return stages


@contextlib.contextmanager
def forced_query_order(transformer: nn.Module, index: Tensor | None) -> Iterator[None]:
    """Within the block ``transformer`` is called with ``query_order=index``: its decoder runs on those queries, in
    that order (None: its own). Its own choice stays in the output's ``query_index``.

    Forcing the reference order keeps a swap of two near-tied queries (float noise before the sort) from changing
    the decoder's input pairing.
    """

    def pass_order(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "query_order": index}

    handle = transformer.register_forward_pre_hook(pass_order, with_kwargs=True) if index is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def our_stages(model: nn.Module, images: Sequence[Tensor], query_index: Tensor | None = None) -> dict[str, Tensor]:
    """Run this project's SalienceDETR (eval) on normalized images and return every parity stage by name.

    The model's own normalisation is off for the call (mean 0, std 1) so it sees exactly ``images``;
    ``query_index`` forces the decoder's queries (see ``forced_query_order``). Final detections are those of
    ``inference`` (clipped by ``detector_postprocess``), labelled with COCO category ids.
    """
    mean, std = model.pixel_mean.clone(), model.pixel_std.clone()
    model.pixel_mean.zero_()
    model.pixel_std.fill_(1.0)
    try:
        with (
            torch.no_grad(),
            record_outputs(model, RECORDED_MODULES) as records,
            forced_query_order(model.transformer, query_index),
        ):
            results = model([{"image": image} for image in images])
    finally:
        model.pixel_mean.copy_(mean)
        model.pixel_std.copy_(std)
    output = records["transformer"][-1]
    stages = common_stages(records, records["neck"][-1], output.salience, output.layer_indices)
    queries = (output.query_index, output.enc_logits, output.enc_boxes, output.pred_logits, output.pred_boxes)
    stages.update(query_stages(stages["enc_logits_all"], model.transformer.num_queries, *queries))
    coco_ids = torch.as_tensor(coco_category_ids())
    for index, result in enumerate(results):
        instances = result["instances"]
        stages[f"detections.{index}.scores"] = instances.scores
        stages[f"detections.{index}.labels"] = coco_ids[instances.pred_classes]
        stages[f"detections.{index}.boxes"] = instances.pred_boxes.tensor
    return stages


def detections_like_ours(
    scores: Tensor, labels: Tensor, boxes: Tensor, image_size: tuple[int, int]
) -> dict[str, Tensor]:
    """The official unclipped detections of one image after this project's ``detector_postprocess``.

    That is the one deliberate difference of the final outputs: boxes are clipped to the image and boxes left
    empty are dropped. Also returns ``clipped`` and ``kept`` (bool per official box).
    """
    instances = Instances(image_size, scores=scores, labels=labels, pred_boxes=Boxes(boxes.clone()))
    instances.index = torch.arange(len(scores))
    kept = detector_postprocess(instances, *image_size)
    keep_mask = torch.zeros(len(scores), dtype=torch.bool)
    keep_mask[kept.index] = True
    clipped = Boxes(boxes.clone())
    clipped.clip(image_size)
    return {
        "scores": kept.scores,
        "labels": kept.labels,
        "boxes": kept.pred_boxes.tensor,
        "clipped": (clipped.tensor != boxes).any(-1),
        "kept": keep_mask,
    }


def unmatched_detections(
    ours: Mapping[str, Tensor], reference: Mapping[str, Tensor], score_tol: float, box_tol: float
) -> Tensor:
    """Indices of our detections with no reference detection of the same label, box and score (within tolerances).

    Detections are ordered by score, so near-equal scores may come in either order; matching by content instead
    of position keeps such swaps from counting as differences.
    """
    same_label = ours["labels"][:, None] == reference["labels"][None]
    close_score = (ours["scores"][:, None] - reference["scores"][None]).abs() <= score_tol
    close_box = (ours["boxes"][:, None] - reference["boxes"][None]).abs().amax(-1) <= box_tol
    return torch.nonzero(~(same_label & close_score & close_box).any(1)).flatten()


def subsample(tensor: Tensor, count: int = 512) -> Tensor:
    """``count`` evenly spaced elements of the flattened tensor (fixed positions, so fixtures stay small)."""
    flat = tensor.flatten()
    positions = torch.linspace(0, flat.numel() - 1, min(count, flat.numel())).round().long()
    return flat[positions]
