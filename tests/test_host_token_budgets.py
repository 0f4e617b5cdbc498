"""Token budgets from host sizes: the same counts as the device masks, so the encoder keeps the same tokens.

The meta-arch counts each level's unpadded cells on the host (``level_valid_counts``) instead of reading the
device masks back; these tests pin that the counts, the budgets and the selected tokens are exactly today's.
"""

from __future__ import annotations

import random

import pytest
import torch
from detectron2.structures import ImageList
from test_loss_curve import TINY_CONFIG

from salience_detr.modeling.meta_arch import level_masks_for, level_valid_counts, padding_mask
from salience_detr.modeling.salience import select_salient_tokens, token_budgets

LEVEL_RATIOS = (0.4, 0.8, 1.0, 1.0)
LAYER_RATIOS = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)


def _device_counts(image_sizes, padded_size, shapes):
    """What the model counted before: (~mask).sum() of the interpolated padding masks, per image and level."""
    images = ImageList(torch.zeros(len(image_sizes), 1, *padded_size), image_sizes)
    features = [torch.zeros(len(image_sizes), 1, h, w) for h, w in shapes]
    masks = level_masks_for(padding_mask(images), features)
    return torch.stack([(~mask).sum((1, 2)) for mask in masks], -1).tolist()


def _strided_shapes(padded_size, num_levels=4):
    """Level sizes as a ResNet + neck produce them: stride 8, then ceil halving (3x3 convolutions with stride 2)."""
    height, width = (-(-side // 8) for side in padded_size)
    shapes = []
    for _ in range(num_levels):
        shapes.append((height, width))
        height, width = -(-height // 2), -(-width // 2)
    return shapes


def _random_case(rng: random.Random):
    """A batch of 1-4 images of mixed sizes (odd ones included), padded to a multiple of 1, 2 or 32."""
    sizes = [(rng.randint(1, 160), rng.randint(1, 160)) for _ in range(rng.randint(1, 4))]
    stride = rng.choice([1, 2, 32])
    padded = tuple(-(-max(side) // stride) * stride for side in zip(*sizes))
    if rng.random() < 0.5:
        shapes = _strided_shapes(padded)
    else:  # any output size the op can be asked for, the identity and the exact doubling included
        shapes = [
            (rng.choice([1, rng.randint(1, 2 * h), h, 2 * h]), rng.choice([1, rng.randint(1, 2 * w), w, 2 * w]))
            for h, w in [padded] * 3
        ]
    return sizes, padded, shapes


def test_host_counts_equal_the_device_masks_counts_over_many_sizes():
    rng = random.Random(0)
    for _ in range(400):
        sizes, padded, shapes = _random_case(rng)
        assert level_valid_counts(sizes, padded, shapes) == _device_counts(sizes, padded, shapes), (sizes, shapes)


@pytest.mark.parametrize(
    ("sizes", "padded"),
    [
        ([(800, 1066)], (800, 1088)),  # padding on the right only
        ([(799, 1088)], (800, 1088)),  # padding at the bottom only, odd height
        ([(800, 1066), (600, 901), (333, 1)], (800, 1088)),  # mixed sizes, an image one pixel wide
        ([(17, 23), (31, 7)], (32, 32)),
    ],
)
def test_host_counts_on_detector_sized_batches(sizes, padded):
    shapes = _strided_shapes(padded)
    assert level_valid_counts(sizes, padded, shapes) == _device_counts(sizes, padded, shapes)


def _device_budgets(valid_counts, level_ratios, layer_ratios):
    """The budgets as the model computed them on the device: float32 products truncated to int64."""
    valid = torch.tensor(valid_counts)
    focus = (valid.to(torch.float32) * torch.tensor(level_ratios)).to(torch.int64)
    level_max = focus.max(0).values
    layer_counts = (level_max.sum().to(torch.float32) * torch.tensor(layer_ratios)).to(torch.int64)
    return focus.sum(-1).tolist(), level_max.tolist(), layer_counts.tolist()


def test_budgets_equal_the_float32_device_truncation():
    rng = random.Random(1)
    for _ in range(300):
        sizes, padded, shapes = _random_case(rng)
        counts = level_valid_counts(sizes, padded, shapes[:3])
        level_ratios = [rng.choice([0.1, 0.3, 0.4, 0.7, 0.8, 1.0, rng.random()]) for _ in range(3)]
        layer_ratios = [rng.choice([1.0, 0.6, 0.2, 1 / 3, rng.random()]) for _ in range(4)]
        assert tuple(token_budgets(counts, level_ratios, layer_ratios)) == _device_budgets(
            counts, level_ratios, layer_ratios
        )


def test_selection_with_host_counts_equals_selection_from_the_masks():
    sizes, padded = [(64, 80), (41, 47), (9, 80)], (64, 80)
    shapes = _strided_shapes(padded)
    masks = level_masks_for(
        padding_mask(ImageList(torch.zeros(3, 1, *padded), sizes)), [torch.zeros(3, 1, h, w) for h, w in shapes]
    )
    generator = torch.Generator().manual_seed(0)
    salience = [torch.randn(3, 1, h, w, generator=generator) for h, w in shapes]
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    from_masks = select_salient_tokens(salience, masks, starts, torch.tensor(LEVEL_RATIOS), torch.tensor(LAYER_RATIOS))
    counts = level_valid_counts(sizes, padded, shapes)
    from_host = select_salient_tokens(salience, masks, starts, LEVEL_RATIOS, LAYER_RATIOS, valid_counts=counts)
    assert torch.equal(from_masks[0], from_host[0]) and torch.equal(from_masks[1], from_host[1])
    assert len(from_host[2]) == len(LAYER_RATIOS)
    assert all(torch.equal(a, b) for a, b in zip(from_masks[2], from_host[2]))
    with pytest.raises(ValueError, match="valid_counts must hold 4 counts"):
        select_salient_tokens(salience, masks, starts, LEVEL_RATIOS, LAYER_RATIOS, valid_counts=counts[:2])


def test_loaded_filter_ratio_buffers_become_the_host_ratios():
    from detectron2.config import LazyConfig, instantiate

    transformer = instantiate(LazyConfig.load(str(TINY_CONFIG)).model).transformer
    assert transformer.host_filter_ratios == (tuple(LEVEL_RATIOS), (1.0, 0.6))
    state = transformer.state_dict()
    state["level_filter_ratio"] = torch.tensor([0.5, 0.25, 1.0, 0.75])
    transformer.load_state_dict(state)
    assert transformer.host_filter_ratios[0] == (0.5, 0.25, 1.0, 0.75)
