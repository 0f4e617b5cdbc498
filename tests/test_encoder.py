import pytest
import torch
import torch.nn.functional as F

from salience_detr.layers.levels import level_start_index
from salience_detr.modeling.encoder import SalienceEncoder, SalienceEncoderLayer, encoder_reference_points
from salience_detr.modeling.salience import select_salient_tokens

D_MODEL, HEADS, LEVELS, POINTS, CLASSES = 32, 4, 2, 2, 5
SHAPES = [(6, 7), (3, 4)]
LAYER_RATIOS = torch.tensor([1.0, 0.8, 0.6, 0.6, 0.4, 0.2])


def make_layer(**overrides):
    sizes = dict(embed_dim=D_MODEL, ffn_dim=64, num_heads=HEADS, num_levels=LEVELS, num_points=POINTS)
    return SalienceEncoderLayer(**sizes, **overrides)


def _tiny_encoder(topk_sa=8, seed=0, max_num_embedding=200):
    torch.manual_seed(seed)
    layer = make_layer(dropout=0.0, topk_sa=topk_sa)
    encoder = SalienceEncoder(layer, num_layers=6, max_num_embedding=max_num_embedding, embed_dim=D_MODEL)
    encoder.enhance_mcsp = torch.nn.Linear(D_MODEL, CLASSES)
    for module in encoder.layers:  # non-trivial deformable attention so every input matters
        torch.nn.init.normal_(module.self_attn.sampling_offsets.weight, std=0.05)
        torch.nn.init.normal_(module.self_attn.attention_weights.weight, std=0.05)
    return encoder.eval()


def _inputs(image_hws, padded_hw, shapes=SHAPES, level_ratios=(0.5, 1.0), dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batch = len(image_hws)
    full = torch.ones(batch, *padded_hw, dtype=torch.bool)
    for b, (h, w) in enumerate(image_hws):
        full[b, :h, :w] = False
    masks = [F.interpolate(full[None].float(), size=s)[0].bool() for s in shapes]
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes.prod(-1)
    start_index = level_start_index(spatial_shapes)
    num_tokens = int(sizes.sum())
    salience = [torch.randn(batch, 1, h, w, generator=generator, dtype=dtype) for h, w in shapes]
    foreground, focus, layer_indices = select_salient_tokens(
        salience, masks, start_index, torch.tensor(level_ratios), LAYER_RATIOS
    )
    valid = torch.stack([(~m[:, :, 0]).sum(1) / m.shape[1] for m in masks], 1)  # rows valid in column 0 -> h
    valid_w = torch.stack([(~m[:, 0, :]).sum(1) / m.shape[2] for m in masks], 1)
    return dict(
        feat_flatten=torch.randn(batch, num_tokens, D_MODEL, generator=generator, dtype=dtype),
        pos=torch.randn(batch, num_tokens, D_MODEL, generator=generator, dtype=dtype),
        spatial_shapes=spatial_shapes,
        level_start_index=start_index,
        valid_ratios=torch.stack([valid_w, valid], -1).to(dtype),
        mask_flatten=torch.cat([m.flatten(1) for m in masks], 1),
        foreground_score=foreground,
        focus_token_nums=focus,
        layer_indices=layer_indices,
    )


def _reference_encoder(encoder, inputs):
    """Loop-based transcription (per image, per token) of docs/model.md#encoder-state to #background-embedding.

    It checks the vectorised encoder.
    """
    feat, pos, mask = inputs["feat_flatten"], inputs["pos"], inputs["mask_flatten"]
    refs = encoder_reference_points(inputs["spatial_shapes"], inputs["valid_ratios"])
    output = feat.clone()
    for layer, idx in zip(encoder.layers, inputs["layer_indices"]):
        batch_rows = torch.arange(idx.shape[0])[:, None]
        query = output[batch_rows, idx]
        new = layer(
            query,
            pos[batch_rows, idx],
            feat,
            refs[batch_rows, idx],
            inputs["spatial_shapes"],
            inputs["level_start_index"],
            mask,
            encoder.enhance_mcsp(query),
            inputs["foreground_score"][batch_rows, idx],
        )
        updated = output.clone()
        for b in range(idx.shape[0]):
            budget = min(int(inputs["focus_token_nums"][b]), idx.shape[1])
            for row in range(budget):
                updated[b, idx[b, row]] = new[b, row]
        output = updated
    background = []
    emb = encoder.background_embedding
    for h, w in inputs["spatial_shapes"].tolist():
        for i in range(h):
            for j in range(w):
                background.append(torch.cat([emb.col_embed.weight[j], emb.row_embed.weight[i]]))
    background = torch.stack(background).expand(feat.shape[0], -1, -1).clone()
    last = inputs["layer_indices"][-1]
    for b in range(feat.shape[0]):
        background[b, last[b]] = 0
        background[b, mask[b]] = 0
    return output + background


def test_layer_and_background_parameter_counts_and_keys():
    layer = SalienceEncoderLayer()
    assert sum(p.numel() for p in layer.parameters()) == 1_545_856
    keys = set(layer.state_dict())
    for key in (
        "pre_attention.in_proj_weight",
        "pre_attention.out_proj.weight",
        "pre_norm.weight",
        "self_attn.sampling_offsets.weight",
        "self_attn.value_proj.bias",
        "norm1.bias",
        "linear1.weight",
        "linear2.weight",
        "norm2.weight",
    ):
        assert key in keys
    encoder = SalienceEncoder(layer, num_layers=2)
    assert sum(p.numel() for p in encoder.background_embedding.parameters()) == 51_200
    assert "enhance_mcsp.weight" not in encoder.state_dict()
    encoder.enhance_mcsp = torch.nn.Linear(256, 91)
    assert encoder.state_dict()["enhance_mcsp.weight"].shape == (91, 256)


def test_layers_are_independent_copies_with_fresh_init():
    encoder = _tiny_encoder()
    first, second = encoder.layers[0], encoder.layers[1]
    assert first.linear1.weight.data_ptr() != second.linear1.weight.data_ptr()
    assert not torch.equal(first.linear1.weight, second.linear1.weight)
    assert not torch.equal(first.pre_attention.in_proj_weight, second.pre_attention.in_proj_weight)


def test_reference_points_xy_order_and_valid_ratios():
    shapes = torch.tensor([[4, 6], [2, 3]])
    valid_ratios = torch.tensor([[[0.5, 0.75], [1.0, 1.0]]], dtype=torch.float64)  # (w, h) per level
    refs = encoder_reference_points(shapes, valid_ratios)
    assert refs.shape == (1, 24 + 6, 2, 2)
    token = 1 * 6 + 2  # level 0, row 1, column 2
    x = (2 + 0.5) / (0.5 * 6)
    y = (1 + 0.5) / (0.75 * 4)
    torch.testing.assert_close(refs[0, token, 0], torch.tensor([x * 0.5, y * 0.75], dtype=torch.float64))
    torch.testing.assert_close(refs[0, token, 1], torch.tensor([x, y], dtype=torch.float64))


def test_encoder_matches_loop_reference_on_mixed_padded_batch():
    encoder = _tiny_encoder(topk_sa=8)
    inputs = _inputs([(48, 56), (30, 26)], (48, 56))
    focus = inputs["focus_token_nums"]
    assert focus[1] < inputs["layer_indices"][0].shape[1]  # the small image has rows beyond its budget
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs), _reference_encoder(encoder, inputs))


def test_rows_beyond_an_image_budget_are_not_written():
    encoder = _tiny_encoder()
    inputs = _inputs([(48, 56), (30, 26)], (48, 56))
    with torch.no_grad():
        out = encoder(**inputs)
    beyond = inputs["layer_indices"][0][1, int(inputs["focus_token_nums"][1]) :]
    assert len(beyond) > 0
    background = encoder.background(inputs["spatial_shapes"])
    keep = inputs["mask_flatten"][1, beyond]
    expected = inputs["feat_flatten"][1, beyond] + background[beyond] * (~keep).unsqueeze(-1)
    torch.testing.assert_close(out[1, beyond], expected)


def test_value_is_the_unencoded_features_in_every_layer():
    encoder = _tiny_encoder()
    inputs = _inputs([(48, 56)], (48, 56))
    seen = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(lambda _m, args: seen.append(args[2])) for layer in encoder.layers
    ]
    with torch.no_grad():
        encoder(**inputs)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 6
    for value in seen:
        assert value is inputs["feat_flatten"]


def test_only_selected_tokens_change_and_background_placement():
    encoder = _tiny_encoder()
    inputs = _inputs([(48, 56), (48, 40)], (48, 56))
    with torch.no_grad():
        out = encoder(**inputs)
    background = encoder.background(inputs["spatial_shapes"]).expand_as(out)
    mask = inputs["mask_flatten"]
    last = inputs["layer_indices"][-1]
    for b in range(2):
        selected = torch.zeros(out.shape[1], dtype=torch.bool)
        budget = int(inputs["focus_token_nums"][b])
        selected[inputs["layer_indices"][0][b, :budget]] = True
        untouched = ~selected
        expected = inputs["feat_flatten"][b] + background[b] * (~mask[b]).unsqueeze(-1)
        torch.testing.assert_close(out[b, untouched], expected[untouched])
        assert not torch.allclose(out[b, selected], expected[selected])
        # no background on the last layer's tokens: their output is the layer output itself (post-LayerNorm)
        last_rows = out[b, last[b, :budget]]
        torch.testing.assert_close(last_rows.mean(-1), torch.zeros(len(last_rows)), atol=1e-5, rtol=0)
    assert mask[1].any()


def test_salient_self_attention_touches_only_top_tokens():
    torch.manual_seed(0)
    layer = make_layer(topk_sa=3).double().eval()
    query = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    pos = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    score_tgt = torch.randn(2, 6, CLASSES, dtype=torch.float64)
    foreground = torch.randn(2, 6, dtype=torch.float64)
    out = layer.salient_self_attention(query, pos, score_tgt, foreground)
    confidence = score_tgt.max(-1).values * foreground
    for b in range(2):
        top = confidence[b].topk(3).indices
        rest = torch.ones(6, dtype=torch.bool)
        rest[top] = False
        torch.testing.assert_close(out[b, rest], query[b, rest])
        x, p = query[b, top][None], pos[b, top][None]
        attended = layer.pre_attention(x + p, x + p, x)[0]
        torch.testing.assert_close(out[b, top], layer.pre_norm(x + attended)[0])


def test_inputs_with_fewer_than_topk_tokens_and_empty_layers_run():
    encoder = _tiny_encoder(topk_sa=300)
    inputs = _inputs([(8, 8)], (8, 8), shapes=[(2, 2), (1, 1)], level_ratios=(0.5, 1.0))
    assert [i.shape[1] for i in inputs["layer_indices"]] == [3, 2, 1, 1, 1, 0]
    with torch.no_grad():
        out = encoder(**inputs)
    assert out.shape == (1, 5, D_MODEL) and torch.isfinite(out).all()


def test_maps_larger_than_background_table_run():
    encoder = _tiny_encoder(max_num_embedding=4)
    inputs = _inputs([(48, 56)], (48, 56))
    with torch.no_grad():
        out = encoder(**inputs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_gradients(dtype):
    encoder = _tiny_encoder().to(dtype).train()
    inputs = _inputs([(48, 56), (40, 56)], (48, 56), dtype=dtype)
    inputs["feat_flatten"].requires_grad_(True)
    out = encoder(**inputs)
    assert out.dtype == dtype
    out.square().sum().backward()
    assert inputs["feat_flatten"].grad is not None
    assert encoder.layers[5].linear2.weight.grad is not None
    assert encoder.background_embedding.row_embed.weight.grad is not None


def test_autocast_runs():
    encoder = _tiny_encoder()
    inputs = _inputs([(48, 56)], (48, 56))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(**inputs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_clear_errors_for_missing_head_and_bad_inputs():
    layer = make_layer()
    encoder = SalienceEncoder(layer, num_layers=6, embed_dim=D_MODEL)
    inputs = _inputs([(48, 56)], (48, 56))
    with pytest.raises(RuntimeError, match="encoder_class_head"):
        encoder(**inputs)
    encoder.enhance_mcsp = torch.nn.Linear(D_MODEL, CLASSES)
    with pytest.raises(ValueError, match="one index tensor per layer"):
        encoder(**{**inputs, "layer_indices": inputs["layer_indices"][:2]})
    with pytest.raises(ValueError, match="feat_flatten"):
        encoder(**{**inputs, "feat_flatten": inputs["feat_flatten"][:, :-1]})
    with pytest.raises(ValueError, match="embed_dim"):
        SalienceEncoder(layer, embed_dim=64)
