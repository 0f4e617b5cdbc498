"""The CPU kernels use torch's threads: the extension is compiled with OpenMP (else at::parallel_for, inline under
torch's OpenMP backend, runs every task on one thread), and splitting the tasks over threads changes no result."""

from __future__ import annotations

import sys

import pytest
import torch
from test_ms_deform_attn_cpu_kernels import make_inputs, op_and_grads

from salience_detr.layers import ms_deform_attn as msda

pytestmark = pytest.mark.skipif(msda._C is None, reason="needs the compiled extension")


@pytest.mark.skipif(
    not torch._C.has_openmp or sys.platform == "darwin", reason="torch's parallel backend is not OpenMP here"
)
def test_extension_is_compiled_with_openmp():
    info = msda.extension_build_info()
    assert info.get("openmp") is True, f"the CPU kernels would run on one thread; build info {info}"


def results_with_threads(num_threads: int, inputs) -> tuple[torch.Tensor, ...]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return op_and_grads(*inputs)
    finally:
        torch.set_num_threads(previous)


# 600 queries: 3 forward blocks per (batch, head), so threads split the blocks of one head as well as the heads.
@pytest.mark.parametrize("head_dim", [32, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(head_dim, dtype):
    inputs = make_inputs(600, head_dim, dtype, seed=2)
    one = results_with_threads(1, inputs)
    for num_threads in (2, 3):
        many = results_with_threads(num_threads, inputs)
        for name, got, expected in zip(("output", "value", "locations", "weights"), many, one):
            assert torch.equal(got, expected), f"{name} differs between 1 and {num_threads} threads"
