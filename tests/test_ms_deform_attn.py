"""The compiled deformable-attention operator against the pure-PyTorch reference, and the module around it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from salience_detr.layers import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
)
from salience_detr.layers import ms_deform_attn as msda

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# Non-square levels, a level narrower than tall, and a 1x1 level.
SHAPES = ((6, 7), (3, 5), (4, 1), (1, 1))


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv(msda.BACKEND_ENV, raising=False)


def level_layout(shapes=SHAPES, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return spatial_shapes, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def make_inputs(
    batch=2, num_queries=9, num_heads=2, head_dim=5, num_points=3, shapes=SHAPES, dtype=torch.float64, device="cpu"
):
    """Random inputs; locations spread over [-0.25, 1.25] so many points fall partly or wholly off the maps."""
    generator = torch.Generator().manual_seed(batch * 1000 + head_dim)
    spatial_shapes, level_start_index = level_layout(shapes, device)
    num_values = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    num_levels = len(shapes)
    value = torch.randn(batch, num_values, num_heads, head_dim, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, num_queries, num_heads, num_levels, num_points, 2, generator=generator) * 1.5 - 0.25
    weights = torch.rand(batch, num_queries, num_heads, num_levels, num_points, generator=generator)
    return (
        value.to(device, dtype),
        spatial_shapes,
        level_start_index,
        locations.to(device, dtype),
        weights.to(device, dtype),
    )


def compiled_op(value, spatial_shapes, level_start_index, locations, weights, im2col_step=64):
    return torch.ops.salience_detr.ms_deform_attn(
        value, spatial_shapes, level_start_index, locations, weights, im2col_step
    )


def forward_and_grads(function, value, locations, weights):
    inputs = [tensor.detach().requires_grad_() for tensor in (value, locations, weights)]
    output = function(*inputs)
    grad_output = torch.linspace(-1, 1, output.numel(), dtype=output.dtype, device=output.device).view_as(output)
    return (output, *torch.autograd.grad(output, inputs, grad_output))


def test_extension_is_loaded():
    assert msda.extension_build_info() is not None, msda.extension_status()
    assert msda.compiled_backend_available(torch.device("cpu"), torch.float32)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_compiled_matches_reference(device, dtype, tolerance):
    value, shapes, starts, locations, weights = make_inputs(batch=3, head_dim=8, dtype=dtype, device=device)
    locations[0, 0, 0, :, 0] = torch.tensor([-2.0, 3.0], dtype=dtype)  # wholly off every map
    locations[0, 0, 0, :, 1] = torch.tensor([0.5, 0.5], dtype=dtype)  # the only pixel of the 1x1 level
    compiled = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w, 2), value, locations, weights)
    reference = forward_and_grads(
        lambda v, l, w: multi_scale_deformable_attn_pytorch(v, shapes, l, w), value, locations, weights
    )
    assert (compiled[0] - reference[0]).abs().max() <= tolerance
    for got, expected in zip(compiled[1:], reference[1:]):
        torch.testing.assert_close(got, expected, rtol=10 * tolerance, atol=10 * tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float(device, dtype):
    value, shapes, starts, locations, weights = make_inputs(head_dim=16, dtype=dtype, device=device)
    exact = multi_scale_deformable_attn_pytorch(value.double(), shapes, locations.double(), weights.double())
    output = compiled_op(value, shapes, starts, locations, weights)
    assert output.dtype == dtype
    assert (output.double() - exact).abs().max() <= 4 * torch.finfo(dtype).eps * exact.abs().max()


@pytest.mark.parametrize("head_dim", [1, 30, 32, 64, 71])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_gradcheck_float64(head_dim, batch):
    value, shapes, starts, locations, weights = make_inputs(
        batch=batch, num_queries=2, num_heads=2, head_dim=head_dim, num_points=2, shapes=((3, 4), (2, 1), (1, 1))
    )
    inputs = tuple(tensor.requires_grad_() for tensor in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, l, w: compiled_op(v, shapes, starts, l, w, im2col_step=2), inputs, fast_mode=True
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    value, shapes, starts, locations, weights = make_inputs(device=device)
    value.requires_grad_()
    torch.library.opcheck(torch.ops.salience_detr.ms_deform_attn, (value, shapes, starts, locations, weights, 2))
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)
    torch.library.opcheck(
        torch.ops.salience_detr.ms_deform_attn_backward,
        (value.detach(), shapes, starts, locations, weights, grad_output.to(device), 3),
    )


def test_non_contiguous_inputs_are_handled():
    value, shapes, starts, locations, weights = make_inputs()
    strided_value = value.transpose(2, 3).contiguous().transpose(2, 3)
    strided_locations = locations.transpose(1, 3).contiguous().transpose(1, 3)
    strided_weights = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided_value.is_contiguous() and not strided_locations.is_contiguous()
    expected = compiled_op(value, shapes, starts, locations, weights)
    torch.testing.assert_close(compiled_op(strided_value, shapes, starts, strided_locations, strided_weights), expected)


def test_empty_query_set():
    value, shapes, starts, locations, weights = make_inputs(num_queries=0)
    assert compiled_op(value, shapes, starts, locations, weights).shape == (2, 0, 10)


def _mutated(index, replacement):
    def mutate(arguments):
        arguments = list(arguments)
        arguments[index] = replacement(arguments[index])
        return arguments

    return mutate


# Adds a row to the last level: level_start_index stays valid, but the levels no longer fit in value.
LAST_LEVEL_ROWS = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0]])
BAD_ARGUMENTS = {
    "value 3-D": (_mutated(0, lambda v: v.flatten(2)), "value must be 4-D"),
    "value integer": (_mutated(0, lambda v: v.long()), "value must be floating point"),
    "spatial_shapes shape": (_mutated(1, lambda s: s[:, :1]), "spatial_shapes must be"),
    "spatial_shapes dtype": (_mutated(1, lambda s: s.int()), "spatial_shapes must be int64"),
    "spatial_shapes beyond value": (_mutated(1, lambda s: s + LAST_LEVEL_ROWS), r"spatial_shapes\[3\].*does not lie"),
    "spatial_shapes overflow": (_mutated(1, lambda s: torch.full_like(s, 2**32)), r"spatial_shapes\[0\].*does not lie"),
    "level_start_index length": (_mutated(2, lambda s: s[:3]), "level_start_index must be"),
    "level_start_index dtype": (_mutated(2, lambda s: s.int()), "level_start_index must be int64"),
    "level_start_index beyond value": (_mutated(2, lambda s: s + 1), r"level_start_index\[3\].*does not lie"),
    "level_start_index negative": (_mutated(2, lambda s: s - 1), r"level_start_index\[0\] = -1 does not lie"),
    "sampling_locations shape": (_mutated(3, lambda l: l[..., :1]), "sampling_locations must be"),
    "sampling_locations dtype": (_mutated(3, lambda l: l.float()), "sampling_locations has dtype"),
    "attention_weights shape": (_mutated(4, lambda w: w[:, :, :, :, :1]), "attention_weights must be"),
    "attention_weights dtype": (_mutated(4, lambda w: w.float()), "attention_weights has dtype"),
    "im2col_step": (lambda arguments: [*arguments, 0], "im2col_step must be positive"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_is_named(case):
    mutate, message = BAD_ARGUMENTS[case]
    arguments = mutate(make_inputs())
    with pytest.raises(RuntimeError, match=message):
        compiled_op(*arguments)


def test_bad_grad_output_is_named():
    value, shapes, starts, locations, weights = make_inputs()
    with pytest.raises(RuntimeError, match="grad_output must be"):
        torch.ops.salience_detr.ms_deform_attn_backward(
            value, shapes, starts, locations, weights, torch.zeros(2, 9, 3, dtype=value.dtype), 2
        )


@CUDA
def test_mixed_devices_are_named():
    value, shapes, starts, locations, weights = make_inputs(device="cuda")
    with pytest.raises(RuntimeError, match="spatial_shapes is on cpu"):
        compiled_op(value, shapes.cpu(), starts, locations, weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, step", [(5, 2), (5, 3), (7, 4), (3, 64)])
def test_batch_not_divisible_by_im2col_step(device, batch, step):
    """The last chunk of images is smaller than the step: forward and gradients equal a single-chunk call."""
    value, shapes, starts, locations, weights = make_inputs(batch=batch, device=device)
    chunked = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w, step), value, locations, weights)
    whole = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w, batch), value, locations, weights)
    for got, expected in zip(chunked, whole):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert msda.resolve_backend(cpu, torch.float32) == "compiled"
    monkeypatch.setenv(msda.BACKEND_ENV, "pytorch")
    assert msda.resolve_backend(cpu, torch.float32) == "pytorch"
    assert msda.resolve_backend(cpu, torch.float32, requested="compiled") == "compiled"
    monkeypatch.setenv(msda.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=msda.BACKEND_ENV):
        msda.resolve_backend(cpu, torch.float32)
    with pytest.raises(RuntimeError, match="forced"):
        msda.resolve_backend(torch.device("meta"), torch.float32, requested="compiled")
    assert msda.resolve_backend(torch.device("meta"), torch.float32, requested="auto") == "pytorch"


@pytest.mark.parametrize(
    "env, argument, expected",
    [
        (None, None, "compiled"),
        ("pytorch", None, "pytorch"),
        ("pytorch", "compiled", "compiled"),
        (None, "pytorch", "pytorch"),
    ],
)
def test_module_runs_the_chosen_backend(monkeypatch, env, argument, expected):
    if env is not None:
        monkeypatch.setenv(msda.BACKEND_ENV, env)
    calls = []
    reference = msda.multi_scale_deformable_attn_pytorch

    def counting_reference(*args):
        calls.append(args)
        return reference(*args)

    monkeypatch.setattr(msda, "multi_scale_deformable_attn_pytorch", counting_reference)
    module = MultiScaleDeformableAttention(embed_dim=8, num_levels=4, num_heads=2, num_points=3, backend=argument)
    spatial_shapes, level_start_index = level_layout()
    value = torch.randn(1, int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()), 8)
    module(torch.randn(1, 3, 8), torch.rand(1, 3, 4, 2), value, spatial_shapes, level_start_index)
    assert ("pytorch" if calls else "compiled") == expected


def make_module_inputs(reference_dim: int, batch: int = 2, num_queries: int = 5, embed_dim: int = 16):
    generator = torch.Generator().manual_seed(reference_dim)
    spatial_shapes, level_start_index = level_layout()
    num_values = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    query = torch.randn(batch, num_queries, embed_dim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, num_values, embed_dim, generator=generator, dtype=torch.float64)
    reference_points = torch.rand(
        batch, num_queries, len(SHAPES), reference_dim, generator=generator, dtype=torch.float64
    )
    return query, reference_points, value, spatial_shapes, level_start_index


def random_module(num_points: int = 3) -> MultiScaleDeformableAttention:
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=16, num_levels=4, num_heads=2, num_points=num_points).double()
    for linear in (module.sampling_offsets, module.attention_weights):  # non-trivial offsets and weights
        torch.nn.init.normal_(linear.weight, std=0.5)
    return module


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_sampling_locations(reference_dim):
    """Offsets are pixels of each level for 2-D references, fractions of the half box for 4-D ones."""
    module = random_module()
    query, reference_points, value, spatial_shapes, level_start_index = make_module_inputs(reference_dim)
    output = module(query, reference_points, value, spatial_shapes, level_start_index)

    batch, num_queries, _ = query.shape
    offsets = module.sampling_offsets(query).view(batch, num_queries, 2, 4, 3, 2)
    weights = module.attention_weights(query).view(batch, num_queries, 2, 12).softmax(-1)
    weights = weights.view(batch, num_queries, 2, 4, 3)
    locations = torch.empty_like(offsets)
    for level, (height, width) in enumerate(SHAPES):
        ref = reference_points[:, :, None, level, None, :]
        if reference_dim == 2:
            scale = torch.tensor([1 / width, 1 / height], dtype=torch.float64)
        else:
            scale = ref[..., 2:] * 0.5 / 3
        locations[:, :, :, level] = ref[..., :2] + offsets[:, :, :, level] * scale
    values = module.value_proj(value).view(batch, -1, 2, 8)
    expected = module.output_proj(multi_scale_deformable_attn_pytorch(values, spatial_shapes, locations, weights))
    torch.testing.assert_close(output, expected)


def test_module_backends_agree():
    module = random_module()
    inputs = make_module_inputs(4)
    module.backend = "pytorch"
    expected = module(*inputs)
    module.backend = "compiled"
    torch.testing.assert_close(module(*inputs), expected, rtol=1e-10, atol=1e-10)


def test_padding_mask_zeroes_padded_values():
    module = random_module()
    query, reference_points, value, spatial_shapes, level_start_index = make_module_inputs(2)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[:, 30:] = True
    altered = value.clone()
    altered[mask] = 1e6
    masked = module(query, reference_points, value, spatial_shapes, level_start_index, mask)
    altered_output = module(query, reference_points, altered, spatial_shapes, level_start_index, mask)
    torch.testing.assert_close(altered_output, masked)
    assert not torch.allclose(module(query, reference_points, value, spatial_shapes, level_start_index), masked)


def test_initialisation():
    module = MultiScaleDeformableAttention()
    assert module.sampling_offsets.weight.shape == (256, 256) and module.attention_weights.weight.shape == (128, 256)
    assert module.value_proj.weight.shape == module.output_proj.weight.shape == (256, 256)
    assert not module.sampling_offsets.weight.any() and not module.attention_weights.weight.any()
    assert not module.attention_weights.bias.any() and not module.value_proj.bias.any()
    bias = module.sampling_offsets.bias.view(8, 4, 4, 2)
    points = torch.arange(1, 5, dtype=torch.float32)
    torch.testing.assert_close(bias[0, 2], torch.stack([points, torch.zeros(4)], -1))  # head 0: along +x
    torch.testing.assert_close(bias[1, 0], torch.stack([points, points], -1))  # head 1: diagonal, max-normalised
    torch.testing.assert_close(bias[6, 3], torch.stack([torch.zeros(4), -points], -1), atol=1e-6, rtol=0)
    xavier_std = math.sqrt(2 / (256 + 256))
    assert math.isclose(module.value_proj.weight.std().item(), xavier_std, rel_tol=0.05)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="embed_dim"):
        MultiScaleDeformableAttention(embed_dim=100, num_heads=8)
    with pytest.raises(ValueError, match="backend"):
        MultiScaleDeformableAttention(backend="cuda")
    module = random_module()
    query, reference_points, value, spatial_shapes, level_start_index = make_module_inputs(2)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, torch.rand(2, 5, 4, 3, dtype=torch.float64), value, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="reference_points"):
        module(query, reference_points[:, :, :3], value, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="query"):
        module(query[..., :8], reference_points, value, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="value"):
        module(query, reference_points, value[:1], spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="spatial_shapes"):
        module(query, reference_points, value, spatial_shapes[:3], level_start_index)


def test_mixed_dtypes_compute_in_the_wider_one():
    value, shapes, starts, locations, weights = make_inputs(dtype=torch.float32)
    output = multi_scale_deformable_attn(value.bfloat16(), shapes, starts, locations, weights)
    expected = multi_scale_deformable_attn_pytorch(value.bfloat16().float(), shapes, locations, weights)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected.bfloat16())


def test_torch_compile_fullgraph():
    module = random_module().float()
    inputs = [tensor.float() if tensor.is_floating_point() else tensor for tensor in make_module_inputs(4)]
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    output = compiled(*inputs)
    output.sum().backward()
    torch.testing.assert_close(output, module(*inputs))
    assert module.sampling_offsets.weight.grad is not None


@CUDA
def test_cuda_level_outside_value_gives_nan_rather_than_a_read_outside_it():
    """The CUDA kernels cannot raise without a host sync: a level past the end of value poisons its samples."""
    value, shapes, starts, locations, weights = make_inputs(device="cuda")
    past_the_end = starts + 1  # only the last (1x1) level no longer lies within value
    output, grad_value, grad_locations, grad_weights = forward_and_grads(
        lambda v, l, w: compiled_op(v, shapes, past_the_end, l, w, 2), value, locations, weights
    )
    assert output.isnan().all()
    assert grad_locations[:, :, :, 3].isnan().all() and grad_weights[:, :, :, 3].isnan().all()
    assert grad_locations[:, :, :, :3].isfinite().all() and grad_value.isfinite().all()


@CUDA
def test_cuda_gradcheck():
    value, shapes, starts, locations, weights = make_inputs(batch=3, head_dim=7, device="cuda")
    inputs = tuple(tensor.requires_grad_() for tensor in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, l, w: compiled_op(v, shapes, starts, l, w, 2), inputs, fast_mode=True)


@CUDA
def test_cuda_matches_cpu_on_the_module():
    module = random_module().float()
    inputs = [tensor.float() if tensor.is_floating_point() else tensor for tensor in make_module_inputs(2)]
    expected = module(*inputs)
    output = module.cuda()(*(tensor.cuda() for tensor in inputs))
    torch.testing.assert_close(output.cpu(), expected, rtol=1e-5, atol=1e-5)


NAN, INF = float("nan"), float("inf")


def non_finite_inputs(dtype, device):
    """One value map, and per query a location or weight that is NaN/inf, on, partly on or wholly off the map."""
    value, shapes, starts, locations, weights = make_inputs(num_queries=8, num_heads=1, num_points=1, dtype=dtype)
    locations[:, :, :, :, :] = 0.4
    weights[:] = 0.5
    for query, (x, y) in enumerate([(NAN, 0.5), (0.5, NAN), (INF, 0.5), (0.5, -INF), (NAN, NAN)]):
        locations[:, query, :, 1, :] = torch.tensor([x, y], dtype=dtype)
    weights[:, 5, :, 0] = NAN  # on the maps
    locations[:, 6, :, 2] = 3.0  # wholly off level 2, where its weight is NaN
    weights[:, 6, :, 2] = NAN
    locations[:, 7, :, 0] = torch.tensor([1.05, 0.5], dtype=dtype)  # partly off level 0, NaN weight
    weights[:, 7, :, 0] = NAN
    return [tensor.to(device) for tensor in (value, shapes, starts, locations, weights)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates_as_in_the_reference(device, dtype):
    """NaN and inf locations, NaN weights: NaN in exactly the output and gradient entries where grid_sample has it."""
    value, shapes, starts, locations, weights = non_finite_inputs(dtype, device)
    compiled = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w, 2), value, locations, weights)
    reference = forward_and_grads(
        lambda v, l, w: multi_scale_deformable_attn_pytorch(v, shapes, l, w), value, locations, weights
    )
    for name, got, expected in zip(("output", "value", "locations", "weights"), compiled, reference):
        assert expected.isnan().any() or name == "value", f"the inputs must put NaN in the reference's {name}"
        assert torch.equal(got.isnan(), expected.isnan()), name
        finite = expected.isfinite()
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)
    assert compiled[0][:, :5].isnan().all() and compiled[0][:, 5:].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_infinite_weights_give_non_finite_results_where_the_reference_does(device):
    value, shapes, starts, locations, weights = make_inputs(num_queries=4, device=device)
    weights[:, :, :, 1, 0] = INF  # points on, partly on and off level 1
    locations[:, 0, :, 1, 0] = 5.0
    compiled = forward_and_grads(lambda v, l, w: compiled_op(v, shapes, starts, l, w, 2), value, locations, weights)
    reference = forward_and_grads(
        lambda v, l, w: multi_scale_deformable_attn_pytorch(v, shapes, l, w), value, locations, weights
    )
    for name, got, expected in zip(("output", "value", "locations", "weights"), compiled, reference):
        assert name == "weights" or not expected.isfinite().all(), f"the inputs must make the reference's {name} inf"
        assert torch.equal(got.isfinite(), expected.isfinite()), name


BAD_LAYOUTS = {
    "non-positive size": (lambda s, i: (s * LAST_LEVEL_ROWS.logical_not(), i), r"spatial_shapes\[3\] = \(0, 1\)"),
    "sum above value": (lambda s, i: (s + LAST_LEVEL_ROWS, i), "describe 63 values .* holds 62"),
    "sum below value": (lambda s, i: (s[:3], i[:3]), "describe 61 values .* holds 62"),
    "start index": (lambda s, i: (s, i + 1), r"level_start_index\[0\] = 1 but the levels before it hold 0"),
    "overflow": (lambda s, i: (torch.full_like(s, 2**32), i), r"\(4294967296, 4294967296\): height \* width overflows"),
    "dtype": (lambda s, i: (s.int(), i), "spatial_shapes must be int64, got torch.int32; .*dtype=torch.long"),
    "shape": (lambda s, i: (s, i[:2]), r"level_start_index \(L,\), got \(4, 2\) and \(2,\); pass one .* per level"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_check_level_layout_names_the_fault(case):
    mutate, message = BAD_LAYOUTS[case]
    spatial_shapes, level_start_index = mutate(*level_layout())
    with pytest.raises(ValueError, match=message) as error:
        msda.check_level_layout(spatial_shapes, level_start_index, 62)
    if case not in ("dtype", "shape"):  # the value faults say how a valid layout looks
        assert "exclusive cumulative sum of height * width" in str(error.value)


def test_check_level_layout_accepts_the_layout_it_describes():
    msda.check_level_layout(*level_layout(), num_values=62)
    msda.check_level_layout(*level_layout(((1, 1),)), num_values=1)


def test_debug_switch_checks_every_call(monkeypatch):
    """A layout that lies within value but is wrong passes the op's own checks; the switch makes every call check it."""
    value, shapes, starts, locations, weights = make_inputs()
    wrong_starts = torch.zeros_like(starts)  # every level starts at 0: in bounds, yet not the cumulative sum
    multi_scale_deformable_attn(value, shapes, wrong_starts, locations, weights)
    monkeypatch.setenv(msda.CHECK_ENV, "1")
    with pytest.raises(ValueError, match=r"level_start_index\[1\] = 0 but the levels before it hold 42"):
        multi_scale_deformable_attn(value, shapes, wrong_starts, locations, weights)


# Run in a child process, so that an input that crashes the op fails this test instead of killing pytest. Each case
# builds the six arguments from valid ones (v, s, i, l, w, step) and must raise; RUNS must return a result.
BATTERY = r"""
import sys
import types
import torch

package = types.ModuleType("salience_detr")  # the package without its __init__: the op needs torch alone
package.__path__ = [sys.argv[1]]
sys.modules["salience_detr"] = package
import salience_detr.layers.ms_deform_attn  # noqa: F401  (registers the op)

op = torch.ops.salience_detr.ms_deform_attn
v, l, w = torch.rand(2, 10, 2, 4), torch.rand(2, 3, 2, 2, 1, 2), torch.rand(2, 3, 2, 2, 1)
s, i = torch.tensor([[2, 3], [2, 2]]), torch.tensor([0, 6])
wide_v, wide_l, wide_w = (torch.zeros(1).expand(*shape) for shape in ((2**20, 1, 1, 2**40), (2**20, 2**40, 1, 1, 1, 2),
                                                                        (2**20, 2**40, 1, 1, 1)))
RAISES = {
    "negative step": lambda: op(v, s, i, l, w, -3),
    "zero step": lambda: op(v, s, i, l, w, 0),
    "negative start": lambda: op(v, s, torch.tensor([-6, 0]), l, w, 2),
    "start past the end": lambda: op(v, s, torch.tensor([0, 2**62]), l, w, 2),
    "negative size": lambda: op(v, torch.tensor([[-2, -3], [2, 2]]), i, l, w, 2),
    "level of 2^32 x 2^32": lambda: op(v, torch.tensor([[2**32, 2**32], [2, 5]]), torch.tensor([0, 0]), l, w, 2),
    "level wider than value": lambda: op(v, torch.tensor([[1, 2**40], [2, 2]]), i, l, w, 2),
    "batch mismatch": lambda: op(v[:1], s, i, l, w, 2),
    "heads mismatch": lambda: op(v[:, :, :1], s, i, l, w, 2),
    "levels mismatch": lambda: op(v, s[:1], i[:1], l, w, 2),
    "points mismatch": lambda: op(v, s, i, l, w[..., :0], 2),
    "integer value": lambda: op(v.long(), s, i, l.long(), w.long(), 2),
    "complex value": lambda: op(v.cfloat(), s, i, l.cfloat(), w.cfloat(), 2),
    "float shapes": lambda: op(v, s.float(), i, l, w, 2),
    "int32 starts": lambda: op(v, s, i.int(), l, w, 2),
    "0-d value": lambda: op(torch.tensor(1.0), s, i, l, w, 2),
    "1-d shapes": lambda: op(v, s.flatten(), i, l, w, 2),
    "meta shapes": lambda: op(v, s.to("meta"), i, l, w, 2),
    "output beyond int64": lambda: op(wide_v, s[:1].new_ones(1, 2), i[:1], wide_l, wide_w, 2),
    "grad_output shape": lambda: torch.ops.salience_detr.ms_deform_attn_backward(v, s, i, l, w, v, 2),
    "grad_output dtype": lambda: torch.ops.salience_detr.ms_deform_attn_backward(
        v, s, i, l, w, torch.zeros(2, 3, 8, dtype=torch.float64), 2),
}
RUNS = {
    "empty batch": lambda: op(v[:0], s, i, l[:0], w[:0], 2),
    "no queries": lambda: op(v, s, i, l[:, :0], w[:, :0], 2),
    "no points": lambda: op(v, s, i, l[..., :0, :], w[..., :0], 2),
    "no levels": lambda: op(v[:, :0], s[:0], i[:0], l[:, :, :, :0], w[:, :, :, :0], 2),
    "no channels": lambda: op(v[..., :0], s, i, l, w, 2),
    "non-contiguous": lambda: op(v.transpose(0, 1).contiguous().transpose(0, 1), s.t().contiguous().t(), i, l, w, 2),
    "expanded value": lambda: op(v[:1].expand(2, -1, -1, -1), s, i, l, w, 5),
    "huge step": lambda: op(v, s, i, l, w, 2**62),
}
for name, call in RAISES.items():
    try:
        call()
    except (RuntimeError, ValueError, TypeError) as error:
        print(f"raised {name}: {type(error).__name__}: {str(error).splitlines()[0]}")
    else:
        sys.exit(f"no error for {name}")
for name, call in RUNS.items():
    print(f"ran {name}: {tuple(call().shape)}")
print("survived")
"""


def test_no_input_crashes_the_process():
    import subprocess
    import sys

    package_dir = str(Path(msda.__file__).parents[1])
    result = subprocess.run([sys.executable, "-c", BATTERY, package_dir], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.endswith("survived\n"), result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("raised ") for line in lines) == 21
    assert sum(line.startswith("ran ") for line in lines) == 8
    assert "raised meta shapes: RuntimeError: value is on cpu but another input is on meta" in result.stdout
    assert "raised level of 2^32 x 2^32: RuntimeError: spatial_shapes[0] = (4294967296, 4294967296)" in result.stdout
    assert "raised output beyond int64: RuntimeError: the output size" in result.stdout


MODEL_LIKE_SHAPES = ((8, 10), (4, 6), (2, 4), (1, 2))


def model_like_module_inputs(batch: int):
    """The tiny model's decoder shapes, scaled down: four levels from 8x10 to 1x2, box references."""
    generator = torch.Generator().manual_seed(batch)
    spatial_shapes, level_start_index = level_layout(MODEL_LIKE_SHAPES)
    num_values = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    query = torch.randn(batch, 12, 32, generator=generator)
    value = torch.randn(batch, num_values, 32, generator=generator)
    reference_points = torch.rand(batch, 12, 4, 4, generator=generator)
    return query, reference_points, value, spatial_shapes, level_start_index


def model_like_module() -> MultiScaleDeformableAttention:
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(32, num_heads=4, num_levels=4, num_points=4, im2col_step=2).eval()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    return module


def test_torch_compile_dynamic_batch_compiles_once():
    """No batch size reaches the op as a Python int: batches 2, 3 and 5 share one graph (no recompile).

    As in the model, the level layout is built inside the graph from the map sizes; graph inputs carry no other
    dimension of 2, 3 or 5 (dynamo's duck sizing would tie the batch to it).
    """
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    module = model_like_module()

    def attend(query, reference_points, value):
        return module(query, reference_points, value, *level_layout(MODEL_LIKE_SHAPES))

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend=counting_backend, dynamic=True, fullgraph=True)
    for batch in (2, 3, 5):
        inputs = model_like_module_inputs(batch)
        output = compiled(*inputs[:3])
        output.sum().backward()
        torch.testing.assert_close(output, module(*inputs))
    assert len(graphs) == 1
    op = torch.ops.salience_detr.ms_deform_attn
    assert any(node.target in (op, op.default) for node in graphs[0].graph.nodes)  # traced into, not around


def test_torch_export_dynamic_batch():
    """Exported once at batch 2 with a dynamic batch dimension, the program runs at 1, 5 and 70 images."""
    module = model_like_module()
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = ({0: batch}, {0: batch}, {0: batch}, None, None)
    program = torch.export.export(module, model_like_module_inputs(2), dynamic_shapes=dynamic)
    targets = [node.target for node in program.graph.nodes]
    assert torch.ops.salience_detr.ms_deform_attn.default in targets
    for size in (1, 5, 70):
        inputs = model_like_module_inputs(size)
        torch.testing.assert_close(program.module()(*inputs), module(*inputs))


def test_module_arguments_are_keyword_only_after_embed_dim():
    with pytest.raises(TypeError):
        MultiScaleDeformableAttention(256, 4, 8, 4)  # the old positional order (num_levels before num_heads)
    module = MultiScaleDeformableAttention(64, num_heads=2, num_levels=3, num_points=5, im2col_step=7)
    assert (module.embed_dim, module.num_heads, module.num_levels, module.num_points) == (64, 2, 3, 5)
    assert module.im2col_step == 7 and module.attention_weights.out_features == 2 * 3 * 5
    with pytest.raises(ValueError, match="im2col_step must be a positive int"):
        MultiScaleDeformableAttention(im2col_step=0)
