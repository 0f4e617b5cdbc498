"""CPU inference levers (modeling.cpu_inference): each one alone and all together keep the detections to 1e-4,
change no weight, refuse training, and step aside where oneDNN must not run (autograd, tracing); the speed tool's
pieces (variants, interleaved rounds, detection check) without the official code."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import salience_detr  # noqa: F401  (registers the meta-architecture)
from salience_detr.layers.levels import flatten_levels
from salience_detr.modeling.cpu_inference import (
    OneDnnConv2d,
    OneDnnDetectronConv2d,
    OneDnnLinear,
    OneDnnLinearReLU,
    fuse_ffn_relu,
    optimize_for_cpu_inference,
    use_channels_last,
    use_onednn_conv,
    use_onednn_linear,
)
from salience_detr.tools import speed_official
from salience_detr.tools._timing import interleaved_rounds

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "salience_detr/salience_detr_tiny_synthetic.py"
R50 = CONFIGS / "models/salience_detr_r50.py"
ALL_LEVERS = ("fuse_bn", "channels_last", "onednn_conv", "onednn_linear", "ffn_relu")
LEVERS = {lever: {other: other == lever for other in ALL_LEVERS} for lever in ALL_LEVERS} | {"all": {}}


def eval_model(config: Path, **overrides) -> nn.Module:
    """The config's model in eval mode with batch-norm statistics away from the identity (a wrong fold shows)."""
    cfg = LazyConfig.load(str(config))
    cfg.model.update(overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, _BatchNorm)):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return model


def detections(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    return {"boxes": instances.pred_boxes.tensor, "scores": instances.scores, "classes": instances.pred_classes}


@pytest.fixture(
    scope="module", params=[(TINY, {}), (R50, {"select_box_nums_for_evaluation": 100})], ids=["tiny", "r50"]
)
def model_and_reference(request):
    config, overrides = request.param
    model = eval_model(config, **overrides)
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    return model, image, detections(model, image)


@pytest.mark.parametrize("lever", list(LEVERS))
def test_each_lever_keeps_the_detections(model_and_reference, lever):
    model, image, reference = model_and_reference
    changed_model = copy.deepcopy(model)
    changed = optimize_for_cpu_inference(changed_model, **LEVERS[lever])
    assert all(count > 0 for count in changed.values())  # every lever asked for found modules to change
    after = detections(changed_model, image)
    assert torch.equal(after["classes"], reference["classes"])
    torch.testing.assert_close(after["scores"], reference["scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after["boxes"], reference["boxes"], rtol=1e-4, atol=1e-4)


def test_layout_levers_change_no_weight_and_keep_the_state_dict():
    model = eval_model(TINY)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert use_channels_last(model) > 0 and use_onednn_conv(model) > 0 and use_onednn_linear(model) > 0
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(type(m) in (OneDnnConv2d, OneDnnDetectronConv2d) for m in convs)
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_channels_last_backbone_gives_channels_last_maps_and_contiguous_tokens():
    model = eval_model(TINY)
    use_channels_last(model)
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96))
        maps = model.neck([features[name] for name in model.in_features])
    for level in [*features.values(), *maps]:
        assert level.is_contiguous(memory_format=torch.channels_last) and not level.is_contiguous()
    tokens = flatten_levels(maps)
    assert tokens.is_contiguous()
    expected = torch.cat([m.contiguous().flatten(2) for m in maps], 2).transpose(1, 2)
    assert torch.equal(tokens, expected)


def test_onednn_linear_matches_and_steps_aside_for_autograd_and_tracing():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    reference = copy.deepcopy(linear)
    use_onednn_linear(linear)
    assert type(linear) is OneDnnLinear
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), reference(x), rtol=1e-5, atol=1e-5)
        assert linear(x[:, :0]).shape == (3, 0, 40)
    x.requires_grad_(True)
    linear(x).square().sum().backward()  # autograd: F.linear, whose gradients exist
    expected = torch.autograd.grad(reference(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        graph = str(torch.jit.trace(linear, x.detach()).graph)
    assert "aten::linear" in graph and "mkldnn" not in graph  # fvcore's FLOP count and ONNX see a linear layer


def test_onednn_conv_matches_strided_grouped_convolutions():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
    reference = copy.deepcopy(conv)
    use_onednn_conv(conv)
    x = torch.randn(2, 8, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)


def test_refuses_a_model_in_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match="model.eval\\(\\) first"):
        optimize_for_cpu_inference(model)
    assert type(model[3]) is nn.Linear  # nothing changed before the refusal


def test_speed_tool_variants_add_one_lever_each():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    variants = speed_official.lever_variants(model, ablation=True)
    assert list(variants) == [
        "ours, no lever",
        "ours + fuse_bn",
        "ours + fuse_bn + channels_last",
        "ours + fuse_bn + channels_last + onednn_conv",
        "ours + fuse_bn + channels_last + onednn_conv + onednn_linear",
        "ours + fuse_bn + channels_last + onednn_conv + onednn_linear + ffn_relu",
    ]
    assert variants["ours, no lever"] is model and type(model[0]) is nn.Conv2d  # the base model is left as it was
    assert isinstance(variants["ours + fuse_bn"][1], nn.Identity)
    assert type(variants["ours + fuse_bn + channels_last"][0]) is nn.Conv2d
    assert type(variants["ours + fuse_bn + channels_last + onednn_conv"][0]) is OneDnnConv2d
    assert list(speed_official.lever_variants(model, ablation=False)) == ["ours, no lever", "ours, all levers"]


def test_speed_tool_interleaves_rounds_and_drops_the_warmup():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("official", "ours")}
    times = interleaved_rounds(runs, warmup=1, num_iter=2)
    assert calls == ["official", "ours"] * 3
    assert all(len(clocks["cpu"]) == len(clocks["wall"]) == 2 for clocks in times.values())


def test_speed_tool_detection_check_counts_what_differs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]])
    same = {"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 3]), "boxes": boxes}
    moved = {**same, "boxes": boxes + torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])}
    rescored = {**same, "scores": torch.tensor([0.9, 0.8 + 1e-3])}
    checks = speed_official.detection_check(
        {"official": same, "ours, no lever": same, "moved": moved, "rescored": rescored}
    )
    assert checks["ours, no lever"]["unmatched_vs_official"] == 0
    assert checks["moved"]["unmatched_vs_official"] == checks["moved"]["unmatched_vs_no_lever"] == 1
    assert checks["rescored"]["unmatched_vs_no_lever"] == 1
    assert checks["rescored"]["max_score_diff_vs_no_lever"] == pytest.approx(1e-3, abs=1e-6)


def test_speed_tool_refuses_images_the_official_model_cannot_take(capsys):
    with pytest.raises(SystemExit):
        speed_official.parse_args(["--official-root", "x", "--height", "200"])
    assert "at least 320x320" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed_official.parse_args(["--official-root", "x", "--threads", "0"])
    assert isinstance(speed_official.parse_args(["--official-root", "x"]), argparse.Namespace)


def test_load_model_for_inference_applies_the_levers_on_a_cpu_unless_asked_not_to():
    from salience_detr.utils.inference import load_model_for_inference

    cfg = LazyConfig.load(str(TINY))
    fast = load_model_for_inference(cfg, "cpu", checkpoint="")
    plain = load_model_for_inference(cfg, "cpu", checkpoint="", cpu_speedups=False)
    assert any(type(m) is OneDnnLinear for m in fast.modules()) and not any(
        isinstance(m, (FrozenBatchNorm2d, _BatchNorm)) for m in fast.modules()
    )
    assert not any(type(m) is OneDnnLinear for m in plain.modules()) and any(
        isinstance(m, (FrozenBatchNorm2d, _BatchNorm)) for m in plain.modules()
    )


def test_ffn_relu_in_linear1_gives_the_same_ffn_and_keeps_it_under_autograd():
    from salience_detr.layers.post_norm import PostNormLayer

    torch.manual_seed(0)
    layer = PostNormLayer(embed_dim=16, ffn_dim=32, dropout=0.0, attentions=[], ffn_norm="norm").eval()
    reference = copy.deepcopy(layer)
    assert fuse_ffn_relu(layer) == 1 and fuse_ffn_relu(layer) == 0  # a fused layer is not fused twice
    assert type(layer.linear1) is OneDnnLinearReLU and layer.relu_in_linear1 and not reference.relu_in_linear1
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer.feed_forward(x), reference.feed_forward(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.feed_forward(x), reference.feed_forward(x), rtol=1e-5, atol=1e-5)  # F.linear


def test_speed_tool_stage_split_takes_the_rest_per_round():
    splits = [{"backbone": 1.0, "decoder": 2.0}, {"backbone": 3.0, "decoder": 1.0}, {"backbone": 2.0, "decoder": 9.0}]
    stages = speed_official.median_stages(splits, totals=[4.0, 5.0, 12.0])
    assert stages == {"backbone": 2.0, "decoder": 2.0, "other": 1.0}
