import math

import pytest
import torch

from salience_detr.layers.position_encoding import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    get_sine_pos_embed,
    sine_frequencies,
)


def test_sine_frequencies_pairs():
    dim_t = sine_frequencies(128, 10000, dtype=torch.float64)
    assert dim_t[0] == dim_t[1] == 1.0
    assert dim_t[2] == dim_t[3] == pytest.approx(10000 ** (2 / 128))
    assert dim_t[127] == pytest.approx(10000 ** (126 / 128))


def test_sine_buffers_are_persistent_and_named():
    module = PositionEmbeddingSine()
    assert set(module.state_dict()) == {"dim_tx", "dim_ty"}
    assert module.dim_tx.shape == (128,)


def test_sine_value_at_known_point_y_first_offset():
    module = PositionEmbeddingSine(num_pos_feats=4).double()
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[:, :, 4:] = True  # last column is padding: 4 valid columns, 3 valid rows
    pos = module(mask)
    assert pos.shape == (1, 8, 3, 5) and pos.dtype == torch.float64
    i, j = 1, 2  # row 1, column 2 -> counts y=2, x=3
    y = (2 - 0.5) / (3 + 1e-6) * 2 * math.pi
    x = (3 - 0.5) / (4 + 1e-6) * 2 * math.pi
    rate = 10000 ** (2 / 4)
    expected = [
        math.sin(y),
        math.cos(y),
        math.sin(y / rate),
        math.cos(y / rate),
        math.sin(x),
        math.cos(x),
        math.sin(x / rate),
        math.cos(x / rate),
    ]
    torch.testing.assert_close(pos[0, :, i, j], torch.tensor(expected, dtype=torch.float64))


def test_sine_normalises_per_image_valid_extent():
    module = PositionEmbeddingSine(num_pos_feats=8)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    pos = module(mask)
    # the valid 2x3 corner of the padded image embeds exactly like an unpadded 2x3 image
    unpadded = module(torch.zeros(1, 2, 3, dtype=torch.bool))
    torch.testing.assert_close(pos[1, :, :2, :3], unpadded[0])
    assert not torch.allclose(pos[0, :, :2, :3], unpadded[0])


def test_sine_rejects_non_bool_mask():
    with pytest.raises(ValueError, match="bool"):
        PositionEmbeddingSine()(torch.zeros(1, 2, 2))


def test_get_sine_pos_embed_order_y_x_w_h():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    embed = get_sine_pos_embed(box, num_pos_feats=4)
    assert embed.shape == (1, 16)
    single = [get_sine_pos_embed(box[:, k : k + 1], num_pos_feats=4, exchange_xy=False) for k in range(4)]
    expected = torch.cat([single[1], single[0], single[2], single[3]], dim=-1)
    torch.testing.assert_close(embed, expected)
    angle = 0.2 * 2 * math.pi  # first block is y
    assert embed[0, 0].item() == pytest.approx(math.sin(angle))
    assert embed[0, 1].item() == pytest.approx(math.cos(angle))


def test_get_sine_pos_embed_without_exchange_and_leading_dims():
    pos = torch.rand(2, 3, 2)
    embed = get_sine_pos_embed(pos, exchange_xy=False)
    assert embed.shape == (2, 3, 256)
    torch.testing.assert_close(embed[..., 0], torch.sin(pos[..., 0] * 2 * math.pi))


def test_get_sine_pos_embed_rejects_single_coordinate_with_exchange():
    with pytest.raises(ValueError, match="exchange_xy"):
        get_sine_pos_embed(torch.rand(3, 1))


def test_learned_embedding_x_first_and_init_range():
    module = PositionEmbeddingLearned(num_embeddings=10, num_pos_feats=4)
    for weight in (module.row_embed.weight, module.col_embed.weight):
        assert weight.min() >= 0 and weight.max() <= 1
    pos = module(3, 5)
    assert pos.shape == (8, 3, 5)
    torch.testing.assert_close(pos[:4, 2, 4], module.col_embed.weight[4])
    torch.testing.assert_close(pos[4:, 2, 4], module.row_embed.weight[2])


def test_learned_embedding_clamps_large_maps():
    module = PositionEmbeddingLearned(num_embeddings=4, num_pos_feats=2)
    pos = module(6, 7)
    assert pos.shape == (4, 6, 7)
    torch.testing.assert_close(pos[:2, 0, 6], module.col_embed.weight[3])
    torch.testing.assert_close(pos[2:, 5, 0], module.row_embed.weight[3])
