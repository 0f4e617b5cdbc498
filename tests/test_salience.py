import pytest
import torch
import torch.nn.functional as F

from salience_detr.layers.levels import level_start_index
from salience_detr.modeling.salience import MaskPredictor, salience_maps, select_salient_tokens

LEVEL_RATIOS = torch.tensor([0.4, 0.8, 1.0, 1.0])
LAYER_RATIOS = torch.tensor([1.0, 0.8, 0.6, 0.6, 0.4, 0.2])


def _level_masks(padded_hw, image_hws, shapes):
    """Per-level masks by nearest interpolation of the full-resolution padding mask (docs/model.md#padding-masks)."""
    full = torch.ones(len(image_hws), *padded_hw, dtype=torch.bool)
    for b, (h, w) in enumerate(image_hws):
        full[b, :h, :w] = False
    return [F.interpolate(full[None].float(), size=shape)[0].bool() for shape in shapes]


def _start_index(shapes):
    return level_start_index(torch.tensor(shapes))


def _random_salience(batch, shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, h, w, generator=generator) for h, w in shapes]


def _select(shapes, masks, seed=0):
    salience = _random_salience(masks[0].shape[0], shapes, seed)
    return salience, select_salient_tokens(salience, masks, _start_index(shapes), LEVEL_RATIOS, LAYER_RATIOS)


def test_mask_predictor_parameters_init_and_keys():
    predictor = MaskPredictor(256, 256)
    assert sum(p.numel() for p in predictor.parameters()) == 107_521
    keys = set(predictor.state_dict())
    assert {"layer1.0.weight", "layer1.1.weight", "layer2.0.weight", "layer2.2.weight", "layer2.4.bias"} <= keys
    for linear in (predictor.layer1[1], predictor.layer2[0], predictor.layer2[2], predictor.layer2[4]):
        assert torch.count_nonzero(linear.bias) == 0


def test_mask_predictor_global_half_is_level_mean():
    torch.manual_seed(0)
    predictor = MaskPredictor(16, 16).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    z = predictor.layer1(x)
    z = torch.cat([z[..., :8], z[..., 8:].mean(1, keepdim=True).expand(-1, 7, -1)], -1)
    torch.testing.assert_close(predictor(x), predictor.layer2(z))
    assert predictor(x).shape == (2, 7, 1)


def test_salience_maps_top_down_fusion_by_hand():
    torch.manual_seed(0)
    predictor = MaskPredictor(8, 8).double()
    shapes = [(3, 3), (2, 2)]
    memory = torch.randn(1, 13, 8, dtype=torch.float64)
    alpha = torch.tensor([0.25], dtype=torch.float64)
    maps = salience_maps(memory, torch.tensor(shapes), _start_index(shapes), predictor, alpha)
    assert [tuple(m.shape) for m in maps] == [(1, 1, 3, 3), (1, 1, 2, 2)]

    coarse = predictor(memory[:, 9:])[0, :, 0]  # row-major 2x2 logits a, b, c, d
    a, b, c, d = coarse.tolist()
    up = torch.tensor(  # bilinear, align_corners=True, 2x2 -> 3x3
        [a, (a + b) / 2, b, (a + c) / 2, (a + b + c + d) / 4, (b + d) / 2, c, (c + d) / 2, d], dtype=torch.float64
    )
    fine_memory = memory[:, :9] * (1 + 0.25 * up[None, :, None])
    torch.testing.assert_close(maps[1].flatten(), coarse)
    torch.testing.assert_close(maps[0].flatten(), predictor(fine_memory).flatten())


def test_salience_maps_rejects_wrong_alpha():
    shapes = [(2, 2), (1, 1)]
    with pytest.raises(ValueError, match="alpha"):
        salience_maps(
            torch.randn(1, 5, 8), torch.tensor(shapes), _start_index(shapes), MaskPredictor(8, 8), torch.ones(3)
        )


@pytest.mark.parametrize(
    "image_hw, padded_hw, shapes, focus, per_layer",
    [
        (
            (800, 1066),
            (800, 1088),
            [(100, 136), (50, 68), (25, 34), (13, 17)],
            9111,
            [9111, 7288, 5466, 5466, 3644, 1822],
        ),
        ((512, 512), (512, 512), [(64, 64), (32, 32), (16, 16), (8, 8)], 2777, [2777, 2221, 1666, 1666, 1110, 555]),
    ],
)
def test_keep_counts_match_spec_worked_examples(image_hw, padded_hw, shapes, focus, per_layer):
    masks = _level_masks(padded_hw, [image_hw], shapes)
    _, (foreground, focus_nums, layer_indices) = _select(shapes, masks)
    assert focus_nums.tolist() == [focus] and focus_nums.dtype == torch.int64
    assert [idx.shape[1] for idx in layer_indices] == per_layer
    assert all(idx.dtype == torch.int64 for idx in layer_indices)
    assert foreground.shape == (1, sum(h * w for h, w in shapes))


def test_mixed_batch_budgets_batch_max_and_global_ranking():
    shapes = [(16, 20), (8, 10), (4, 5), (2, 3)]
    masks = _level_masks((128, 160), [(128, 160), (64, 96)], shapes)
    salience, (foreground, focus_nums, layer_indices) = _select(shapes, masks, seed=1)
    valid = torch.stack([(~m).sum((1, 2)) for m in masks], -1)
    focus = (valid.float() * LEVEL_RATIOS).long()
    assert focus_nums.tolist() == focus.sum(-1).tolist()
    assert focus_nums[0] > focus_nums[1]
    ranking = layer_indices[0]
    assert ranking.shape[1] == focus.max(0).values.sum()

    # the ranking is sorted by the level-masked score, descending, and each layer takes a prefix of it
    ranked_scores = torch.cat([s.flatten(1).masked_fill(m.flatten(1), s.min()) for s, m in zip(salience, masks)], 1)
    picked = ranked_scores.gather(1, ranking)
    assert (picked[:, :-1] >= picked[:, 1:]).all()
    for idx in layer_indices[1:]:
        torch.testing.assert_close(idx, ranking[:, : idx.shape[1]])

    # per level, the picks are the top level_k valid scores, with padding only after every valid token
    starts = _start_index(shapes).tolist()
    for level, (start, (h, w)) in enumerate(zip(starts, shapes)):
        in_level = (ranking >= start) & (ranking < start + h * w)
        for b in range(2):
            local = ranking[b][in_level[b]] - start
            level_scores = ranked_scores[b, start : start + h * w]
            expected = level_scores.topk(len(local)).values
            torch.testing.assert_close(level_scores[local].sort(descending=True).values, expected)
            chosen_valid = (~masks[level][b].flatten())[local]
            assert chosen_valid.sum() == min(len(local), int(valid[b, level]))

    # padding is scored at the global minimum in the encoder's foreground score
    mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
    all_scores = torch.cat([s.flatten(1) for s in salience], 1)
    assert (foreground[mask_flatten] == all_scores.min()).all()
    torch.testing.assert_close(foreground[~mask_flatten], all_scores[~mask_flatten])


def test_tiny_input_runs_with_empty_levels():
    shapes = [(2, 2), (1, 1)]
    masks = _level_masks((2, 2), [(2, 2)], shapes)
    salience = _random_salience(1, shapes)
    foreground, focus_nums, layer_indices = select_salient_tokens(
        salience, masks, _start_index(shapes), torch.tensor([0.2, 1.0]), LAYER_RATIOS
    )
    assert focus_nums.tolist() == [1]
    assert [idx.shape[1] for idx in layer_indices] == [1, 0, 0, 0, 0, 0]
    assert layer_indices[0].item() == 4


def test_select_rejects_mismatched_levels():
    """Ratios outside [0, 1] are refused by SalienceTransformer's constructor (tests/test_sync_budget.py)."""
    shapes = [(2, 2), (1, 1)]
    masks = _level_masks((2, 2), [(2, 2)], shapes)
    salience = _random_salience(1, shapes)
    with pytest.raises(ValueError, match="one entry per level"):
        select_salient_tokens(salience[:1], masks, _start_index(shapes), torch.ones(2), LAYER_RATIOS)
    with pytest.raises(ValueError, match="does not match mask"):
        select_salient_tokens(salience[::-1], masks, _start_index(shapes), torch.ones(2), LAYER_RATIOS)


def test_scoring_and_selection_under_autocast():
    torch.manual_seed(0)
    shapes = [(8, 10), (4, 5), (2, 3)]
    predictor = MaskPredictor(32, 32)
    memory = torch.randn(2, sum(h * w for h, w in shapes), 32)
    masks = _level_masks((64, 80), [(64, 80), (40, 48)], shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = salience_maps(memory, torch.tensor(shapes), _start_index(shapes), predictor, torch.full((2,), 0.1))
        foreground, focus_nums, layer_indices = select_salient_tokens(
            maps, masks, _start_index(shapes), LEVEL_RATIOS[:3], LAYER_RATIOS
        )
    assert [tuple(m.shape) for m in maps] == [(2, 1, h, w) for h, w in shapes]
    valid = torch.stack([(~m).sum((1, 2)) for m in masks], -1)
    assert focus_nums.tolist() == (valid.float() * LEVEL_RATIOS[:3]).long().sum(-1).tolist()
    assert torch.isfinite(foreground.float()).all()
    assert layer_indices[0].shape[1] == focus_nums[0]  # the unpadded image holds every level's batch maximum


def test_salience_maps_backpropagate_to_alpha_and_coarser_levels():
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 2)]
    predictor = MaskPredictor(8, 8)
    memory = torch.randn(1, 20, 8, requires_grad=True)
    alpha = torch.nn.Parameter(torch.tensor([0.2]))
    maps = salience_maps(memory, torch.tensor(shapes), _start_index(shapes), predictor, alpha)
    maps[0].sum().backward()
    assert alpha.grad is not None and alpha.grad.abs().item() > 0
    assert memory.grad[:, 16:].abs().sum() > 0  # the finest map depends on the coarse level through the fusion
