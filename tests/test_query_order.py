"""An explicit query order (parity checks): passed as an argument down to the query selection, no module patched."""

import torch
from detectron2.config import instantiate
from test_meta_arch import tiny_model_config

from salience_detr.checkpoint import parity
from salience_detr.checkpoint.parity import our_stages
from salience_detr.layers.levels import level_start_index
from salience_detr.modeling import transformer as transformer_module
from salience_detr.modeling.two_stage import select_proposals


def test_select_proposals_gathers_the_given_order_and_still_returns_its_own_choice():
    spatial_shapes = torch.tensor([(4, 4), (2, 2)])
    starts = level_start_index(spatial_shapes)
    enc_class, enc_coord = torch.randn(2, 20, 3), torch.rand(2, 20, 4)
    own, own_class, _ = select_proposals(enc_class, enc_coord, spatial_shapes, starts, num_queries=3)
    order = own.flip(1)
    index, cls, coord = select_proposals(enc_class, enc_coord, spatial_shapes, starts, 3, query_order=order)
    assert torch.equal(index, own)
    torch.testing.assert_close(cls, own_class.flip(1))
    for b in range(2):
        torch.testing.assert_close(coord[b], enc_coord[b, order[b]])


def test_parity_stages_run_the_decoder_on_the_given_order_without_patching():
    torch.manual_seed(0)
    model = instantiate(tiny_model_config().model).eval()
    images = parity.parity_images(0, [(64, 96)])
    select_before = transformer_module.select_proposals
    own = our_stages(model, images)
    forced = our_stages(model, images, query_index=own["query_index"].flip(1))
    assert transformer_module.select_proposals is select_before and not model.transformer._forward_pre_hooks
    assert torch.equal(forced["query_index"], own["query_index"])  # the own choice is still reported
    torch.testing.assert_close(forced["enc_logits"], own["enc_logits"].flip(1))
    assert not torch.allclose(forced["decoder.0.boxes"], own["decoder.0.boxes"])
