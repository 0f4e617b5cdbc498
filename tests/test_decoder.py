import math

import torch

from salience_detr.layers.box_ops import inverse_sigmoid
from salience_detr.layers.levels import level_start_index
from salience_detr.modeling.decoder import SalienceDecoder, SalienceDecoderLayer

D_MODEL = 32


def level_layout(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    return spatial_shapes, level_start_index(spatial_shapes)


def make_decoder(num_layers=3, num_classes=5):
    torch.manual_seed(0)
    layer = SalienceDecoderLayer(embed_dim=D_MODEL, ffn_dim=64, num_heads=4, num_levels=2, num_points=2)
    return SalienceDecoder(layer, num_layers=num_layers, num_classes=num_classes)


def decoder_inputs(batch=2, queries=7):
    spatial_shapes, level_start_index = level_layout([(6, 5), (3, 3)])
    value = torch.randn(batch, int(spatial_shapes.prod(1).sum()), D_MODEL)
    query = torch.randn(batch, queries, D_MODEL)
    reference = torch.rand(batch, queries, 4) * 0.8 + 0.1
    valid_ratios = torch.tensor([[1.0, 1.0], [0.8, 0.6]])[:batch, None].expand(-1, 2, -1).contiguous()
    return query, reference, value, spatial_shapes, level_start_index, valid_ratios


def test_state_dict_keys_follow_official_names():
    keys = set(make_decoder(num_layers=2).state_dict())
    for name in [
        "cross_attn.sampling_offsets.weight",
        "norm1.weight",
        "self_attn.in_proj_weight",
        "norm2.bias",
        "linear1.weight",
        "linear2.weight",
        "norm3.weight",
    ]:
        assert f"layers.1.{name}" in keys
    for name in [
        "ref_point_head.layers.0.weight",
        "ref_point_head.layers.1.bias",
        "class_head.1.weight",
        "bbox_head.1.layers.2.weight",
        "norm.weight",
    ]:
        assert name in keys
    assert "bbox_head.1.layers.3.weight" not in keys


def test_init_prior_bias_and_zero_box_layer():
    decoder = make_decoder()
    for head in decoder.class_head:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, -math.log(99)))
    for head in decoder.bbox_head:
        assert torch.all(head.layers[-1].weight == 0) and torch.all(head.layers[-1].bias == 0)
    assert decoder.ref_point_head.layers[0].in_features == 2 * D_MODEL


def test_output_shapes_and_first_box_is_reference_at_init():
    decoder = make_decoder(num_layers=3)
    query, reference, *rest = decoder_inputs()
    logits, boxes, _ = decoder(query, reference, *rest)
    assert logits.shape == (3, 2, 7, 5) and boxes.shape == (3, 2, 7, 4)
    torch.testing.assert_close(boxes[0], inverse_sigmoid(reference).sigmoid())


def test_next_reference_comes_from_unnormalised_query_and_look_forward_twice():
    decoder = make_decoder(num_layers=2)
    with torch.no_grad():
        for head in decoder.bbox_head:
            head.layers[-1].weight.normal_(std=0.1)
        decoder.norm.weight.uniform_(0.5, 1.5)
        decoder.norm.bias.normal_(std=0.5)
    query, reference, *rest = decoder_inputs()
    layer_queries = []
    hooks = [
        layer.register_forward_hook(lambda module, args, out: layer_queries.append(out)) for layer in decoder.layers
    ]
    _, boxes, _ = decoder(query, reference, *rest)
    for hook in hooks:
        hook.remove()
    q0, q1 = layer_queries
    from_raw = (decoder.bbox_head[0](q0) + inverse_sigmoid(reference)).sigmoid()
    from_normed = (decoder.bbox_head[0](decoder.norm(q0)) + inverse_sigmoid(reference)).sigmoid()
    assert not torch.allclose(from_raw, from_normed, atol=1e-4)
    expected_box1 = (decoder.bbox_head[1](decoder.norm(q1)) + inverse_sigmoid(from_raw)).sigmoid()
    torch.testing.assert_close(boxes[1], expected_box1)

    # the loss on layer 1's boxes reaches layer 0's box head (reference kept in the graph)
    decoder.zero_grad()
    boxes[1].sum().backward()
    assert decoder.bbox_head[0].layers[-1].weight.grad.abs().sum() > 0


def test_box_of_first_layer_does_not_train_other_box_heads():
    decoder = make_decoder(num_layers=2)
    inputs = decoder_inputs()
    _, boxes, _ = decoder(*inputs)
    boxes[0].sum().backward()
    grad = decoder.bbox_head[1].layers[0].weight.grad
    assert grad is None or torch.all(grad == 0)
    assert decoder.bbox_head[0].layers[-1].weight.grad.abs().sum() > 0


def test_attention_mask_blocks_queries():
    decoder = make_decoder(num_layers=1)
    query, reference, *rest = decoder_inputs(batch=1, queries=4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2:, :2] = True  # queries 2,3 cannot see 0,1
    logits, _, _ = decoder(query, reference, *rest, attn_mask=mask)
    changed = query.clone()
    changed[:, :2] += 1.0
    changed_ref = reference.clone()
    logits_changed, _, _ = decoder(changed, changed_ref, *rest, attn_mask=mask)
    torch.testing.assert_close(logits[:, :, 2:], logits_changed[:, :, 2:])
    assert not torch.allclose(logits[:, :, :2], logits_changed[:, :, :2])
