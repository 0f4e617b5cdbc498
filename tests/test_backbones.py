import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from timm.models.focalnet import FocalNet
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.swin_transformer import SwinTransformer

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.modeling.backbone.convnext import ConvNeXtBackbone
from salience_detr.modeling.backbone.focalnet import FocalNetBackbone
from salience_detr.modeling.backbone.swin import SwinBackbone
from salience_detr.modeling.backbone.vit import ViTBackbone

SMALL = {
    "convnext": (ConvNeXtBackbone, dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), drop_path_rate=0.0)),
    "swin": (SwinBackbone, dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)),
    "focalnet": (FocalNetBackbone, dict(embed_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.0)),
}
FULL = {"convnext": ConvNeXtBackbone, "swin": SwinBackbone, "focalnet": FocalNetBackbone}
OFFICIAL_SHAPES = {"res3": (384, 8), "res4": (768, 16), "res5": (1536, 32)}


def _small(family, **overrides):
    cls, kwargs = SMALL[family]
    torch.manual_seed(0)
    return cls(**{**kwargs, **overrides}).eval()


def _randomize(module):
    """Non-trivial weights: layer scales at 1e-6/1e-4 would hide every block behind the residual."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.2 + (1.0 if "norm" in name else 0.0))
    return module


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_small_variant_declared_strides_and_channels(family, size):
    backbone = _small(family)
    outputs = backbone(torch.randn(2, 3, *size))
    shapes = backbone.output_shape()
    assert list(outputs) == ["res3", "res4", "res5"] == list(shapes)
    for name, feature in outputs.items():
        assert feature.shape == (
            2,
            shapes[name].channels,
            size[0] // shapes[name].stride,
            size[1] // shapes[name].stride,
        )
    assert [shapes[n].stride for n in shapes] == [8, 16, 32]
    assert backbone.size_divisibility == 32


@pytest.mark.parametrize("family", sorted(FULL))
def test_full_size_declares_official_channels_and_runs_shapes_on_meta(family):
    with torch.device("meta"):
        backbone = FULL[family]()
        outputs = backbone(torch.empty(1, 3, 224, 320))
    shapes = backbone.output_shape()
    assert {name: (s.channels, s.stride) for name, s in shapes.items()} == OFFICIAL_SHAPES
    for name, (channels, stride) in OFFICIAL_SHAPES.items():
        assert outputs[name].shape == (1, channels, 224 // stride, 320 // stride)
    assert 190e6 < sum(p.numel() for p in backbone.parameters()) < 210e6


@pytest.mark.parametrize("family", sorted(SMALL))
def test_first_stage_frozen_rest_trainable_and_gradients_flow(family):
    backbone = _small(family).train()
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    expected_frozen_prefixes = {
        "convnext": ("features.0.", "features.1.", "features.2."),
        "swin": ("features.0.", "features.1.", "features.2."),
        "focalnet": ("stem.", "layers.0.", "layers.1.downsample."),
    }[family]
    assert frozen == {n for n, _ in backbone.named_parameters() if n.startswith(expected_frozen_prefixes)}
    assert frozen and len(frozen) < len(list(backbone.parameters()))
    loss = sum(feature.square().mean() for feature in backbone(torch.randn(1, 3, 64, 64)).values())
    loss.backward()
    for name, parameter in backbone.named_parameters():
        assert (parameter.grad is None) == (name in frozen), name
    assert not any(p.requires_grad is False for p in _small(family, freeze_first_stage=False).parameters())


@pytest.mark.parametrize("family", sorted(SMALL))
def test_bad_configuration_and_input_raise_clear_errors(family):
    with pytest.raises(ValueError, match="out_features"):
        _small(family, out_features=("p3",))
    with pytest.raises(ValueError, match="N, C, H, W"):
        _small(family)(torch.randn(3, 64, 64))


@pytest.mark.parametrize("family", sorted(SMALL))
def test_requested_subset_of_stages_only(family):
    outputs = _small(family, out_features=("res2", "res4"))(torch.randn(1, 3, 64, 64))
    assert list(outputs) == ["res2", "res4"]
    assert outputs["res2"].shape[-1] == 16 and outputs["res4"].shape[-1] == 4


@pytest.mark.parametrize("size", [(64, 96), (72, 100)])
def test_convnext_equals_torchvision_feature_extractor(size):
    backbone = _randomize(_small("convnext"))
    settings = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 64, 1),
        CNBlockConfig(64, 128, 2),
        CNBlockConfig(128, None, 1),
    ]
    reference = ConvNeXt(settings)
    missing, unexpected = reference.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("classifier.") for key in missing)
    extractor = create_feature_extractor(reference.eval(), ["features.3", "features.5", "features.7"])
    x = torch.randn(2, 3, *size)
    expected = list(extractor(x).values())
    for got, want in zip(backbone(x).values(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(64, 96), (72, 100), (100, 36)])
def test_swin_equals_torchvision_at_any_input_size(size):
    backbone = _randomize(_small("swin"))
    reference = SwinTransformer([4, 4], 16, [2, 2, 2, 2], [1, 2, 4, 8], [7, 7])
    missing, unexpected = reference.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    extractor = create_feature_extractor(reference.eval(), ["features.3", "features.5", "features.7"])
    x = torch.randn(1, 3, *size)
    outputs = backbone(x)
    for got, want in zip(outputs.values(), extractor(x).values()):
        torch.testing.assert_close(got, want.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert outputs["res3"].shape[-2:] == tuple(-(-(s // 4) // 2) for s in size)


def test_focalnet_equals_timm_intermediates_plus_output_norms():
    backbone = _randomize(_small("focalnet"))
    reference = FocalNet(
        embed_dim=16,
        depths=(1, 1, 2, 1),
        focal_levels=(4,) * 4,
        focal_windows=(3,) * 4,
        use_overlap_down=True,
        use_post_norm=True,
        normalize_modulator=True,
        layerscale_value=1e-4,
        num_classes=0,
    )
    trunk = {k: v for k, v in backbone.state_dict().items() if not k.startswith("output_norms.")}
    missing, unexpected = reference.load_state_dict(trunk, strict=False)
    assert not unexpected and sorted(missing) == ["norm.bias", "norm.weight"]
    x = torch.randn(2, 3, 64, 96)
    intermediates = reference.eval().forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for (name, got), raw in zip(backbone(x).items(), intermediates):
        torch.testing.assert_close(got, backbone.output_norms[name](raw), rtol=0, atol=0)


def test_vit_pyramid_shapes_and_equals_timm_last_block():
    torch.manual_seed(0)
    backbone = ViTBackbone(embed_dim=64, depth=2, num_heads=2, out_channels=32, drop_path_rate=0.0).eval()
    shapes = backbone.output_shape()
    assert {n: (s.channels, s.stride) for n, s in shapes.items()} == {
        "res3": (32, 8),
        "res4": (32, 16),
        "res5": (32, 32),
    }
    x = torch.randn(2, 3, 96, 128)  # not the 224 pre-training size: position embeddings are resampled
    outputs = backbone(x)
    for name, feature in outputs.items():
        assert feature.shape == (2, 32, 96 // shapes[name].stride, 128 // shapes[name].stride)
    reference = VisionTransformer(
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=0,
        global_pool="",
        final_norm=False,
        dynamic_img_size=True,
    )
    reference.load_state_dict(backbone.vit.state_dict())
    tokens = reference.eval().forward_features(x)[:, reference.num_prefix_tokens :]
    last_map = tokens.transpose(1, 2).reshape(2, 64, 6, 8)
    torch.testing.assert_close(outputs["res4"], backbone.pyramid["res4"](last_map))
    torch.testing.assert_close(outputs["res5"], backbone.pyramid["res5"](last_map))


def test_vit_freezing_and_input_checks():
    backbone = ViTBackbone(embed_dim=64, depth=1, num_heads=2, out_channels=32, freeze_patch_embed=True)
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"vit.cls_token", "vit.pos_embed", "vit.patch_embed.proj.weight", "vit.patch_embed.proj.bias"}
    with pytest.raises(ValueError, match="multiples of 32"):
        backbone(torch.randn(1, 3, 80, 96))
    with pytest.raises(ValueError, match="out_features"):
        ViTBackbone(embed_dim=64, depth=1, num_heads=2, out_features=("res2",))


# Reduced depth for the training step; no drop path there, so a dropped block cannot leave a weight without a step.
LARGE_CONFIGS = {
    "convnext_l": ("ConvNeXtBackbone", dict(depths=(1, 1, 1, 1), drop_path_rate=0.0)),
    "swin_l": ("SwinBackbone", dict(depths=(1, 1, 1, 1), drop_path_rate=0.0)),
    "focalnet_l": ("FocalNetBackbone", dict(depths=(1, 1, 1, 1), drop_path_rate=0.0)),
    "vit": ("ViTBackbone", dict(depth=1, drop_path_rate=0.0)),
}


@pytest.mark.parametrize("name", sorted(LARGE_CONFIGS))
def test_experiment_config_loads_saves_and_model_neck_fits_backbone(name, tmp_path):
    cfg = LazyConfig.load(f"configs/salience_detr/salience_detr_{name}_4scale_12ep.py")
    assert {"model", "optimizer", "lr_multiplier", "dataloader", "train"} <= set(cfg)
    assert name in cfg.train.output_dir and cfg.train.max_iter > 80_000
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert type(model.backbone).__name__ == LARGE_CONFIGS[name][0]
    shapes = model.backbone.output_shape()
    assert model.neck.in_channels == [shapes[f].channels for f in model.in_features]
    assert [shapes[f].stride for f in model.in_features] == [8, 16, 32] and len(model.neck.convs) == 4
    expected = [256] * 3 if name == "vit" else [384, 768, 1536]
    assert model.neck.in_channels == expected


def test_vit_experiment_trains_the_new_pyramid_at_full_rate_and_skips_decay_on_embeddings():
    cfg = LazyConfig.load("configs/salience_detr/salience_detr_vit_4scale_12ep.py")
    cfg.model.backbone.depth = 1
    with torch.device("meta"):
        model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    groups = instantiate(cfg.optimizer.params)
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    backbone = model.backbone
    assert setting[id(backbone.pyramid["res3"][0].weight)] == (1e-4, 1e-4)
    assert setting[id(backbone.vit.blocks[0].attn.qkv.weight)] == (1e-5, 1e-4)
    assert setting[id(backbone.vit.pos_embed)] == setting[id(backbone.vit.cls_token)] == (1e-5, 0.0)


def _tiny_transformer(cfg):
    """Shrink everything but the backbone so a CPU training step takes seconds (as tests/test_meta_arch.py does)."""
    model = cfg.model
    model.num_classes = 5
    model.embed_dim = 64
    model.position_embedding.num_pos_feats = 32
    model.transformer.encoder.num_layers = 2
    model.transformer.encoder.layer.update(ffn_dim=128, num_heads=4, num_points=2, topk_sa=30)
    model.transformer.decoder.num_layers = 2
    model.transformer.decoder.layer.update(ffn_dim=128, num_heads=4, num_points=2)
    model.transformer.neck.num_blocks = 1
    model.transformer.num_queries = 50
    model.transformer.layer_filter_ratio = (1.0, 0.5)
    model.denoising_generator.denoising_nums = 10


def _detection_input(height, width, boxes, classes):
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "instances": instances}


@pytest.mark.slow  # 20-50 s each on a shared 2-core CPU: full-width 1536-channel stages
@pytest.mark.parametrize("name", sorted(LARGE_CONFIGS))
def test_training_step_of_full_model_with_reduced_depth_large_backbone(name):
    cfg = LazyConfig.load(f"configs/salience_detr/salience_detr_{name}_4scale_12ep.py")
    cfg.model.backbone.update(LARGE_CONFIGS[name][1])
    _tiny_transformer(cfg)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    batch = [_detection_input(96, 128, [[10, 12, 60, 70]], [1]), _detection_input(100, 90, [[5, 5, 40, 80]], [3])]
    losses = model(batch)
    assert "loss_salience" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    for param_name, param in model.backbone.named_parameters():
        changed = not torch.equal(param.detach(), before[param_name])
        assert changed == param.requires_grad, param_name
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": item["image"]} for item in batch])
    for item, output in zip(batch, outputs):
        instances = output["instances"]
        assert instances.image_size == tuple(item["image"].shape[-2:]) and len(instances) > 0
        assert torch.isfinite(instances.pred_boxes.tensor).all() and instances.scores.max() <= 1


@pytest.mark.parametrize("family", sorted(SMALL))
def test_small_variant_runs_under_bfloat16_autocast(family):
    backbone = _small(family)
    x = torch.randn(1, 3, 64, 96)
    reference = backbone(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = backbone(x)
    for name, feature in outputs.items():
        assert feature.shape == reference[name].shape and torch.isfinite(feature).all()
        torch.testing.assert_close(feature.float(), reference[name], rtol=0.1, atol=0.1)
