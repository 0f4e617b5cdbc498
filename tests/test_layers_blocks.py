"""Shared blocks in salience_detr.layers: MLP and head init, box helpers, multi-scale layout helpers."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from salience_detr.layers.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    inverse_sigmoid,
    to_absolute_xyxy,
    to_normalized_cxcywh,
    whwh_scale,
)
from salience_detr.layers.levels import flatten_levels, level_start_index, level_valid_sizes, valid_ratios
from salience_detr.layers.mlp import MLP, init_box_head, init_class_head


def test_mlp_has_relu_between_layers_only():
    torch.manual_seed(0)
    mlp = MLP(3, 5, 2, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(5, 3), (5, 5), (2, 5)]
    x = torch.randn(4, 3)
    expected = mlp.layers[2](torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), expected)
    nn.init.constant_(mlp.layers[2].bias, -10.0)
    assert (mlp(x) < 0).all()  # no ReLU after the last layer


def test_mlp_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        MLP(4, 4, 4, 0)


def test_head_init_gives_the_focal_prior_and_the_reference_box():
    class_head = nn.Linear(8, 3)
    init_class_head(class_head)
    torch.testing.assert_close(class_head.bias.sigmoid(), torch.full((3,), 0.01))
    box_head = MLP(8, 8, 4, 2)
    init_box_head(box_head)
    assert torch.count_nonzero(box_head(torch.randn(5, 8))) == 0
    with pytest.raises(ValueError, match="prior_probability"):
        init_class_head(class_head, prior_probability=1.0)


def test_inverse_sigmoid_clamps_with_eps():
    x = torch.tensor([0.0, 0.5, 1.0, 0.25])
    expected = torch.tensor([math.log(1e-3), 0.0, -math.log(1e-3), math.log(1 / 3)])
    torch.testing.assert_close(inverse_sigmoid(x), expected)


def test_box_conversions_match_torchvision_bit_for_bit():
    boxes = torch.rand(2, 7, 4) * torch.tensor([1.0, 1.0, 0.5, 0.5])
    assert torch.equal(box_cxcywh_to_xyxy(boxes), box_convert(boxes, "cxcywh", "xyxy"))
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), box_convert(xyxy, "xyxy", "cxcywh"))


def test_boxes_scale_with_each_images_unpadded_size():
    scale = whwh_scale([(100, 200), (40, 60)], torch.zeros(1, dtype=torch.float64))
    assert scale.dtype == torch.float64 and scale.tolist() == [[200, 100, 200, 100], [60, 40, 60, 40]]
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], dtype=torch.float64)
    xyxy = to_absolute_xyxy(boxes, scale)
    torch.testing.assert_close(xyxy, torch.tensor([[50.0, 25.0, 150.0, 75.0], [0.0, 0.0, 60.0, 40.0]]).double())
    torch.testing.assert_close(to_normalized_cxcywh(xyxy, scale), boxes)
    with pytest.raises(ValueError, match="at least one"):
        whwh_scale([], boxes)


def test_flatten_levels_is_row_major_level_by_level():
    maps = [torch.arange(12.0).view(1, 2, 2, 3), 100 + torch.arange(4.0).view(1, 2, 1, 2)]
    flat = flatten_levels(maps)
    assert flat.shape == (1, 8, 2)
    assert flat[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 100, 101]
    assert flat[0, 6].tolist() == [100, 102]
    masks = [torch.zeros(2, 2, 3, dtype=torch.bool), torch.ones(2, 1, 2, dtype=torch.bool)]
    assert flatten_levels(masks).tolist() == [[False] * 6 + [True] * 2] * 2


def test_level_start_index_is_the_running_token_count():
    shapes = torch.tensor([[4, 5], [2, 3], [1, 1]])
    assert level_start_index(shapes).tolist() == [0, 20, 26]
    with pytest.raises(ValueError, match=r"\(L, 2\)"):
        level_start_index(torch.tensor([4, 5]))


def test_valid_ratios_count_row_zero_and_column_zero():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, :3, :2] = False
    mask[1, :, :] = False
    assert level_valid_sizes(mask).tolist() == [[2, 3], [5, 4]]
    ratios = valid_ratios([mask, mask[:, :2, :]], torch.float32)
    assert ratios.shape == (2, 2, 2)
    torch.testing.assert_close(ratios[0, 0], torch.tensor([2 / 5, 3 / 4]))
    torch.testing.assert_close(ratios[0, 1], torch.tensor([2 / 5, 1.0]))
    torch.testing.assert_close(ratios[1], torch.ones(2, 2))


def test_layers_import_without_detectron2():
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "import salience_detr.layers.mlp, salience_detr.layers.box_ops, salience_detr.layers.levels\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
