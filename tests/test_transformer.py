import math

import pytest
import torch

from salience_detr.modeling.decoder import SalienceDecoder, SalienceDecoderLayer
from salience_detr.modeling.denoising import GenerateCDNQueries
from salience_detr.modeling.encoder import SalienceEncoder, SalienceEncoderLayer
from salience_detr.modeling.neck import RepVGGPluXNetwork
from salience_detr.modeling.transformer import SalienceTransformer

D_MODEL = 64
NUM_CLASSES = 3


def make_transformer(num_queries=50, with_neck=True, enc_layers=2, dec_layers=2):
    torch.manual_seed(0)
    encoder = SalienceEncoder(
        SalienceEncoderLayer(embed_dim=D_MODEL, ffn_dim=128, num_heads=4, num_levels=4, num_points=2, topk_sa=20),
        num_layers=enc_layers,
        embed_dim=D_MODEL,
    )
    decoder = SalienceDecoder(
        SalienceDecoderLayer(embed_dim=D_MODEL, ffn_dim=128, num_heads=4, num_levels=4, num_points=2),
        num_layers=dec_layers,
        num_classes=NUM_CLASSES,
    )
    neck = RepVGGPluXNetwork((D_MODEL,) * 4, (D_MODEL,) * 4, groups=4, num_blocks=1) if with_neck else None
    return SalienceTransformer(
        encoder,
        neck,
        decoder,
        num_classes=NUM_CLASSES,
        num_queries=num_queries,
        embed_dim=D_MODEL,
        layer_filter_ratio=(1.0, 0.5)[:enc_layers],
    )


def make_inputs(batch=2, base=(16, 20)):
    shapes = [base]
    for _ in range(3):  # stride-2 convs round up
        shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
    features = [torch.randn(batch, D_MODEL, sh, sw) for sh, sw in shapes]
    masks = [torch.zeros(batch, sh, sw, dtype=torch.bool) for sh, sw in shapes]
    for mask in masks:  # second image: right half padded
        mask[1:, :, mask.shape[-1] // 2 + 1 :] = True
    pos = [torch.randn(batch, D_MODEL, sh, sw) for sh, sw in shapes]
    return features, masks, pos


def test_state_dict_has_official_top_level_keys_and_tied_class_head():
    transformer = make_transformer()
    state = transformer.state_dict()
    expected_prefixes = [
        "level_embeds",
        "alpha",
        "level_filter_ratio",
        "layer_filter_ratio",
        "enc_output.",
        "enc_output_norm.",
        "encoder.",
        "neck.",
        "decoder.",
        "tgt_embed.",
        "encoder_class_head.",
        "encoder_bbox_head.",
        "enc_mask_predictor.",
    ]
    first_seen = [next(i for i, k in enumerate(state) if k.startswith(p)) for p in expected_prefixes]
    assert first_seen == sorted(first_seen), "state-dict order should follow the official module order"
    assert {k.split(".")[0] for k in state} == {p.rstrip(".") for p in expected_prefixes}
    assert state["encoder.enhance_mcsp.weight"].data_ptr() == state["encoder_class_head.weight"].data_ptr()
    assert state["encoder.enhance_mcsp.bias"].data_ptr() == state["encoder_class_head.bias"].data_ptr()
    assert "encoder_bbox_head.layers.2.weight" in state
    assert state["tgt_embed.weight"].shape == (50, D_MODEL)


def test_init_of_heads_and_alpha():
    transformer = make_transformer()
    bias = transformer.encoder_class_head.bias
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(99)))
    assert torch.all(transformer.encoder_bbox_head.layers[-1].weight == 0)
    assert transformer.alpha.shape == (3,) and transformer.alpha.abs().max() <= 0.3
    assert torch.all(transformer.enc_output.bias == 0)


@pytest.mark.parametrize("with_neck", [True, False])
def test_forward_shapes_with_fewer_queries_than_requested(with_neck):
    transformer = make_transformer(num_queries=900, with_neck=with_neck).eval()
    features, masks, pos = make_inputs()
    with torch.no_grad():
        out = transformer(features, masks, pos)
    num_tokens = sum(f.shape[-2] * f.shape[-1] for f in features)
    q = out.query_index.shape[1]
    assert q == min(900, num_tokens)  # fewer tokens than queries: all of them, the grid-NMS survivors first
    assert out.pred_logits.shape == (2, 2, q, NUM_CLASSES)
    assert out.pred_boxes.shape == (2, 2, q, 4)
    assert out.enc_logits.shape == (2, q, NUM_CLASSES) and out.enc_boxes.shape == (2, q, 4)
    assert [s.shape for s in out.salience] == [(2, 1, f.shape[-2], f.shape[-1]) for f in features]
    assert len(out.layer_indices) == 2
    assert torch.all((out.pred_boxes >= 0) & (out.pred_boxes <= 1))
    assert out.denoising is None


def test_denoising_queries_are_prepended_and_masked():
    transformer = make_transformer(num_queries=30)
    generator = GenerateCDNQueries(num_classes=NUM_CLASSES, label_embed_dim=D_MODEL, denoising_nums=6)
    features, masks, pos = make_inputs()
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])]
    requested = []

    def make_denoising(num_queries):
        requested.append(num_queries)
        return generator(labels, boxes, num_queries)

    out = transformer(features, masks, pos, make_denoising)
    num_dn = out.denoising.label_query.shape[1]
    assert num_dn == 2 * 2 * 3  # n_max 2, 6 // 2 = 3 groups
    assert requested == [out.query_index.shape[1]] == [30]
    assert out.pred_logits.shape[2] == num_dn + 30
    out.pred_logits.sum().backward()
    assert generator.label_encoder.weight.grad.abs().sum() > 0


def test_rejects_wrong_level_count():
    transformer = make_transformer()
    features, masks, pos = make_inputs()
    with pytest.raises(ValueError, match="feature levels"):
        transformer(features[:3], masks[:3], pos[:3])


def test_rejects_position_embedding_of_wrong_width():
    transformer = make_transformer()
    features, masks, pos = make_inputs()
    with pytest.raises(ValueError, match="num_pos_feats"):
        transformer(features, masks, [p[:, : D_MODEL // 2] for p in pos])


def test_rejects_mismatched_filter_ratios():
    with pytest.raises(ValueError, match="layer_filter_ratio"):
        encoder = SalienceEncoder(
            SalienceEncoderLayer(embed_dim=D_MODEL, ffn_dim=64, num_heads=4), num_layers=1, embed_dim=D_MODEL
        )
        decoder = SalienceDecoder(SalienceDecoderLayer(embed_dim=D_MODEL, ffn_dim=64, num_heads=4), 1, NUM_CLASSES)
        SalienceTransformer(encoder, None, decoder, num_classes=NUM_CLASSES, embed_dim=D_MODEL)
