"""Batch norms folded into convolutions at inference: the same detections, fewer modules, never in training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import salience_detr  # noqa: F401  (registers the meta-architecture)
from salience_detr.modeling.fuse import fold_norm_into_conv, fuse_conv_bn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "salience_detr/salience_detr_tiny_synthetic.py"
R50 = CONFIGS / "models/salience_detr_r50.py"


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Statistics and affine parameters away from the identity, so a wrong fold shows in the outputs."""
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, _BatchNorm)):
            channels = module.num_features
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(channels, generator=generator) * 0.1)


def count_norms(model: nn.Module) -> int:
    return sum(isinstance(m, (FrozenBatchNorm2d, _BatchNorm)) for m in model.modules())


def eval_model(config: Path, **model_overrides) -> nn.Module:
    cfg = LazyConfig.load(str(config))
    cfg.model.update(model_overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    randomize_norms(model, torch.Generator().manual_seed(0))
    return model


def detections(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        instances = model([{"image": image, "height": image.shape[1], "width": image.shape[2]}])[0]["instances"]
    return {"boxes": instances.pred_boxes.tensor, "scores": instances.scores, "classes": instances.pred_classes}


@pytest.mark.parametrize(
    "config, overrides",
    [(TINY, {}), (R50, {"select_box_nums_for_evaluation": 100})],
    ids=["tiny", "r50"],
)
def test_folded_model_gives_the_same_detections(config, overrides):
    model = eval_model(config, **overrides)
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    before = detections(model, image)
    norms = count_norms(model)
    assert fuse_conv_bn(model) == norms > 0  # every batch norm of both models follows a convolution
    assert count_norms(model) == 0
    after = detections(model, image)
    assert torch.equal(before["classes"], after["classes"])
    torch.testing.assert_close(after["scores"], before["scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after["boxes"], before["boxes"], rtol=1e-4, atol=1e-4)


def test_fold_matches_conv_then_norm_for_grouped_conv_with_bias():
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True)
    norm = nn.BatchNorm2d(12).eval()
    randomize_norms(norm, torch.Generator().manual_seed(3))
    x = torch.randn(2, 8, 9, 7)
    expected = norm(conv(x))
    fold_norm_into_conv(conv, norm)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_refuses_a_model_in_training_mode_and_a_norm_without_statistics():
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match="model.eval\\(\\) first"):
        fuse_conv_bn(block)
    outer = nn.Sequential(block).eval()
    block[1].train()  # one norm still in training mode inside an eval model
    with pytest.raises(RuntimeError, match="model.eval\\(\\) first"):
        fuse_conv_bn(outer)
    untracked = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="cannot be folded"):
        fuse_conv_bn(untracked)


def test_group_norm_and_other_layouts_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.GroupNorm(8, 32), nn.BatchNorm2d(32)).eval()
    assert fuse_conv_bn(model) == 0
    assert isinstance(model[1], nn.GroupNorm) and isinstance(model[2], nn.BatchNorm2d)


def test_benchmark_measures_the_folded_model_with_fuse_bn(tmp_path):
    """--fuse-bn: each norm's weight and bias (2 per channel) become one conv bias, so the model has fewer params."""
    from salience_detr.tools import benchmark

    argv = ["--config-file", str(TINY), "--height", "64", "--width", "64", "--device", "cpu", "--fuse-bn"]
    report = benchmark.main([*argv, "--num-iter", "1", "--warmup", "0", "--output", str(tmp_path / "r.json")])
    model = eval_model(TINY)
    norm_channels = sum(m.num_features for m in model.modules() if isinstance(m, _BatchNorm))
    unfused = sum(p.numel() for p in model.parameters())
    assert report["fuse_bn"] is True
    (result,) = report["results"].values()
    assert round(result["params_m"] * 1e6) == unfused - norm_channels
