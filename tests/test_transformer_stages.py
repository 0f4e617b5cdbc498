"""SalienceTransformer's forward stages one by one: each does its own part and the forward is their composition."""

import pytest
import torch
from test_transformer import D_MODEL, NUM_CLASSES, make_inputs, make_transformer

from salience_detr.modeling.denoising import GenerateCDNQueries


def test_flatten_inputs_lays_out_tokens_level_by_level_with_level_embeddings():
    transformer = make_transformer()
    features, masks, pos = make_inputs()
    flat = transformer.flatten_inputs(features, masks, pos)
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    assert flat.spatial_shapes.tolist() == [list(f.shape[-2:]) for f in features]
    assert flat.level_start_index.tolist() == [0, sizes[0], sum(sizes[:2]), sum(sizes[:3])]
    assert flat.tokens.shape == flat.positions.shape == (2, sum(sizes), D_MODEL)
    last = flat.level_start_index[-1]
    torch.testing.assert_close(flat.tokens[:, last], features[-1][:, :, 0, 0])
    torch.testing.assert_close(flat.positions[:, last], pos[-1][:, :, 0, 0] + transformer.level_embeds[-1])
    assert flat.masks[1].any() and not flat.masks[0].any()
    assert flat.valid_ratios.shape == (2, 4, 2) and (flat.valid_ratios[1, :, 0] < 1).all()


def test_stages_compose_to_the_forward():
    transformer = make_transformer().eval()
    features, masks, pos = make_inputs()
    with torch.no_grad():
        out = transformer(features, masks, pos)
        flat = transformer.flatten_inputs(features, masks, pos)
        memory, salience, layer_indices = transformer.encode(flat, masks)
        query_index, enc_logits, enc_boxes = transformer.propose(memory, flat)
    assert torch.equal(query_index, out.query_index)
    assert torch.equal(enc_boxes, out.enc_boxes) and torch.equal(enc_logits, out.enc_logits)
    assert all(torch.equal(a, b) for a, b in zip(layer_indices, out.layer_indices))
    assert all(torch.equal(a, b) for a, b in zip(salience, out.salience))
    assert memory.shape == flat.tokens.shape


def test_decoder_queries_prepend_denoising_only_when_asked():
    transformer = make_transformer(num_queries=30)
    enc_boxes = torch.rand(2, 30, 4, requires_grad=True)
    target, reference, mask, denoising = transformer.decoder_queries(enc_boxes, None)
    assert mask is None and denoising is None and not reference.requires_grad
    torch.testing.assert_close(target[1], transformer.tgt_embed.weight)
    generator = GenerateCDNQueries(num_classes=NUM_CLASSES, label_embed_dim=D_MODEL, denoising_nums=4)
    labels, boxes = [torch.tensor([0]), torch.tensor([1, 2])], [torch.rand(1, 4) * 0.5, torch.rand(2, 4) * 0.5]
    target, reference, mask, denoising = transformer.decoder_queries(
        enc_boxes, lambda num_queries: generator(labels, boxes, num_queries)
    )
    num_dn = denoising.label_query.shape[1]
    assert target.shape == (2, num_dn + 30, D_MODEL) and reference.shape == (2, num_dn + 30, 4)
    assert mask.shape == (num_dn + 30, num_dn + 30)
    torch.testing.assert_close(reference[:, num_dn:], enc_boxes.detach())


def test_check_inputs_names_the_setting_to_fix():
    transformer = make_transformer()
    features, _, pos = make_inputs()
    with pytest.raises(ValueError, match="num_outs"):
        transformer.check_inputs(features[:3], pos[:3])
    with pytest.raises(ValueError, match="num_pos_feats"):
        transformer.check_inputs(features, [p[:, : D_MODEL // 2] for p in pos])
