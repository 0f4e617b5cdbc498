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
from detectron2.modeling.backbone import BasicStem, ResNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import salience_detr  # noqa: F401  (registers the meta-architecture)
from salience_detr.layers.levels import flatten_levels
from salience_detr.layers.ms_deform_attn import MultiScaleDeformableAttention
from salience_detr.modeling.cpu_inference import (
    FusedBasicBlock,
    FusedBasicStem,
    FusedBottleneckBlock,
    FusedRepVggPluXBlock,
    FusedResNetStage,
    InferenceDeformableAttention,
    OneDnnConv2d,
    OneDnnDetectronConv2d,
    OneDnnLinear,
    OneDnnLinearReLU,
    chunk_ffn,
    fuse_ffn_relu,
    fuse_resnet_blocks,
    optimize_for_cpu_inference,
    reparameterize_repvgg,
    use_channels_last,
    use_inference_deformable_attention,
    use_onednn_conv,
    use_onednn_linear,
)
from salience_detr.modeling.fuse import fuse_conv_bn
from salience_detr.modeling.neck import RepVggPluXBlock
from salience_detr.tools import speed_official
from salience_detr.tools._timing import interleaved_rounds

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "salience_detr/salience_detr_tiny_synthetic.py"
R50 = CONFIGS / "models/salience_detr_r50.py"
ALL_LEVERS = speed_official.LEVERS  # every lever of optimize_for_cpu_inference, in the ablation's order
LEVERS = {lever: {other: other == lever for other in ALL_LEVERS} for lever in ALL_LEVERS} | {"all": {}}
#: Levers that find nothing to change in a config: the tiny model's ResNet-18 has GroupNorm, which cannot be folded.
NOTHING_TO_CHANGE = {("tiny", "fuse_resnet")}


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
    scope="module",
    params=[("tiny", TINY, {}), ("r50", R50, {"select_box_nums_for_evaluation": 100})],
    ids=["tiny", "r50"],
)
def model_and_reference(request):
    name, config, overrides = request.param
    model = eval_model(config, **overrides)
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    return name, model, image, detections(model, image)


@pytest.mark.parametrize("lever", list(LEVERS))
def test_each_lever_keeps_the_detections(model_and_reference, lever):
    name, model, image, reference = model_and_reference
    changed_model = copy.deepcopy(model)
    changed = optimize_for_cpu_inference(changed_model, **LEVERS[lever])
    for applied, count in changed.items():  # every lever asked for found modules to change, where there are any
        assert (count == 0) == ((name, applied) in NOTHING_TO_CHANGE), (applied, count)
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
    assert list(variants) == ["ours, no lever", "ours + fuse_bn"] + [f"+ {lever}" for lever in ALL_LEVERS[1:]]
    assert variants["ours, no lever"] is model and type(model[0]) is nn.Conv2d  # the base model is left as it was
    assert isinstance(variants["ours + fuse_bn"][1], nn.Identity)
    assert type(variants["+ channels_last"][0]) is nn.Conv2d
    assert variants["+ channels_last"][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert type(variants["+ onednn_conv"][0]) is OneDnnConv2d and isinstance(variants["+ onednn_conv"][1], nn.Identity)
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


def frozen_bn_resnet(depth: int) -> nn.Module:
    """A detectron2 ResNet with FrozenBN statistics and affine terms away from the identity (a wrong fold shows)."""
    torch.manual_seed(0)
    stages = ResNet.make_default_stages(depth=depth, norm="FrozenBN")
    out_features = ["stem", "res2", "res3", "res4", "res5"]
    model = ResNet(BasicStem(3, 64, norm="FrozenBN"), stages, out_features=out_features).eval()
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("depth, blocks", [(50, FusedBottleneckBlock), (18, FusedBasicBlock)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_resnet_blocks_match_and_overwrite_no_map_they_do_not_own(depth, blocks, channels_last):
    model = frozen_bn_resnet(depth)
    reference = copy.deepcopy(model)
    fuse_conv_bn(reference)
    use_onednn_conv(reference)  # the same folded convolutions on oneDNN, the ReLUs and the add apart
    assert fuse_resnet_blocks(model) == 1 + sum(len(stage) for stage in model.stages)
    assert type(model.stem) is FusedBasicStem and all(type(stage) is FusedResNetStage for stage in model.stages)
    assert all(type(block) is blocks for stage in model.stages for block in stage)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    if channels_last:
        use_channels_last(model)
        use_channels_last(reference)
    x = torch.randn(1, 3, 96, 128)
    x_before = x.clone()
    with torch.no_grad():
        features, expected = model(x), reference(x)
    assert torch.equal(x, x_before)
    for name in expected:  # "stem" feeds res2.0 and each stage's output the next: none was written over
        scale = expected[name].abs().max()
        torch.testing.assert_close(features[name] / scale, expected[name] / scale, rtol=0, atol=1e-6)


def test_fused_resnet_leaves_group_norm_blocks_and_steps_aside_for_autograd():
    gn = ResNet(BasicStem(3, 64, norm="GN"), ResNet.make_default_stages(depth=18, norm="GN"), out_features=["res5"])
    assert fuse_resnet_blocks(gn.eval()) == 0
    assert type(gn.stem) is BasicStem and not any(type(stage) is FusedResNetStage for stage in gn.stages)
    model = frozen_bn_resnet(18)
    reference = copy.deepcopy(model)
    fuse_resnet_blocks(model)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model(x)["res5"].square().sum().backward()  # autograd: detectron2's own forward, whose gradients exist
    expected = torch.autograd.grad(reference(x)["res5"].square().sum(), x)[0]
    torch.testing.assert_close(x.grad / expected.abs().max(), expected / expected.abs().max(), rtol=0, atol=1e-5)


def test_chunk_ffn_runs_the_same_ffn_on_chunks_of_rows():
    from salience_detr.layers.post_norm import PostNormLayer

    torch.manual_seed(0)
    layer = PostNormLayer(embed_dim=16, ffn_dim=32, dropout=0.0, attentions=[], ffn_norm="norm").eval()
    reference = copy.deepcopy(layer)
    assert chunk_ffn(layer, rows=3) == 1 and chunk_ffn(layer) == 0 and layer.ffn_chunk_rows == 3
    calls = []
    layer.linear1.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(2, 7, 16, requires_grad=True)
    torch.testing.assert_close(layer.feed_forward(x), reference.feed_forward(x), rtol=1e-6, atol=1e-6)
    assert calls == [3, 3, 3, 3, 2]
    layer.feed_forward(x).sum().backward()  # chunks keep the graph: the same input gradient
    torch.testing.assert_close(x.grad, torch.autograd.grad(reference.feed_forward(x).sum(), x)[0])
    with pytest.raises(ValueError, match="positive number of tokens"):
        chunk_ffn(reference, rows=0)


def test_an_unknown_lever_is_refused_by_name():
    model = instantiate(LazyConfig.load(str(TINY)).model).eval()
    with pytest.raises(TypeError, match=r"unknown CPU inference lever\(s\) \['fuse_nb'\]: the levers are \['fuse_bn'"):
        optimize_for_cpu_inference(model, fuse_nb=False)


def bn_repvgg_block() -> RepVggPluXBlock:
    torch.manual_seed(0)
    block = RepVggPluXBlock(32, groups=4, norm="BN").eval()
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0, 0.1)
    return block


@pytest.mark.parametrize("fold_first", [False, True])
def test_reparameterized_repvgg_block_matches_its_two_branches(fold_first):
    block = bn_repvgg_block()
    reference = copy.deepcopy(block)
    if fold_first:
        fuse_conv_bn(block)
        use_channels_last(block)
    assert reparameterize_repvgg(block) == 1 and reparameterize_repvgg(block) == 0
    assert type(block) is FusedRepVggPluXBlock and block.conv2 is None
    assert not any(key.startswith("conv2.") for key in block.state_dict())  # merged into conv1's kernel
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)  # autograd: plain convolution and SiLU, the same numbers
    torch.testing.assert_close(block(x), reference(x), rtol=1e-5, atol=1e-5)


def test_repvgg_blocks_with_other_branches_stay():
    block = bn_repvgg_block()
    block.conv2[0].padding = (1, 1)  # not a centred 1x1 any more: no 3x3 kernel equals the sum
    assert reparameterize_repvgg(block) == 0 and type(block) is RepVggPluXBlock and block.conv2 is not None


@pytest.mark.parametrize("reference_dim", [2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_inference_deformable_attention_gives_the_same_numbers(reference_dim, masked):
    torch.manual_seed(0)
    # three points: the 4-D locations' scale 0.5 / 3 is not a power of two, so only the same arithmetic is equal
    attention = MultiScaleDeformableAttention(64, num_heads=4, num_levels=3, num_points=3).eval()
    nn.init.normal_(attention.sampling_offsets.weight, std=0.1)
    nn.init.normal_(attention.attention_weights.weight, std=0.1)
    reference = copy.deepcopy(attention)
    assert use_inference_deformable_attention(attention) == 1 and type(attention) is InferenceDeformableAttention
    shapes, starts = torch.tensor([[8, 10], [4, 5], [2, 3]]), torch.tensor([0, 80, 100])
    query, value = torch.randn(2, 7, 64), torch.randn(2, 106, 64)
    points = torch.rand(2, 7, 3, reference_dim)
    mask = torch.rand(2, 106) > 0.7 if masked else None
    offsets = torch.randn(2, 7, 4, 3, 3, 2)
    with torch.no_grad():
        assert torch.equal(
            attention._sampling_locations(offsets, points, shapes),
            reference._sampling_locations(offsets, points, shapes),
        )
        if masked:  # padded values are zero: with a changed padding value the output stays
            changed = value.masked_fill(mask.unsqueeze(-1), 5.0)
            assert torch.equal(
                attention(query, points, changed, shapes, starts, mask),
                reference(query, points, value, shapes, starts, mask),
            )
        assert torch.equal(
            attention(query, points, value, shapes, starts, mask), reference(query, points, value, shapes, starts, mask)
        )


@pytest.mark.parametrize("opt_out", [False, True])
def test_train_net_eval_only_evaluates_the_levered_model_on_a_cpu(opt_out, tiny_synthetic_cache, tmp_path, monkeypatch):
    import train_net

    evaluated = {}
    monkeypatch.setattr(train_net, "do_test", lambda cfg, model, ema=None: evaluated.update(model=model))
    overrides = [
        f"datasets.synthetic.cache_dir={tiny_synthetic_cache}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.init_checkpoint=random",
        "train.check_images=0",
    ]
    flags = ["--eval-only", "--no-cpu-speedups"] if opt_out else ["--eval-only"]
    train_net.main(train_net.parse_args(["--config-file", str(TINY), *flags, *overrides]))
    levered = [type(m) for m in evaluated["model"].modules() if type(m) in (OneDnnLinear, InferenceDeformableAttention)]
    assert bool(levered) is not opt_out


def test_benchmark_applies_the_levers_with_cpu_speedups_only():
    from salience_detr.tools import benchmark

    cfg = LazyConfig.load(str(TINY))
    argv = ["--config-file", str(TINY), "--device", "cpu"]
    plain = benchmark.build_model(cfg, benchmark.get_parser().parse_args(argv))
    fast = benchmark.build_model(cfg, benchmark.get_parser().parse_args([*argv, "--cpu-speedups"]))
    assert not any(type(m) is OneDnnLinear for m in plain.modules())
    assert any(type(m) is OneDnnLinear for m in fast.modules())
    for wrong in (["--task", "train"], ["--device", "cuda"]):
        with pytest.raises(SystemExit, match="use it with --task eval --device cpu"):
            benchmark.check_args(benchmark.get_parser().parse_args([*argv, "--cpu-speedups", *wrong]))


def test_encoder_updates_its_own_memory_in_place_only_without_autograd():
    from salience_detr.utils.dispatch_count import count_dispatch

    model = eval_model(TINY)
    transformer = model.transformer
    captured = {}
    transformer.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model([{"image": image}])
    tokens = captured["args"][0]
    tokens_before = tokens.clone()
    with torch.no_grad(), count_dispatch() as counts:
        memory = transformer.encoder(*captured["args"], **captured["kwargs"])
    with count_dispatch() as counts_with_autograd:
        expected = transformer.encoder(*captured["args"], **captured["kwargs"])
    in_place = transformer.encoder.num_layers - 1  # every layer's update but the first one's
    assert counts.calls["aten::scatter_.src"] == in_place and counts_with_autograd.calls["aten::scatter_.src"] == 0
    assert counts_with_autograd.calls["aten::scatter.src"] - counts.calls["aten::scatter.src"] == in_place
    assert torch.equal(tokens, tokens_before)  # the un-encoded tokens are every layer's value: never written
    assert torch.equal(memory, expected)
