"""Time the compiled deformable-attention operator against the pure-PyTorch reference.

    python -m salience_detr.tools.benchmark_ops [--device cpu|cuda] [--repeat N]

Inputs mimic the model: the encoder case samples around the pixel centres of ~9000 kept tokens of a
800x1088 image (4 levels), the decoder case around 900 boxes (4-D reference points). Prints forward and
forward+backward times and the reference/compiled ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from salience_detr.layers import ms_deform_attn as msda
from salience_detr.layers.levels import level_start_index

ENCODER_LEVELS = ((100, 136), (50, 68), (25, 34), (13, 17))


@dataclass
class Case:
    name: str
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor


def _initial_offsets(num_heads: int, num_levels: int, num_points: int, generator: torch.Generator) -> torch.Tensor:
    """The module's initial fan of offsets (one direction per head, point p at p + 1) plus some spread."""
    angles = torch.arange(num_heads) * (2 * math.pi / num_heads)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    scale = torch.arange(1, num_points + 1).view(1, 1, -1, 1)
    fan = directions.view(num_heads, 1, 1, 2) * scale
    return fan.expand(num_heads, num_levels, num_points, 2) + torch.randn(
        num_heads, num_levels, num_points, 2, generator=generator
    )


def make_case(name: str, batch: int, num_queries: int, box_refs: bool, dtype: torch.dtype, device: str) -> Case:
    generator = torch.Generator().manual_seed(0)
    num_heads, head_dim, num_points = 8, 32, 4
    shapes = torch.tensor(ENCODER_LEVELS, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = level_start_index(shapes)
    num_levels = len(ENCODER_LEVELS)
    value = torch.randn(batch, int(areas.sum()), num_heads, head_dim, generator=generator)
    centers = torch.rand(batch, num_queries, 1, 1, 1, 2, generator=generator)
    offsets = _initial_offsets(num_heads, num_levels, num_points, generator)[None, None]
    if box_refs:
        sizes = 0.05 + 0.3 * torch.rand(batch, num_queries, 1, 1, 1, 2, generator=generator)
        locations = centers + offsets / num_points * sizes * 0.5
    else:
        locations = centers + offsets / shapes.flip(-1).view(1, 1, 1, num_levels, 1, 2)
    logits = torch.randn(batch, num_queries, num_heads, num_levels * num_points, generator=generator)
    weights = logits.softmax(-1).view(batch, num_queries, num_heads, num_levels, num_points)
    return Case(
        name,
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        locations.to(device, dtype),
        weights.to(device, dtype),
    )


def _seconds(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _compare(
    compiled: Callable[[], None], reference: Callable[[], None], repeat: int, device: str
) -> tuple[float, float]:
    """Median seconds of each after a warm-up, the two interleaved so that load changes hit both alike."""
    compiled()
    reference()
    times = [(_seconds(compiled, device), _seconds(reference, device)) for _ in range(repeat)]
    return tuple(sorted(column)[len(column) // 2] for column in zip(*times))


def _step(case: Case, backend: str, backward: bool) -> Callable[[], None]:
    tensors = (case.value, case.sampling_locations, case.attention_weights)
    inputs = [tensor.detach().requires_grad_(backward) for tensor in tensors]

    def run() -> None:
        output = msda.multi_scale_deformable_attn(
            inputs[0], case.spatial_shapes, case.level_start_index, inputs[1], inputs[2], backend=backend
        )
        if backward:
            output.backward(torch.ones_like(output))

    return run


def benchmark(device: str, repeat: int) -> list[tuple[str, str, str, float, float]]:
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
    rows = []
    for dtype in dtypes:
        cases = [
            make_case("encoder (B=2, 9000 q)", 2, 9000, box_refs=False, dtype=dtype, device=device),
            make_case("decoder (B=2, 900 q, 4-D refs)", 2, 900, box_refs=True, dtype=dtype, device=device),
        ]
        for case in cases:
            for backward, pass_name in ((False, "forward"), (True, "fwd+bwd")):
                compiled, reference = _compare(
                    _step(case, "compiled", backward), _step(case, "pytorch", backward), repeat, device
                )
                rows.append((case.name, str(dtype).replace("torch.", ""), pass_name, compiled, reference))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per entry (median reported)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible GPU")
    available, reason = msda.compiled_backend_available(torch.device(args.device), torch.float32)
    if not available:
        parser.error(f"the compiled operator cannot run on {args.device}: {reason}")
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, repeat: {args.repeat} (median)")
    print("| case | dtype | pass | compiled ms | reference ms | reference / compiled |")
    print("|---|---|---|---:|---:|---:|")
    for name, dtype, pass_name, compiled, reference in benchmark(args.device, args.repeat):
        times = f"{compiled * 1e3:.1f} | {reference * 1e3:.1f} | {reference / compiled:.2f}"
        print(f"| {name} | {dtype} | {pass_name} | {times} |")


if __name__ == "__main__":
    main()
