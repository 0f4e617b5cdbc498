"""The CPU kernels' fast paths: head_dim 32 compiled with a constant channel count, chunks of queries whose rows are
prefetched, zero rows for corners off the map; and benchmark_ops' cases and options."""

from __future__ import annotations

import pytest
import torch

from salience_detr.layers import ms_deform_attn as msda
from salience_detr.layers import multi_scale_deformable_attn_pytorch
from salience_detr.layers.levels import level_start_index
from salience_detr.tools import benchmark_ops

pytestmark = pytest.mark.skipif(msda._C is None, reason="needs the compiled extension")

# A level wider than tall, one taller than wide, and a 1x1 level (every corner of its points but one is off the map).
SHAPES = ((9, 13), (7, 4), (3, 5), (1, 1))


def make_inputs(num_queries: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Locations uniform on [-0.3, 1.3]: points inside, across the border and wholly off every map."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    num_values = int((shapes[:, 0] * shapes[:, 1]).sum())
    batch, num_heads, num_points = 2, 3, 4
    value = torch.randn(batch, num_values, num_heads, head_dim, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, num_queries, num_heads, len(SHAPES), num_points, 2, generator=generator) * 1.6 - 0.3
    weights = torch.rand(batch, num_queries, num_heads, len(SHAPES), num_points, generator=generator)
    return value.to(dtype), shapes, level_start_index(shapes), locations.to(dtype), weights.to(dtype)


def op_and_grads(value, shapes, starts, locations, weights, grad_output=None):
    if grad_output is None:
        grad_output = torch.linspace(-1, 1, value.shape[0] * locations.shape[1] * value.shape[2] * value.shape[3])
        grad_output = grad_output.to(value.dtype).view(value.shape[0], locations.shape[1], -1)
    output = torch.ops.salience_detr.ms_deform_attn(value, shapes, starts, locations, weights, 64)
    grads = torch.ops.salience_detr.ms_deform_attn_backward(value, shapes, starts, locations, weights, grad_output, 64)
    return output, *grads, grad_output


def reference_and_grads(value, shapes, locations, weights, grad_output):
    inputs = [tensor.detach().requires_grad_() for tensor in (value, locations, weights)]
    output = multi_scale_deformable_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2])
    return output, *torch.autograd.grad(output, inputs, grad_output)


# 300 queries: a last forward block (256 queries) and a last chunk (32 queries) that are partly filled.
@pytest.mark.parametrize("num_queries", [1, 300])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fixed_channel_path_matches_the_reference(num_queries, dtype, tolerance):
    value, shapes, starts, locations, weights = make_inputs(num_queries, 32, dtype)
    *compiled, grad_output = op_and_grads(value, shapes, starts, locations, weights)
    reference = reference_and_grads(value, shapes, locations, weights, grad_output)
    for name, got, expected in zip(("output", "value", "locations", "weights"), compiled, reference):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance, msg=name)


def test_fixed_and_runtime_channel_counts_agree_channel_by_channel():
    """Channels are independent in the output and grad_value: head_dim 32 (constant) equals the first 32 of 40."""
    value, shapes, starts, locations, weights = make_inputs(300, 40, torch.float32)
    heads = value.shape[2]
    wide = op_and_grads(value, shapes, starts, locations, weights)
    narrow_grad_output = wide[-1].unflatten(-1, (heads, 40))[..., :32].flatten(-2)
    narrow = op_and_grads(value[..., :32].contiguous(), shapes, starts, locations, weights, narrow_grad_output)
    torch.testing.assert_close(narrow[0].unflatten(-1, (heads, 32)), wide[0].unflatten(-1, (heads, 40))[..., :32])
    torch.testing.assert_close(narrow[1], wide[1][..., :32])


@pytest.mark.parametrize("head_dim", [32, 5])
def test_non_finite_inputs_at_both_channel_counts(head_dim):
    """NaN/inf locations and NaN weights on and off the maps: NaN where the reference has it, the rest equal."""
    value, shapes, starts, locations, weights = make_inputs(40, head_dim, torch.float32, seed=1)
    locations[0, 0, :, 1, 0] = torch.tensor([float("nan"), 0.5])
    locations[0, 1, :, 2, 1] = torch.tensor([0.5, float("inf")])
    weights[1, 2, :, 0, 0] = float("nan")
    locations[1, 3, :, 3, 2] = 3.0  # wholly off the map, with a NaN weight
    weights[1, 3, :, 3, 2] = float("nan")
    *compiled, grad_output = op_and_grads(value, shapes, starts, locations, weights)
    reference = reference_and_grads(value, shapes, locations, weights, grad_output)
    for name, got, expected in zip(("output", "value", "locations", "weights"), compiled, reference):
        assert expected.isnan().any() or name == "value", name
        assert torch.equal(got.isnan(), expected.isnan()), name
        finite = expected.isfinite()
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5, msg=name)


def test_random_case_spreads_points_over_the_maps():
    """The worst case for the caches: uniform locations, unlike the model-like fan around each reference point."""
    model = benchmark_ops.make_case("m", 1, 200, box_refs=False, dtype=torch.float32, device="cpu")
    spread = benchmark_ops.make_case(
        "r", 1, 200, box_refs=False, dtype=torch.float32, device="cpu", random_locations=True
    )
    assert spread.sampling_locations.shape == model.sampling_locations.shape
    assert spread.sampling_locations.min() >= 0 and spread.sampling_locations.max() < 1
    # a query's points on the finest level: within a few pixels of each other in the model-like case only
    model_spread = model.sampling_locations[:, :, :, 0].std(dim=-2).mean()
    assert spread.sampling_locations[:, :, :, 0].std(dim=-2).mean() > 10 * model_spread
    torch.testing.assert_close(spread.attention_weights, model.attention_weights)


def test_benchmark_ops_options(monkeypatch, capsys):
    seen = {}

    def fake_benchmark(device, repeat, cases, clock):
        seen.update(device=device, cases=cases, clock=clock, threads=torch.get_num_threads())
        return [("encoder", "float32", "forward", 0.001, 0.008)]

    monkeypatch.setattr(benchmark_ops, "benchmark", fake_benchmark)
    threads = torch.get_num_threads()
    try:
        benchmark_ops.main(["--threads", "1", "--clock", "cpu", "--cases", "encoder-random,decoder"])
    finally:
        torch.set_num_threads(threads)
    assert seen == {"device": "cpu", "cases": ["encoder-random", "decoder"], "clock": "cpu", "threads": 1}
    out = capsys.readouterr().out
    assert "| encoder | float32 | forward | 1.0 | 8.0 | 8.00 |" in out
    assert f"operator built with OpenMP: {msda.extension_build_info().get('openmp')}," in out
    for argv, message in ((["--cases", "encoder,bogus"], "unknown --cases"), (["--threads", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            benchmark_ops.main(argv)
        assert message in capsys.readouterr().err


def test_cpu_clock_times_process_time():
    """_compare with the CPU clock: a sleeping step costs (almost) no CPU time, a busy one does."""
    import time

    def busy() -> None:
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass

    sleeping, working = benchmark_ops._compare(lambda: time.sleep(0.02), busy, 3, "cpu", clock="cpu")
    assert sleeping < 0.01 <= working
