"""CUDA checks of the compiled deformable-attention operator beyond its CPU twins in test_ms_deform_attn.py.

Gradients in half precision, gradcheck over odd channel counts and batch remainders, launches on a side stream,
a grid larger than one launch's block cap, outputs that must be written in full, torch.compile with inductor
and the module under autocast. Everything here skips without a CUDA GPU (run by the GPU check,
``python -m salience_detr.tools.gpu_check``).
"""

from __future__ import annotations

import pytest
import torch
from test_ms_deform_attn import compiled_op, forward_and_grads, make_inputs, make_module_inputs, random_module

from salience_detr.layers import multi_scale_deformable_attn_pytorch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"
# The kernels cap one launch at 2**20 blocks of 256 threads, then loop (grid-stride) over the rest.
LAUNCH_CAP = 256 * 2**20


def reference_op(value, shapes, locations, weights):
    return multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.double() - exact).abs().max().item()


def output_and_grads(function, inputs, grad_output) -> tuple[torch.Tensor, ...]:
    inputs = [tensor.detach().requires_grad_() for tensor in inputs]
    output = function(*inputs)
    return (output, *torch.autograd.grad(output, inputs, grad_output))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_within_a_few_ulps(dtype):
    """Half-precision gradients, accumulated in float, stay within 4 ulps of the largest exact gradient."""
    value, shapes, starts, locations, weights = make_inputs(batch=3, head_dim=16, dtype=dtype, device=DEVICE)
    grad_output = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = output_and_grads(
        lambda v, l, w: compiled_op(v, shapes, starts, l, w, 2), (value, locations, weights), grad_output
    )
    exact = output_and_grads(
        lambda v, l, w: reference_op(v, shapes, l, w),
        (value.double(), locations.double(), weights.double()),
        grad_output.double(),
    )
    for name, low, high in zip(("output", "value", "locations", "weights"), got, exact):
        assert low.dtype == dtype, name
        bound = 4 * torch.finfo(dtype).eps * high.abs().max().item()
        assert max_error(low, high) <= bound, f"{name}: error {max_error(low, high):.3g} above {bound:.3g}"


@pytest.mark.parametrize("head_dim, batch, step", [(1, 5, 2), (32, 1, 64), (71, 3, 2), (30, 4, 3)])
def test_gradcheck_float64_odd_shapes(head_dim, batch, step):
    value, shapes, starts, locations, weights = make_inputs(
        batch=batch, num_queries=3, head_dim=head_dim, num_points=2, shapes=((3, 4), (2, 1), (1, 1)), device=DEVICE
    )
    inputs = tuple(tensor.requires_grad_() for tensor in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, l, w: compiled_op(v, shapes, starts, l, w, im2col_step=step), inputs, fast_mode=True
    )


def test_empty_queries_and_non_contiguous_inputs():
    value, shapes, starts, locations, weights = make_inputs(num_queries=0, device=DEVICE)
    assert compiled_op(value, shapes, starts, locations, weights).shape == (2, 0, 10)
    value, shapes, starts, locations, weights = make_inputs(device=DEVICE)
    strided = (
        value.transpose(2, 3).contiguous().transpose(2, 3),
        locations.transpose(1, 3).contiguous().transpose(1, 3),
        weights.transpose(0, 1).contiguous().transpose(0, 1),
    )
    expected = compiled_op(value, shapes, starts, locations, weights)
    torch.testing.assert_close(compiled_op(strided[0], shapes, starts, strided[1], strided[2]), expected)


def test_kernels_run_on_the_current_stream():
    """Inputs written on a side stream behind a long sleep: a kernel on another stream would read stale zeros."""
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32, device=DEVICE)
    expected = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w), value, locations, weights)
    side = torch.cuda.Stream()
    late_value = torch.zeros_like(value)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        late_value.copy_(value)
        got = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w), late_value, locations, weights)
    side.synchronize()
    for tensor, reference in zip(got, expected):
        torch.testing.assert_close(tensor, reference)


def test_every_output_element_is_written():
    """Outputs come from the caching allocator: fill the blocks they will reuse with NaN first."""
    value, shapes, starts, locations, weights = make_inputs(batch=3, dtype=torch.float32, device=DEVICE)
    expected = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w, 2), value, locations, weights)
    torch.cuda.empty_cache()
    poison = [torch.full_like(tensor, float("nan")) for tensor in expected for _ in range(2)]
    del poison
    got = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w, 2), value, locations, weights)
    for tensor, reference in zip(got, expected):
        assert torch.isfinite(tensor).all()
        torch.testing.assert_close(tensor, reference)


def large_inputs(num_queries: int, head_dim: int, levels, num_points: int) -> tuple[torch.Tensor, ...]:
    """One head, random values and locations, drawn on the GPU (up to several GB; no host copy)."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    shapes = torch.tensor(levels, dtype=torch.int64, device=DEVICE)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_levels = len(levels)
    value = torch.randn(1, int(areas.sum()), 1, head_dim, device=DEVICE, generator=generator)
    locations = torch.rand(1, num_queries, 1, num_levels, num_points, 2, device=DEVICE, generator=generator)
    # odd multiples of 2**-13: exact in float32 and never on a pixel edge of a power-of-two level, where the location
    # gradient jumps and a last-bit difference from the reference could pick the other side
    locations = (torch.floor(locations * 4096) + 0.5) / 4096
    weights = torch.rand(1, num_queries, 1, num_levels, num_points, device=DEVICE, generator=generator)
    return value, shapes, starts, locations, weights


def test_forward_beyond_one_launch():
    """More output elements than one launch's threads: the grid-stride tail must match the reference."""
    num_queries = LAUNCH_CAP // 256 + 4099
    value, shapes, starts, locations, weights = large_inputs(num_queries, 256, [(2, 3)], 1)
    assert num_queries * 256 > LAUNCH_CAP
    output = compiled_op(value, shapes, starts, locations, weights)
    for rows in (slice(0, 1024), slice(num_queries - 8192, num_queries)):
        expected = reference_op(value, shapes, locations[:, rows], weights[:, rows])
        torch.testing.assert_close(output[:, rows], expected, rtol=1e-5, atol=1e-5)


def test_backward_beyond_one_launch():
    """More samples than one launch's threads: location and weight gradients of the tail match the reference."""
    num_queries = LAUNCH_CAP // 256 + 4099
    value, shapes, starts, locations, weights = large_inputs(num_queries, 1, [(64, 64), (32, 32), (16, 16), (8, 8)], 64)
    assert num_queries * 4 * 64 > LAUNCH_CAP
    grad_output = torch.randn(1, num_queries, 1, device=DEVICE)
    _, grad_locations, grad_weights = torch.ops.salience_detr.ms_deform_attn_backward(
        value, shapes, starts, locations, weights, grad_output, 64
    )
    for rows in (slice(0, 512), slice(num_queries - 4096, num_queries)):
        tail = [tensor[:, rows].detach().requires_grad_() for tensor in (locations, weights)]
        expected = torch.autograd.grad(reference_op(value, shapes, *tail), tail, grad_output[:, rows])
        torch.testing.assert_close(grad_locations[:, rows], expected[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad_weights[:, rows], expected[1], rtol=1e-4, atol=1e-4)


def test_opcheck_bfloat16():
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.bfloat16, device=DEVICE)
    torch.library.opcheck(torch.ops.salience_detr.ms_deform_attn, (value, shapes, starts, locations, weights, 2))


def test_torch_compile_inductor_dynamic_batch():
    """Inductor on CUDA, dynamic shapes, no graph break: two batch sizes, forward and backward match eager."""
    module = random_module().float().to(DEVICE)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        inputs = [
            tensor.float().to(DEVICE) if tensor.is_floating_point() else tensor.to(DEVICE)
            for tensor in make_module_inputs(4, batch=batch)
        ]
        inputs[0].requires_grad_()
        eager = module(*inputs)
        (eager_grad,) = torch.autograd.grad(eager.sum(), inputs[0])
        output = compiled(*inputs)
        (grad,) = torch.autograd.grad(output.sum(), inputs[0])
        torch.testing.assert_close(output, eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_under_autocast(dtype):
    """AMP training's path: the module under autocast stays within 2 % of float32, gradients finite."""
    module = random_module().float().to(DEVICE)
    inputs = [
        tensor.float().to(DEVICE) if tensor.is_floating_point() else tensor.to(DEVICE)
        for tensor in make_module_inputs(4)
    ]
    expected = module(*inputs)
    with torch.autocast(DEVICE, dtype=dtype):
        output = module(*inputs)
    output.float().square().sum().backward()
    assert output.dtype == dtype
    assert max_error(output, expected.double()) <= 0.02 * expected.abs().max().item()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
