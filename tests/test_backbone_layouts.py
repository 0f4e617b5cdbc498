import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.checkpoint.backbone_layouts import (
    BACKBONE_LAYOUTS,
    convert_backbone_state_dict,
    pretrained_trunk_state_dict,
    save_pretrained_trunk,
)
from salience_detr.checkpoint.synthetic import read_official_keys
from salience_detr.modeling.backbone import ConvNeXtBackbone, FocalNetBackbone, SwinBackbone

DESIGN = Path(__file__).parent / "data"  # copies of the official key lists
FAMILIES = {
    "convnext": ("official_convnext_l_backbone_keys.tsv", ConvNeXtBackbone),
    "swin": ("official_swin_l_backbone_keys.tsv", SwinBackbone),
    "focalnet": ("official_focalnet_l_backbone_keys.tsv", FocalNetBackbone),
}


def _official_shapes(tsv_name):
    path = DESIGN / tsv_name
    if not path.exists():
        pytest.fail(f"key list {path} is missing; it ships with the design docs")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return {key: ast.literal_eval(shape) for key, shape in rows}


def _strip_prefix(state_dict):
    assert all(key.startswith("backbone.") for key in state_dict)
    return {key[len("backbone.") :]: value for key, value in state_dict.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_official_key_maps_and_loads_strictly_into_full_size_wrapper(family):
    tsv_name, backbone_cls = FAMILIES[family]
    shapes = _official_shapes(tsv_name)
    synthetic = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    converted = convert_backbone_state_dict(family, synthetic)
    assert len(converted) == len(synthetic)
    with torch.device("meta"):
        backbone = backbone_cls()
    result = backbone.load_state_dict(_strip_prefix(converted), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wrong_official_shape_is_caught_by_strict_load(family):
    tsv_name, backbone_cls = FAMILIES[family]
    shapes = _official_shapes(tsv_name)
    key = next(k for k, s in shapes.items() if len(s) == 1 and s[0] == 768)
    synthetic = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    synthetic[key] = torch.empty(767, device="meta")
    with torch.device("meta"):
        backbone = backbone_cls()
    with pytest.raises(RuntimeError, match="size mismatch"):
        backbone.load_state_dict(_strip_prefix(convert_backbone_state_dict(family, synthetic)), assign=True)


@pytest.mark.parametrize(
    "family, key",
    [
        ("convnext", "backbone.0.features.0.0.weight"),
        ("swin", "backbone.features.0.0.weight"),
        ("swin", "backbone.0.norm.weight"),
        ("focalnet", "backbone.0.layers.0.blocks.0.attn.qkv.weight"),
        ("focalnet", "backbone.2.norm1.weight"),
    ],
)
def test_unknown_official_keys_raise(family, key):
    with pytest.raises(ValueError, match="matches no rule"):
        BACKBONE_LAYOUTS[family](key, torch.zeros(1))


def test_unknown_family_and_non_backbone_entries():
    with pytest.raises(ValueError, match="unknown backbone family"):
        convert_backbone_state_dict("resnext", {})
    converted = convert_backbone_state_dict("swin", {"neck.convs.0.0.weight": torch.zeros(1)})
    assert converted == {}


def test_focalnet_rules_rename_and_reshape():
    rule = BACKBONE_LAYOUTS["focalnet"]
    weight = torch.randn(389, 192)
    key, value = rule("backbone.0.layers.0.blocks.1.modulation.f.weight", weight)
    assert key == "backbone.layers.0.blocks.1.modulation.f.weight" and value.shape == (389, 192, 1, 1)
    assert torch.equal(value[:, :, 0, 0], weight)
    assert rule("backbone.0.layers.2.downsample.proj.weight", weight)[0] == "backbone.layers.3.downsample.proj.weight"
    assert rule("backbone.0.layers.1.blocks.0.gamma_2", weight)[0] == "backbone.layers.1.blocks.0.ls2.gamma"
    assert rule("backbone.0.layers.1.blocks.0.norm1.bias", weight)[0] == "backbone.layers.1.blocks.0.norm1_post.bias"
    assert rule("backbone.1.norm3.weight", weight)[0] == "backbone.output_norms.res5.weight"
    assert rule("backbone.0.patch_embed.proj.bias", weight)[0] == "backbone.stem.proj.bias"


def _random_official(shapes, generator):
    """Random official-layout weights; norms around 1 and layer scales around 0.5 so no block is an identity."""
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.2
        if "norm" in key and key.endswith("weight") or "gamma" in key or "layer_scale" in key:
            value += 1.0 if "norm" in key else 0.5
        state[key] = value
    return state


@pytest.mark.parametrize("size", [(64, 96), (70, 90)])
def test_convnext_and_swin_official_checkpoints_give_official_features(size):
    generator = torch.Generator().manual_seed(0)
    convnext = ConvNeXt(
        [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 2), CNBlockConfig(128, None, 1)]
    )
    swin = SwinTransformer([4, 4], 16, [2, 2, 2, 2], [1, 2, 4, 8], [7, 7])
    cases = [
        ("convnext", convnext, "backbone.", ConvNeXtBackbone(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1))),
        ("swin", swin, "backbone.0.", SwinBackbone(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))),
    ]
    x = torch.randn(1, 3, *size, generator=generator, dtype=torch.float64)
    for family, official, prefix, backbone in cases:
        trunk = {k: v for k, v in official.state_dict().items() if k.startswith("features.")}
        shapes = {prefix + k: tuple(v.shape) for k, v in trunk.items() if v.is_floating_point()}
        checkpoint = _random_official(shapes, generator)
        checkpoint.update({prefix + k: v for k, v in trunk.items() if not v.is_floating_point()})  # position index
        backbone.double().load_state_dict(_strip_prefix(convert_backbone_state_dict(family, checkpoint)))
        official.double().load_state_dict({k[len(prefix) :]: v for k, v in checkpoint.items()}, strict=False)
        expected, features = [], x
        for index, layer in enumerate(official.eval().features):
            features = layer(features)
            if index in (3, 5, 7):
                expected.append(features.permute(0, 3, 1, 2) if family == "swin" else features)
        for got, want in zip(backbone.eval()(x).values(), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def _official_focalnet_features(sd, x, depths, focal_level):
    """The official (Microsoft-layout, channels-last, linear) FocalNet-L forward, written from its definition:
    post-norm blocks with layer scale, normalised modulator, padded conv embeddings, a LayerNorm per output."""

    def p(name):
        return sd[f"backbone.{name}"]

    def layer_norm(t, name):
        return F.layer_norm(t, t.shape[-1:], p(f"{name}.weight"), p(f"{name}.bias"), 1e-5)

    def embed(t, name, stride, kernel, padding):  # t is NCHW; pads to a multiple of the stride first
        t = F.pad(t, (0, (-t.shape[-1]) % stride, 0, (-t.shape[-2]) % stride))
        t = F.conv2d(t, p(f"{name}.proj.weight"), p(f"{name}.proj.bias"), stride=stride, padding=padding)
        assert p(f"{name}.proj.weight").shape[-1] == kernel
        return layer_norm(t.permute(0, 2, 3, 1), f"{name}.norm")

    def modulation(t, name):
        channels = t.shape[-1]
        projected = F.linear(t, p(f"{name}.f.weight"), p(f"{name}.f.bias")).permute(0, 3, 1, 2)
        q, ctx, gates = torch.split(projected, (channels, channels, focal_level + 1), 1)
        ctx_all = 0
        for level in range(focal_level):
            kernel = p(f"{name}.focal_layers.{level}.0.weight")
            ctx = F.gelu(F.conv2d(ctx, kernel, groups=channels, padding=kernel.shape[-1] // 2))
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_all = ctx_all + F.gelu(ctx.mean(2, keepdim=True).mean(3, keepdim=True)) * gates[:, focal_level:]
        ctx_all = ctx_all / (focal_level + 1)
        modulated = (q * F.conv2d(ctx_all, p(f"{name}.h.weight"), p(f"{name}.h.bias"))).permute(0, 2, 3, 1)
        return F.linear(modulated, p(f"{name}.proj.weight"), p(f"{name}.proj.bias"))

    def mlp(t, name):
        hidden = F.gelu(F.linear(t, p(f"{name}.fc1.weight"), p(f"{name}.fc1.bias")))
        return F.linear(hidden, p(f"{name}.fc2.weight"), p(f"{name}.fc2.bias"))

    t = embed(x, "0.patch_embed", 4, 7, 2)
    outputs = []
    for stage, depth in enumerate(depths):
        for block in range(depth):
            name = f"0.layers.{stage}.blocks.{block}"
            t = t + p(f"{name}.gamma_1") * layer_norm(modulation(t, f"{name}.modulation"), f"{name}.norm1")
            t = t + p(f"{name}.gamma_2") * layer_norm(mlp(t, f"{name}.mlp"), f"{name}.norm2")
        if stage > 0:
            outputs.append(layer_norm(t, f"1.norm{stage}").permute(0, 3, 1, 2))
        if stage < len(depths) - 1:
            t = embed(t.permute(0, 3, 1, 2), f"0.layers.{stage}.downsample", 2, 3, 1)
    return outputs


def _official_focalnet_shapes(embed_dim, depths, focal_level):
    shapes = {
        "backbone.0.patch_embed.proj.weight": (embed_dim, 3, 7, 7),
        "backbone.0.patch_embed.proj.bias": (embed_dim,),
    }
    shapes.update({f"backbone.0.patch_embed.norm.{k}": (embed_dim,) for k in ("weight", "bias")})
    for stage, depth in enumerate(depths):
        dim = embed_dim * 2**stage
        for block in range(depth):
            name = f"backbone.0.layers.{stage}.blocks.{block}"
            shapes.update({f"{name}.gamma_1": (dim,), f"{name}.gamma_2": (dim,)})
            shapes.update({f"{name}.modulation.f.weight": (2 * dim + focal_level + 1, dim)})
            shapes.update({f"{name}.modulation.f.bias": (2 * dim + focal_level + 1,)})
            for level in range(focal_level):
                kernel = 2 * level + 3
                shapes[f"{name}.modulation.focal_layers.{level}.0.weight"] = (dim, 1, kernel, kernel)
            shapes.update({f"{name}.modulation.h.weight": (dim, dim, 1, 1), f"{name}.modulation.h.bias": (dim,)})
            shapes.update({f"{name}.modulation.proj.weight": (dim, dim), f"{name}.modulation.proj.bias": (dim,)})
            shapes.update({f"{name}.mlp.fc1.weight": (4 * dim, dim), f"{name}.mlp.fc1.bias": (4 * dim,)})
            shapes.update({f"{name}.mlp.fc2.weight": (dim, 4 * dim), f"{name}.mlp.fc2.bias": (dim,)})
            shapes.update({f"{name}.norm{i}.{k}": (dim,) for i in (1, 2) for k in ("weight", "bias")})
        if stage < len(depths) - 1:
            name = f"backbone.0.layers.{stage}.downsample"
            shapes.update({f"{name}.proj.weight": (2 * dim, dim, 3, 3), f"{name}.proj.bias": (2 * dim,)})
            shapes.update({f"{name}.norm.{k}": (2 * dim,) for k in ("weight", "bias")})
        if stage > 0:
            shapes.update({f"backbone.1.norm{stage}.{k}": (dim,) for k in ("weight", "bias")})
    return shapes


def test_focalnet_official_shapes_helper_matches_the_real_key_list_at_full_size():
    assert _official_focalnet_shapes(192, (2, 2, 18, 2), 4) == _official_shapes("official_focalnet_l_backbone_keys.tsv")


@pytest.mark.parametrize("size", [(64, 96), (70, 90)])
def test_focalnet_official_checkpoint_gives_official_features(size):
    depths, focal_level = (1, 1, 2, 1), 4
    generator = torch.Generator().manual_seed(0)
    checkpoint = _random_official(_official_focalnet_shapes(16, depths, focal_level), generator)
    backbone = FocalNetBackbone(embed_dim=16, depths=depths, focal_level=focal_level).double().eval()
    backbone.load_state_dict(_strip_prefix(convert_backbone_state_dict("focalnet", checkpoint)))
    x = torch.randn(2, 3, *size, generator=generator, dtype=torch.float64)
    expected = _official_focalnet_features(checkpoint, x, depths, focal_level)
    for got, want in zip(backbone(x).values(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_names_fall_into_the_official_optimizer_groups(family):
    """The recipe groups parameters by substrings ("norm"/"bias": no weight decay; "backbone": lr x 0.1), so every
    renamed parameter must keep the official name's group. Position indices are buffers, not parameters."""
    tsv_name, backbone_cls = FAMILIES[family]
    synthetic = {key: torch.empty(shape, device="meta") for key, shape in _official_shapes(tsv_name).items()}
    with torch.device("meta"):
        parameter_names = {f"backbone.{name}" for name, _ in backbone_cls().named_parameters()}
    checked = 0
    for key, value in synthetic.items():
        new_key, _ = BACKBONE_LAYOUTS[family](key, value)
        if new_key in parameter_names:
            no_decay = [any(word in name for word in ("norm", "bias")) for name in (key, new_key)]
            assert no_decay[0] == no_decay[1], (key, new_key)
            checked += 1
    assert checked == len(parameter_names)


def test_pretrained_classification_weights_load_into_the_trunk(tmp_path):
    generator = torch.Generator().manual_seed(0)
    convnext = ConvNeXt(
        [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 2), CNBlockConfig(128, None, 1)]
    )
    swin = SwinTransformer([4, 4], 16, [2, 2, 2, 2], [1, 2, 4, 8], [7, 7])
    detector_shapes = _official_focalnet_shapes(16, (1, 1, 2, 1), 4)
    focalnet = {k[len("backbone.0.") :]: v for k, v in detector_shapes.items() if k.startswith("backbone.0.")}
    focalnet = _random_official(
        {**focalnet, "norm.weight": (128,), "norm.bias": (128,), "head.weight": (10, 128)}, generator
    )
    cases = [
        ("convnext", convnext.state_dict(), ConvNeXtBackbone(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1))),
        ("swin", swin.state_dict(), SwinBackbone(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))),
        ("focalnet", focalnet, FocalNetBackbone(embed_dim=16, depths=(1, 1, 2, 1))),
    ]
    for family, classification, backbone in cases:
        source, destination = tmp_path / f"{family}_cls.pth", tmp_path / f"{family}_d2.pth"
        torch.save({"model": classification}, source)
        save_pretrained_trunk(family, str(source), str(destination))
        trunk = torch.load(destination, weights_only=True)["model"]
        result = backbone.load_state_dict(_strip_prefix(trunk), strict=False)
        assert not result.unexpected_keys
        # only FocalNet's detection output norms have no classification counterpart
        assert set(result.missing_keys) == {k for k in backbone.state_dict() if k.startswith("output_norms.")}
        loaded = backbone.state_dict()
        for key, value in _strip_prefix(trunk).items():
            torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown backbone family"):
        pretrained_trunk_state_dict("resnet", {})


def _official_large_checkpoint(tsv_name):
    """A synthetic full official checkpoint: the R50 model's non-backbone entries with the channel mapper sized for
    384/768/1536 inputs (as ``ChannelMapper(in_channels=backbone.num_channels)`` builds it), plus the backbone list."""
    entries = read_official_keys(DESIGN / "official_r50_state_dict_keys.tsv")
    shapes = {entry.key: entry.shape for entry in entries if not entry.key.startswith("backbone.")}
    for level, (channels, kernel) in enumerate([(384, 1), (768, 1), (1536, 1), (1536, 3)]):
        shapes[f"neck.convs.{level}.0.weight"] = (256, channels, kernel, kernel)
    shapes.update(_official_shapes(tsv_name))
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.mark.parametrize(
    "name, tsv_name",
    [
        ("convnext_l", "official_convnext_l_backbone_keys.tsv"),
        ("swin_l", "official_swin_l_backbone_keys.tsv"),
        ("focalnet_l", "official_focalnet_l_backbone_keys.tsv"),
    ],
)
def test_converter_fills_every_entry_of_the_large_backbone_models(name, tsv_name):
    from detectron2.config import LazyConfig, instantiate

    from salience_detr.checkpoint.official import backbone_family, convert_official_state_dict

    with torch.device("meta"):
        model = instantiate(LazyConfig.load(f"configs/models/salience_detr_{name}.py").model)
    target = model.state_dict()
    official = _official_large_checkpoint(tsv_name)
    converted = convert_official_state_dict(
        official, {k: v.shape for k, v in target.items()}, backbone_family(model.backbone)
    )
    assert set(converted) == set(target)
    assert sum(k.startswith("backbone.") for k in converted) == sum(k.startswith("backbone.") for k in official)
