"""Contrastive denoising (CDN) queries for training, as in the official Salience DETR (docs/model.md#denoising).

Every ground-truth box is copied into ``G`` groups; each group holds a *positive* block (small box noise,
reconstructed by the decoder) and a *negative* block (larger box noise, to be classified as background).
The decoder sees these queries in front of the matching queries, under an attention mask that keeps the
matching queries from peeking at the ground truth and keeps the groups independent of each other.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from salience_detr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


def check_class_ids(labels: np.ndarray, num_classes: int, name: str, fix: str) -> None:
    """Every id in [0, num_classes), checked with numpy on host copies (the mapper's CPU tensors): host work, so no
    device value is read and the sync counter sees none."""
    if labels.size and ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(
            f"{name} must be contiguous class ids in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; {fix}"
        )


class DenoisingQueries(NamedTuple):
    """What the transformer needs for one training batch of denoising queries.

    ``max_gt_per_image`` is ``n_max`` (the largest number of boxes in one image); every group spans
    ``2 * n_max`` queries (positives then negatives), so ``label_query.shape[1] == 2 * n_max * num_groups``.
    """

    label_query: Tensor  # (B, D, C) label embeddings; zero on empty slots
    box_query: Tensor  # (B, D, 4) noised cxcywh boxes in inverse-sigmoid space; zero on empty slots
    attn_mask: Tensor  # (D + num_queries, D + num_queries) bool, True = blocked
    num_groups: int
    max_gt_per_image: int


def denoising_group_count(denoising_nums: int, max_gt_per_image: int) -> int:
    """``G = denoising_nums // n_max`` (at least 1; 1 when the batch has no boxes), as the official code."""
    if max_gt_per_image <= 0:
        return 1
    return max(1, denoising_nums * max_gt_per_image // (max_gt_per_image**2))


def denoising_attention_mask(group_size: int, num_groups: int, num_queries: int, device=None) -> Tensor:
    """(T, T) bool mask with T = group_size * num_groups + num_queries, True where attention is blocked.

    Matching queries (the last ``num_queries``) cannot see any denoising query; a denoising group cannot
    see the other groups; denoising queries can see the matching queries. Built on the host from host ints.
    """
    num_dn = group_size * num_groups
    size = num_dn + num_queries
    group_of = np.arange(size) // max(group_size, 1)
    is_dn = np.arange(size) < num_dn
    rows_dn, cols_dn = is_dn[:, None], is_dn[None, :]
    other_group = group_of[:, None] != group_of[None, :]
    return torch.from_numpy((cols_dn & ~rows_dn) | (rows_dn & cols_dn & other_group)).to(device)


def denoising_slots(counts: list[int], num_groups: int) -> np.ndarray:
    """(2, 2G * N) host int64 rows image and slot of every copy of the batch's N boxes (``counts`` per image).

    Copy c (0 .. 2G-1) of GT t of image b goes to slot ``c * n_max + (t's index within b)``: even copies are the
    positive blocks, odd copies the negative blocks; copies are ordered copy-major, as ``Tensor.repeat`` lays them.
    """
    image_of_gt = np.repeat(np.arange(len(counts)), counts)
    index_in_image = np.concatenate([np.arange(n) for n in counts])
    copy = np.repeat(np.arange(2 * num_groups), sum(counts))
    slots = copy * max(counts) + np.tile(index_in_image, 2 * num_groups)
    return np.stack([np.tile(image_of_gt, 2 * num_groups), slots]).astype(np.int64)


class GenerateCDNQueries(nn.Module):
    """Build noised label/box queries and the decoder self-attention mask from the ground truth.

    ``label_noise_prob`` is halved internally (the official code does so): with the default 0.5 each copy's
    label is replaced by a uniformly drawn class (possibly the same one) with probability 0.25.
    """

    def __init__(
        self,
        num_classes: int = 80,
        label_embed_dim: int = 256,
        denoising_nums: int = 100,
        label_noise_prob: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        super().__init__()
        if num_classes <= 0 or denoising_nums <= 0:
            raise ValueError(
                f"GenerateCDNQueries needs num_classes > 0 and denoising_nums > 0, got {num_classes} and "
                f"{denoising_nums}"
            )
        self.num_classes = num_classes
        self.label_embed_dim = label_embed_dim
        self.denoising_nums = denoising_nums
        self.label_noise_prob = label_noise_prob
        self.box_noise_scale = box_noise_scale
        self.label_encoder = nn.Embedding(num_classes, label_embed_dim)

    def noise_labels(self, labels: Tensor) -> Tensor:
        """Replace each label by a random class with probability ``label_noise_prob / 2``."""
        flip_prob = self.label_noise_prob * 0.5
        if flip_prob <= 0:
            return labels
        flip = torch.rand(labels.shape, device=labels.device) < flip_prob
        random_labels = torch.randint_like(labels, 0, self.num_classes)
        return torch.where(flip, random_labels, labels)

    def noise_boxes(self, boxes: Tensor, negative: Tensor) -> Tensor:
        """Shift xyxy corners by ±u·(w/2, h/2); u ~ U[0,1) for positives, U[1,2) for negatives; clamp to [0, 1].

        ``boxes`` are normalized cxcywh (M, 4); ``negative`` is a (M,) bool flag per copy.
        """
        if self.box_noise_scale <= 0:
            return boxes
        half_size = boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint(0, 2, boxes.shape, device=boxes.device).to(boxes.dtype) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
        corners = box_cxcywh_to_xyxy(boxes) + sign * magnitude * half_size * self.box_noise_scale
        return box_xyxy_to_cxcywh(corners.clamp(min=0.0, max=1.0))

    def forward(self, gt_labels_list: list[Tensor], gt_boxes_list: list[Tensor], num_queries: int) -> DenoisingQueries:
        if len(gt_labels_list) != len(gt_boxes_list) or not gt_labels_list:
            raise ValueError(
                "GenerateCDNQueries needs one labels tensor and one boxes tensor per image, got "
                f"{len(gt_labels_list)} labels and {len(gt_boxes_list)} boxes tensors"
            )
        device = self.label_encoder.weight.device
        host_counts = [len(labels) for labels in gt_labels_list]  # known on the host: no sync
        batch_size = len(gt_labels_list)
        max_gt = max(host_counts)
        num_groups = denoising_group_count(self.denoising_nums, max_gt)
        num_dn = 2 * max_gt * num_groups
        attn_mask = denoising_attention_mask(2 * max_gt, num_groups, num_queries, device=device)

        label_query = self.label_encoder.weight.new_zeros(batch_size, num_dn, self.label_embed_dim)
        box_query = self.label_encoder.weight.new_zeros(batch_size, num_dn, 4)
        if max_gt == 0:
            return DenoisingQueries(label_query, box_query, attn_mask, num_groups, max_gt)

        boxes = torch.cat(gt_boxes_list).to(device=device, dtype=box_query.dtype)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"gt boxes must be (n, 4) normalized cxcywh per image, got {tuple(boxes.shape)} in total")
        labels = torch.cat(gt_labels_list).cpu().numpy()
        check_class_ids(labels, self.num_classes, "gt labels", "map dataset ids to contiguous ids first")
        copies = 2 * num_groups
        layout = np.concatenate([denoising_slots(host_counts, num_groups), np.tile(labels, (1, copies))])
        images, slots, copied_labels = torch.from_numpy(layout.astype(np.int64)).to(device)  # one transfer
        negative = torch.from_numpy(np.repeat(np.arange(copies) % 2 == 1, sum(host_counts))).to(device)

        noised_labels = self.noise_labels(copied_labels)
        noised_boxes = self.noise_boxes(boxes.repeat(copies, 1), negative=negative)
        label_query[images, slots] = self.label_encoder(noised_labels)
        box_query[images, slots] = inverse_sigmoid(noised_boxes)
        return DenoisingQueries(label_query, box_query, attn_mask, num_groups, max_gt)
