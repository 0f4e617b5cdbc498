"""Shared blocks in salience_detr.layers: MLP and head init, box helpers, multi-scale layout helpers."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from salience_detr.layers.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    inverse_sigmoid,
    paired_iou_giou,
    to_absolute_xyxy,
    whwh_scale,
)
from salience_detr.layers.levels import flat_valid_sizes, flatten_levels, level_start_index, valid_ratios
from salience_detr.layers.mlp import MLP, init_box_head, init_class_head
from salience_detr.layers.post_norm import PostNormLayer


class TwoAttentionLayer(PostNormLayer):
    """A post-norm layer with two plain attention sublayers, named as a checkpoint might name them."""

    def __init__(self, dropout: float = 0.0):
        super().__init__(
            embed_dim=8,
            ffn_dim=16,
            dropout=dropout,
            attentions=[
                ("cross_attn", nn.MultiheadAttention(8, 2, batch_first=True), "norm1"),
                ("self_attn", nn.MultiheadAttention(8, 2, batch_first=True), "norm2"),
            ],
            ffn_norm="norm3",
        )

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        query = self.residual("self_attn", query, self.self_attn(query, query, query)[0])
        query = self.residual("cross_attn", query, self.cross_attn(query, memory, memory)[0])
        return self.feed_forward(query)


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
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy) / scale, boxes)
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
    assert flat_valid_sizes(mask.flatten(1), [(4, 5)], torch.float32).tolist() == [[[2, 3]], [[5, 4]]]
    ratios = valid_ratios([mask, mask[:, :2, :]], torch.float32)
    assert ratios.shape == (2, 2, 2)
    torch.testing.assert_close(ratios[0, 0], torch.tensor([2 / 5, 3 / 4]))
    torch.testing.assert_close(ratios[0, 1], torch.tensor([2 / 5, 1.0]))
    torch.testing.assert_close(ratios[1], torch.ones(2, 2))


def test_layers_import_without_detectron2():
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "import salience_detr.layers.mlp, salience_detr.layers.box_ops, salience_detr.layers.levels\n"
        "import salience_detr.layers.post_norm\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_post_norm_layer_registers_the_given_names_in_construction_order():
    layer = TwoAttentionLayer()
    modules = [name for name, _ in layer.named_children()]
    expected = "cross_attn dropout1 norm1 self_attn dropout2 norm2 linear1 dropout3 linear2 dropout4 norm3"
    assert modules == expected.split()
    owners = list(dict.fromkeys(name.split(".")[0] for name, _ in layer.named_parameters()))
    assert owners == ["cross_attn", "norm1", "self_attn", "norm2", "linear1", "linear2", "norm3"]
    assert layer.embed_dim == 8 and layer.linear1.out_features == 16


def test_post_norm_layer_is_attention_add_norm_then_ffn_add_norm():
    torch.manual_seed(0)
    layer = TwoAttentionLayer().eval()
    for norm in (layer.norm1, layer.norm2, layer.norm3):
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    query, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    expected = layer.norm2(query + layer.self_attn(query, query, query)[0])
    expected = layer.norm1(expected + layer.cross_attn(expected, memory, memory)[0])
    ffn = layer.linear2(torch.relu(layer.linear1(expected)))
    expected = layer.norm3(expected + ffn)
    torch.testing.assert_close(layer(query, memory), expected)


def test_post_norm_layer_dropout_applies_in_training_only():
    torch.manual_seed(0)
    layer = TwoAttentionLayer(dropout=0.5)
    query, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    assert not torch.equal(layer.train()(query, memory), layer.train()(query, memory))
    assert torch.equal(layer.eval()(query, memory), layer.eval()(query, memory))


def test_post_norm_layer_rejects_bad_arguments():
    attention = [("attn", nn.MultiheadAttention(8, 2), "norm1")]
    with pytest.raises(ValueError, match="distinct"):
        PostNormLayer(embed_dim=8, ffn_dim=16, dropout=0.0, attentions=attention, ffn_norm="norm1")
    with pytest.raises(ValueError, match="dropout"):
        PostNormLayer(embed_dim=8, ffn_dim=16, dropout=1.0, attentions=attention, ffn_norm="norm2")
    with pytest.raises(ValueError, match="positive"):
        PostNormLayer(embed_dim=8, ffn_dim=0, dropout=0.0, attentions=attention, ffn_norm="norm2")


def test_post_norm_xavier_init_redraws_attention_and_ffn_weights_only():
    torch.manual_seed(0)
    layer = TwoAttentionLayer()
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    layer.xavier_init(layer.self_attn)
    changed = {name for name, value in layer.state_dict().items() if not torch.equal(value, before[name])}
    assert changed == {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"}


def test_paired_iou_giou_is_the_diagonal_of_torchvisions_matrices():
    generator = torch.Generator().manual_seed(0)
    boxes1 = box_convert(torch.rand(37, 4, generator=generator) * 0.5 + 0.1, "cxcywh", "xyxy")
    boxes2 = box_convert(torch.rand(37, 4, generator=generator) * 0.5 + 0.1, "cxcywh", "xyxy")
    boxes2[0] = boxes1[0]  # identical boxes: IoU and GIoU 1
    iou, giou = paired_iou_giou(boxes1, boxes2)
    assert torch.equal(iou, torch.diag(box_iou(boxes1, boxes2)))
    assert torch.equal(giou, torch.diag(generalized_box_iou(boxes1, boxes2)))
    assert iou[0] == 1 and giou[0] == 1 and (giou < iou).any()
