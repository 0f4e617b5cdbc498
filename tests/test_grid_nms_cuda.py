"""CUDA checks of the compiled grid NMS op against its CPU kernel (itself checked against torchvision's NMS in
test_grid_nms.py): random layouts and batches over several blocks, tokens outside the image, empty inputs, a side
stream, non-contiguous input, torch.compile, and no host sync. Needs torch alone (the GPU check runs it before
anything else is installed); everything here skips without a CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch

from salience_detr.layers.grid_nms import compiled_grid_nms, grid_nms_available
from salience_detr.utils.dispatch_count import count_dispatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"
# An R50-like 4-level layout at 800x1333 and a small one with a single column and a single cell.
LAYOUTS = {"r50": ((100, 167), (50, 84), (25, 42), (13, 21)), "small": ((9, 13), (5, 7), (6, 1), (1, 1))}


def layout(name: str, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor, int]:
    shapes = LAYOUTS[name]
    sizes = [height * width for height, width in shapes]
    starts = [sum(sizes[:level]) for level in range(len(sizes))]
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    return spatial_shapes, torch.tensor(starts, dtype=torch.long, device=device), sum(sizes)


def random_tokens(batch: int, num_candidates: int, num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_tokens, generator=generator)[:num_candidates] for _ in range(batch)])


def cpu_mask(tokens: torch.Tensor, spatial_shapes: torch.Tensor, starts: torch.Tensor, num_tokens: int):
    return compiled_grid_nms(tokens.cpu(), spatial_shapes.cpu(), starts.cpu(), num_tokens)


@pytest.mark.parametrize(("name", "batch", "num_candidates"), [("r50", 2, 3600), ("r50", 70, 900), ("small", 33, 150)])
def test_cuda_mask_equals_the_cpu_kernel(name, batch, num_candidates):
    """Batches of more than one block (32 images per block) and the R50 query selection's 3600 candidates."""
    assert grid_nms_available(torch.device(DEVICE))[0]
    spatial_shapes, starts, num_tokens = layout(name)
    tokens = random_tokens(batch, num_candidates, num_tokens, seed=batch)
    mask = compiled_grid_nms(tokens.to(DEVICE), spatial_shapes, starts, num_tokens)
    assert mask.device.type == DEVICE and mask.dtype == torch.bool
    expected = cpu_mask(tokens, spatial_shapes, starts, num_tokens)
    assert torch.equal(mask.cpu(), expected)
    assert 0 < int(expected.sum()) < expected.numel()


def test_crowded_candidates_with_repeats_equal_the_cpu_kernel():
    """Candidates drawn with replacement from a few rows: many neighbours and repeated tokens."""
    spatial_shapes, starts, num_tokens = layout("small")
    tokens = torch.randint(0, 40, (5, 200), generator=torch.Generator().manual_seed(1))
    mask = compiled_grid_nms(tokens.to(DEVICE), spatial_shapes, starts, num_tokens)
    assert torch.equal(mask.cpu(), cpu_mask(tokens, spatial_shapes, starts, num_tokens))


def test_tokens_outside_the_image_are_not_kept_and_change_nothing_else():
    """A kernel cannot raise without a host sync: such tokens are dropped (the CPU kernel refuses them)."""
    spatial_shapes, starts, num_tokens = layout("small")
    tokens = random_tokens(3, 60, num_tokens, seed=2)
    bad = tokens.clone()
    bad[:, ::7] = torch.tensor([-1, num_tokens, 10**12]).repeat(3, 3)  # 9 of the 60 candidates per image
    mask = compiled_grid_nms(bad.to(DEVICE), spatial_shapes, starts, num_tokens).cpu()
    assert not mask[:, ::7].any()
    good = torch.ones(60, dtype=torch.bool)
    good[::7] = False
    assert torch.equal(mask[:, good], cpu_mask(tokens[:, good], spatial_shapes, starts, num_tokens))


def test_empty_inputs_give_empty_masks():
    spatial_shapes, starts, num_tokens = layout("small")
    for shape in ((0, 10), (3, 0)):
        tokens = torch.zeros(shape, dtype=torch.long, device=DEVICE)
        assert compiled_grid_nms(tokens, spatial_shapes, starts, num_tokens).shape == shape


def test_side_stream_and_non_contiguous_input():
    spatial_shapes, starts, num_tokens = layout("r50")
    tokens = random_tokens(4, 500, num_tokens, seed=3)
    transposed = tokens.t().contiguous().to(DEVICE).t()  # (4, 500) with strides (1, 4)
    assert not transposed.is_contiguous()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mask = compiled_grid_nms(transposed, spatial_shapes, starts, num_tokens)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(mask.cpu(), cpu_mask(tokens, spatial_shapes, starts, num_tokens))


def test_no_host_sync_and_one_graph_under_torch_compile():
    spatial_shapes, starts, num_tokens = layout("r50")
    tokens = random_tokens(2, 3600, num_tokens, seed=4).to(DEVICE)
    with count_dispatch() as counts:
        mask = compiled_grid_nms(tokens, spatial_shapes, starts, num_tokens)
    assert counts.total_syncs == 0, counts.table(0)
    compiled = torch.compile(compiled_grid_nms, fullgraph=True)
    assert torch.equal(compiled(tokens, spatial_shapes, starts, num_tokens), mask)


def test_opcheck_on_cuda():
    spatial_shapes, starts, num_tokens = layout("small")
    tokens = random_tokens(3, 80, num_tokens, seed=5).to(DEVICE)
    torch.library.opcheck(torch.ops.salience_detr.grid_nms, (tokens, spatial_shapes, starts, num_tokens))
