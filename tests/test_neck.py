import pytest
import torch
import torch.nn.functional as F

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.modeling.neck import (
    ChannelMapper,
    CSPRepPluXLayer,
    GlobalContextGate,
    RepVggPluXBlock,
    RepVGGPluXNetwork,
)

ODD_SHAPES = [(13, 17), (7, 9), (4, 5), (2, 3)]


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_channel_mapper_r50_parameter_count_and_keys():
    mapper = ChannelMapper([512, 1024, 2048], 256, num_outs=4)
    assert _num_params(mapper) == 5_638_144
    state = mapper.state_dict()
    assert state["convs.3.0.weight"].shape == (256, 2048, 3, 3)
    assert state["convs.0.1.weight"].shape == (256,)
    assert "convs.0.0.bias" not in state


def test_channel_mapper_extra_level_uses_raw_last_input():
    torch.manual_seed(0)
    mapper = ChannelMapper([8, 16, 32], 32, num_outs=5, num_groups=4).eval()
    feats = [torch.randn(2, c, s, s + 1) for c, s in zip([8, 16, 32], [16, 8, 4])]
    outs = mapper(feats)
    assert [o.shape[-2:] for o in outs] == [(16, 17), (8, 9), (4, 5), (2, 3), (1, 2)]
    torch.testing.assert_close(outs[3], mapper.convs[3](feats[2]))
    torch.testing.assert_close(outs[4], mapper.convs[4](outs[3]))
    assert mapper.convs[3][0].weight.shape[1] == 32
    assert mapper.convs[4][0].weight.shape[1] == 32


def test_channel_mapper_maps_without_activation():
    mapper = ChannelMapper([4], 8, num_outs=1, num_groups=2)
    out = mapper([torch.randn(1, 4, 5, 5)])[0]
    assert (out < 0).any()  # GroupNorm output, no ReLU after it


def test_channel_mapper_rejects_wrong_number_of_levels():
    mapper = ChannelMapper([8, 16], 16, num_outs=3, num_groups=4)
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        mapper([torch.randn(1, 8, 4, 4)])


def test_transformer_neck_parameter_count_and_state_dict():
    neck = RepVGGPluXNetwork()
    assert _num_params(neck) == 6_667_794
    state = neck.state_dict()
    assert len(state) == 396
    assert sum(v.numel() for v in state.values()) == 6_695_496
    expected_shapes = {
        "lateral_convs.2.0.weight": (256, 256, 1, 1),
        "layer_blocks.0.conv1.0.weight": (256, 512, 1, 1),
        "layer_blocks.1.bottlenecks.2.conv1.0.weight": (256, 64, 3, 3),
        "layer_blocks.1.bottlenecks.2.conv2.0.weight": (256, 64, 1, 1),
        "pan_blocks.2.bottlenecks.0.se_module.conv_mask.weight": (1, 256, 1, 1),
        "pan_blocks.2.bottlenecks.0.se_module.conv_mask.bias": (1,),
        "pan_blocks.0.bottlenecks.1.se_module.se_module.0.weight": (16, 256, 1, 1),
        "pan_blocks.0.bottlenecks.1.se_module.se_module.2.weight": (256, 16, 1, 1),
        "downsample_blocks.1.0.weight": (256, 256, 3, 3),
        "downsample_blocks.1.1.num_batches_tracked": (),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_transformer_neck_output_shapes_for_odd_sizes():
    torch.manual_seed(0)
    neck = RepVGGPluXNetwork([32] * 4, [32] * 4, groups=4, num_blocks=1).eval()
    feats = [torch.randn(2, 32, h, w) for h, w in ODD_SHAPES]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, h, w) for h, w in ODD_SHAPES]


def test_transformer_neck_wiring_matches_spec():
    """Hand-composed PAN from the submodules (docs/model.md#transformer-neck): laterals replace the top-down maps."""
    torch.manual_seed(0)
    neck = RepVGGPluXNetwork([16] * 4, [16] * 4, groups=2, num_blocks=1).eval()
    x = [torch.randn(1, 16, h, w) for h, w in ODD_SHAPES]
    up = lambda t, ref: F.interpolate(t, size=ref.shape[-2:], mode="nearest")  # noqa: E731
    lat2 = neck.lateral_convs[2](x[3])
    t2 = neck.layer_blocks[2](torch.cat([up(lat2, x[2]), x[2]], 1))
    lat1 = neck.lateral_convs[1](t2)
    t1 = neck.layer_blocks[1](torch.cat([up(lat1, x[1]), x[1]], 1))
    lat0 = neck.lateral_convs[0](t1)
    t0 = neck.layer_blocks[0](torch.cat([up(lat0, x[0]), x[0]], 1))
    inner = [t0, lat0, lat1, lat2]
    expected = [t0]
    for level in range(3):
        down = neck.downsample_blocks[level](expected[-1])
        expected.append(neck.pan_blocks[level](torch.cat([down, inner[level + 1]], 1)))
    for got, want in zip(neck(x), expected):
        torch.testing.assert_close(got, want)


def test_global_context_gate_formula():
    torch.manual_seed(0)
    gate = GlobalContextGate(32).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    logits = torch.einsum("c,bchw->bhw", gate.conv_mask.weight[0, :, 0, 0], x) + gate.conv_mask.bias
    weights = logits.flatten(1).softmax(-1)
    context = torch.einsum("bcn,bn->bc", x.flatten(2), weights)
    w1, w2 = gate.se_module[0].weight[:, :, 0, 0], gate.se_module[2].weight[:, :, 0, 0]
    scale = torch.sigmoid(torch.relu(context @ w1.T) @ w2.T)
    torch.testing.assert_close(gate(x), scale[:, :, None, None] * x)


def test_repvgg_block_formula_and_grouped_convs():
    torch.manual_seed(0)
    block = RepVggPluXBlock(16, groups=4).eval()
    assert block.conv1[0].weight.shape == (16, 4, 3, 3) and block.conv1[0].bias is None
    assert block.conv2[0].weight.shape == (16, 4, 1, 1)
    x = torch.randn(1, 16, 5, 7)
    y = F.silu(block.conv1(x) + block.conv2(x))
    torch.testing.assert_close(block(x), block.se_module(y) + x)


def test_csp_layer_formula():
    torch.manual_seed(0)
    layer = CSPRepPluXLayer(24, 16, num_blocks=2, groups=2).eval()
    x = torch.randn(1, 24, 4, 6)
    torch.testing.assert_close(layer(x), layer.bottlenecks(layer.conv1(x)) + layer.conv2(x))


def test_transformer_neck_init_and_syncbn():
    neck = RepVGGPluXNetwork([16] * 3, [16] * 3, num_blocks=1, norm="SyncBN")
    assert isinstance(neck.lateral_convs[0][1], torch.nn.SyncBatchNorm)
    assert isinstance(neck.pan_blocks[0].bottlenecks[0].conv1[1], torch.nn.SyncBatchNorm)
    conv_mask = neck.pan_blocks[0].bottlenecks[0].se_module.conv_mask
    assert torch.count_nonzero(conv_mask.bias) == 0
    bound = (6 / ((1 + 1) * 16)) ** 0.5  # kaiming_uniform(a=1) bound for fan_in 16
    assert conv_mask.weight.abs().max() <= bound


def test_transformer_neck_rejects_wrong_level_count():
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        RepVGGPluXNetwork([16] * 4, [16] * 4, num_blocks=1)([torch.randn(1, 16, 2, 2)] * 3)


def test_context_gate_rejects_too_few_channels():
    with pytest.raises(ValueError, match="reduction"):
        GlobalContextGate(8)


def test_necks_run_in_float64_and_under_autocast():
    torch.manual_seed(0)
    mapper = ChannelMapper([16, 32], 32, num_outs=3, num_groups=8).double()
    mapped = mapper([torch.randn(1, 16, 8, 9, dtype=torch.float64), torch.randn(1, 32, 4, 5, dtype=torch.float64)])
    assert all(m.dtype == torch.float64 for m in mapped)
    neck = RepVGGPluXNetwork([32] * 3, [32] * 3, num_blocks=1).double().eval()
    assert all(o.dtype == torch.float64 for o in neck(mapped))
    neck = neck.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = neck([m.float() for m in mapped])
    assert [o.shape for o in outs] == [m.shape for m in mapped]
    assert all(torch.isfinite(o.float()).all() for o in outs)
