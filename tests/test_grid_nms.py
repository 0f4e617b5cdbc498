"""Grid NMS of the two-stage query selection: the compiled op against torchvision's NMS, the fixed-size selection.

The op's rule (a kept token in the same cell or a side neighbour on the same level suppresses) is checked against
torchvision's IoU arithmetic, its masks against ``torchvision.ops.batched_nms`` on random candidates, and the
selection for batch independence, its order, its equality with the survivors-only selection when there are
enough survivors, the tracing and fallback paths, and the absence of host syncs.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from salience_detr.layers.grid_nms import GRID_RULE_IOU_RANGE, compiled_grid_nms, grid_nms_available
from salience_detr.layers.levels import level_start_index
from salience_detr.modeling import two_stage
from salience_detr.modeling.two_stage import grid_nms, torchvision_keep_mask
from salience_detr.utils.dispatch_count import count_dispatch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Non-square levels, one level a single column, one a single cell.
SHAPES = ((9, 13), (5, 7), (6, 1), (1, 1))
NUM_TOKENS = sum(height * width for height, width in SHAPES)


def layout(shapes=SHAPES, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    return spatial_shapes, level_start_index(spatial_shapes)


def random_candidates(batch: int, num_candidates: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct tokens per image with distinct scores, sorted best first (what torch.topk returns)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.stack([torch.randperm(NUM_TOKENS, generator=generator)[:num_candidates] for _ in range(batch)])
    scores = torch.rand(batch, num_candidates, generator=generator, dtype=torch.float64).float()
    scores, order = scores.sort(dim=1, descending=True)
    return scores.to(device), tokens.gather(1, order).to(device)


def survivors_per_image(scores, tokens, spatial_shapes, starts) -> list[list[int]]:
    """Each image's NMS survivors in score order, from torchvision, one image at a time (the official selection)."""
    return [
        tokens[b][torchvision_keep_mask(scores[b : b + 1], tokens[b : b + 1], spatial_shapes, starts)[0]].tolist()
        for b in range(tokens.shape[0])
    ]


@pytest.mark.parametrize("threshold", [0.3, 0.143, 0.333])
def test_nms_on_grid_boxes_suppresses_exactly_the_same_cell_and_side_neighbours(threshold):
    """torchvision's IoU inside the grid rule's range (1/7, 1/3): (1, 0) has IoU 1/3, (1, 1) 1/7, (2, 0) none."""
    for dx in range(-3, 4):
        for dy in range(-3, 4):
            boxes = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [dx - 1.0, dy - 1.0, dx + 1.0, dy + 1.0]])
            kept = torchvision.ops.nms(boxes, torch.tensor([2.0, 1.0]), threshold).tolist()
            assert (kept == [0]) == (abs(dx) + abs(dy) <= 1), (dx, dy, threshold)


def test_diagonal_neighbours_are_suppressed_below_the_rule_range():
    """Just below 1/7 NMS suppresses the diagonal too: the op must not be used there."""
    boxes = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([2.0, 1.0]), GRID_RULE_IOU_RANGE[0] - 1e-3).tolist() == [0]


@pytest.mark.parametrize("seed", range(6))
def test_compiled_mask_equals_torchvision_on_random_candidates(seed):
    spatial_shapes, starts = layout()
    scores, tokens = random_candidates(batch=3, num_candidates=[40, 120, NUM_TOKENS][seed % 3], seed=seed)
    compiled = compiled_grid_nms(tokens, spatial_shapes, starts, NUM_TOKENS)
    assert compiled.dtype == torch.bool and compiled.shape == tokens.shape
    assert torch.equal(compiled, torchvision_keep_mask(scores, tokens, spatial_shapes, starts))
    assert 0 < int(compiled.sum()) < compiled.numel()


def test_repeated_token_is_suppressed_like_an_identical_box():
    spatial_shapes, starts = layout()
    tokens = torch.tensor([[5, 5, 40, 5, 41]])
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    compiled = compiled_grid_nms(tokens, spatial_shapes, starts, NUM_TOKENS)
    assert compiled.tolist() == [[True, False, True, False, False]]
    assert torch.equal(compiled, torchvision_keep_mask(scores, tokens, spatial_shapes, starts))


def test_levels_and_images_do_not_suppress_each_other():
    spatial_shapes, starts = layout([(3, 3), (3, 3)])
    # token 4 is the centre of level 0, 13 the centre of level 1, 5 the right neighbour of 4, 3 its left one
    tokens = torch.tensor([[4, 13, 5], [5, 3, 4]])
    assert compiled_grid_nms(tokens, spatial_shapes, starts, 18).tolist() == [[True, True, False], [True, True, False]]


def test_a_row_end_is_not_a_neighbour_of_the_next_row_start():
    spatial_shapes, starts = layout([(3, 4)])
    tokens = torch.tensor([[7, 8, 3]])  # (1, 3) and (2, 0) are consecutive tokens but 4 cells apart; (0, 3) is above
    compiled = compiled_grid_nms(tokens, spatial_shapes, starts, 12)
    assert compiled.tolist() == [[True, True, False]]
    assert torch.equal(compiled, torchvision_keep_mask(torch.tensor([[3.0, 2.0, 1.0]]), tokens, spatial_shapes, starts))


def test_the_op_passes_opcheck():
    spatial_shapes, starts = layout()
    _, tokens = random_candidates(batch=2, num_candidates=50, seed=0)
    torch.library.opcheck(torch.ops.salience_detr.grid_nms, (tokens, spatial_shapes, starts, NUM_TOKENS))


def test_bad_arguments_are_refused_with_the_fix():
    spatial_shapes, starts = layout()
    tokens = torch.tensor([[3, NUM_TOKENS]])
    with pytest.raises(RuntimeError, match=r"outside the image's tokens \[0, \d+\); pass flat token indices"):
        compiled_grid_nms(tokens, spatial_shapes, starts, NUM_TOKENS)
    with pytest.raises(RuntimeError, match="token_index must be int64.*dtype=torch.long"):
        compiled_grid_nms(tokens.int(), spatial_shapes, starts, NUM_TOKENS)
    with pytest.raises(RuntimeError, match="token_index must be 2-D"):
        compiled_grid_nms(tokens[0], spatial_shapes, starts, NUM_TOKENS)
    with pytest.raises(RuntimeError, match=r"level_start_index must be \(num_levels,\)"):
        compiled_grid_nms(tokens, spatial_shapes, starts[:2], NUM_TOKENS)
    with pytest.raises(RuntimeError, match="num_tokens must be"):
        compiled_grid_nms(tokens, spatial_shapes, starts, -1)


def crowded_and_sparse_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0: a whole 9x13 level, 35 survivors out of 117; image 1: every second column, all 63 survive."""
    crowded = torch.arange(117)
    sparse = torch.tensor([y * 13 + x for y in range(9) for x in range(0, 13, 2)])
    tokens = torch.stack([crowded[:63], sparse])
    scores = torch.linspace(1.0, 0.0, 63).expand(2, -1).contiguous()
    return scores, tokens


def test_an_image_selects_the_same_queries_alone_and_in_any_batch():
    spatial_shapes, starts = layout()
    scores, tokens = crowded_and_sparse_images()
    together = grid_nms(scores, tokens, spatial_shapes, starts, max_keep=50, num_tokens=NUM_TOKENS)
    assert together.shape == (2, 50)
    for b in range(2):
        alone = grid_nms(scores[b : b + 1], tokens[b : b + 1], spatial_shapes, starts, 50, num_tokens=NUM_TOKENS)
        assert torch.equal(alone[0], together[b])


def test_survivors_come_first_then_the_suppressed_each_in_score_order():
    spatial_shapes, starts = layout()
    scores, tokens = random_candidates(batch=2, num_candidates=80, seed=3)
    selected = grid_nms(scores, tokens, spatial_shapes, starts, 70, num_tokens=NUM_TOKENS)
    keep = torchvision_keep_mask(scores, tokens, spatial_shapes, starts)
    for b in range(2):
        expected = torch.cat([tokens[b][keep[b]], tokens[b][~keep[b]]])[:70]
        assert torch.equal(selected[b], expected)
    assert grid_nms(scores, tokens, spatial_shapes, starts, 500, num_tokens=NUM_TOKENS).shape == (2, 80)


def test_with_enough_survivors_the_selection_is_the_first_survivors_of_each_image():
    spatial_shapes, starts = layout()
    scores, tokens = random_candidates(batch=3, num_candidates=150, seed=7)
    survivors = survivors_per_image(scores, tokens, spatial_shapes, starts)
    max_keep = min(len(kept) for kept in survivors)
    selected = grid_nms(scores, tokens, spatial_shapes, starts, max_keep, num_tokens=NUM_TOKENS)
    assert selected.tolist() == [kept[:max_keep] for kept in survivors]


def test_tracing_runs_torchvision_nms_with_the_same_result():
    spatial_shapes, starts = layout()
    scores, tokens = random_candidates(batch=2, num_candidates=90, seed=4)

    def select(scores, tokens):
        return grid_nms(scores, tokens, spatial_shapes, starts, 60, num_tokens=NUM_TOKENS)

    traced = torch.jit.trace(select, (scores, tokens), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "torchvision::nms" in graph and "salience_detr::grid_nms" not in graph
    assert torch.equal(traced(scores, tokens), select(scores, tokens))


def test_without_the_op_the_torchvision_path_gives_the_same_selection(monkeypatch):
    spatial_shapes, starts = layout()
    scores, tokens = random_candidates(batch=3, num_candidates=100, seed=5)
    with count_dispatch() as compiled_counts:
        compiled = grid_nms(scores, tokens, spatial_shapes, starts, 60, num_tokens=NUM_TOKENS)
    monkeypatch.setattr(two_stage, "grid_nms_available", lambda device: (False, "not built"))
    with count_dispatch() as fallback_counts:
        fallback = grid_nms(scores, tokens, spatial_shapes, starts, 60, num_tokens=NUM_TOKENS)
    assert torch.equal(compiled, fallback)
    assert compiled_counts.total_syncs == 0, compiled_counts.table(0)
    assert compiled_counts.calls["salience_detr::grid_nms"] == 1
    assert fallback_counts.syncs["nms"] >= 1 and "salience_detr::grid_nms" not in fallback_counts.calls


def test_a_threshold_outside_the_rule_range_uses_torchvision():
    spatial_shapes, starts = layout([(5, 5)])
    tokens = torch.tensor([[12, 18, 0]])  # the centre (2, 2), its diagonal neighbour (3, 3) and the far (0, 0)
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    assert grid_nms(scores, tokens, spatial_shapes, starts, 3, num_tokens=25).tolist() == [[12, 18, 0]]
    with count_dispatch() as counts:
        low = grid_nms(scores, tokens, spatial_shapes, starts, 3, num_tokens=25, iou_threshold=0.1)
    assert low.tolist() == [[12, 0, 18]]  # below 1/7 the diagonal neighbour is suppressed
    assert "salience_detr::grid_nms" not in counts.calls and counts.syncs["nms"] == 1


def test_the_selection_compiles_into_one_graph():
    spatial_shapes, starts = layout()
    scores, tokens = random_candidates(batch=2, num_candidates=70, seed=6)

    def select(scores, tokens):
        return grid_nms(scores, tokens, spatial_shapes, starts, 40, num_tokens=NUM_TOKENS)

    compiled = torch.compile(select, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(scores, tokens), select(scores, tokens))


def test_counting_names_torchvision_nms_as_a_sync():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0]])
    with count_dispatch() as counts:
        torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.3)
    assert counts.syncs == {"nms": 1}


@CUDA
def test_cuda_selection_equals_torchvision_without_a_host_sync():
    assert grid_nms_available(torch.device("cuda"))[0]
    spatial_shapes, starts = layout(device="cuda")
    scores, tokens = random_candidates(batch=4, num_candidates=NUM_TOKENS, seed=8, device="cuda")
    with count_dispatch() as counts:
        selected = grid_nms(scores, tokens, spatial_shapes, starts, 100, num_tokens=NUM_TOKENS)
    assert counts.total_syncs == 0, counts.table(0)
    keep = torchvision_keep_mask(scores, tokens, spatial_shapes, starts)
    for b in range(4):
        expected = torch.cat([tokens[b][keep[b]], tokens[b][~keep[b]]])[:100]
        assert torch.equal(selected[b], expected)


def test_the_tiny_model_gives_an_image_the_same_queries_alone_and_batched():
    """64x96 inputs have 128 tokens, fewer survivors than the config's 100 queries: each image still gets 100."""
    from detectron2.config import LazyConfig, instantiate
    from test_loss_curve import TINY_CONFIG

    from salience_detr.checkpoint.parity import our_stages, parity_images

    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(TINY_CONFIG)).model).eval()
    images = parity_images(0, [(64, 96), (64, 96), (64, 96)])
    alone = our_stages(model, images[:1])
    batched = our_stages(model, images)
    assert alone["query_index"].shape == (1, 100) and batched["query_index"].shape == (3, 100)
    assert torch.equal(batched["query_index"][0], alone["query_index"][0])
    torch.testing.assert_close(batched["enc_logits"][0], alone["enc_logits"][0], rtol=1e-4, atol=1e-4)
