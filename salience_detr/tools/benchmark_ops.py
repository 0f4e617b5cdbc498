"""Time the compiled deformable-attention operator against the pure-PyTorch reference.

    python -m salience_detr.tools.benchmark_ops [--device cpu|cuda] [--repeat N] [--threads N] [--clock wall|cpu]
        [--cases encoder,encoder-random,decoder]

Inputs mimic the model: the encoder case samples around the pixel centres of ~9000 kept tokens of a
800x1088 image (4 levels), the decoder case around 900 boxes (4-D reference points). The encoder-random case
has the encoder's sizes with uniformly random locations, every point anywhere on its map: the worst case for the
caches. Prints forward and forward+backward times and the reference/compiled ratio, measured in one run.
``--clock cpu`` times the process's CPU time instead of the wall clock: with ``--threads 1`` this is the figure
that other jobs on the machine disturb least (they still share its caches).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from salience_detr.layers import ms_deform_attn as msda
from salience_detr.layers.levels import level_start_index
from salience_detr.tools._timing import CLOCKS, interleaved_rounds

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


def make_case(
    name: str,
    batch: int,
    num_queries: int,
    box_refs: bool,
    dtype: torch.dtype,
    device: str,
    random_locations: bool = False,
) -> Case:
    """Model-like inputs; ``random_locations`` replaces the locations by uniform ones on [0, 1)."""
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
    if random_locations:  # drawn last, so value and weights equal the model-like case's
        locations = torch.rand(locations.shape, generator=generator)
    return Case(
        name,
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        locations.to(device, dtype),
        weights.to(device, dtype),
    )


CASES = {
    "encoder": dict(name="encoder (B=2, 9000 q)", batch=2, num_queries=9000, box_refs=False),
    "encoder-random": dict(
        name="encoder (B=2, 9000 q, uniform random locations)",
        batch=2,
        num_queries=9000,
        box_refs=False,
        random_locations=True,
    ),
    "decoder": dict(name="decoder (B=2, 900 q, 4-D refs)", batch=2, num_queries=900, box_refs=True),
}
# gpu_check reads a fixed table of the CUDA run: the model-like cases in three dtypes.
DEFAULT_CASES = {"cpu": tuple(CASES), "cuda": ("encoder", "decoder")}


def _compare(
    compiled: Callable[[], None], reference: Callable[[], None], repeat: int, device: str, clock: str = "wall"
) -> tuple[float, float]:
    """Median seconds of each after a warm-up, the two interleaved so that load changes hit both alike."""
    synchronize = torch.cuda.synchronize if device == "cuda" else None
    runs = {"compiled": compiled, "reference": reference}
    times = interleaved_rounds(runs, 1, repeat, (clock,), synchronize)
    return statistics.median(times["compiled"][clock]), statistics.median(times["reference"][clock])


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


def benchmark(
    device: str, repeat: int, cases: Sequence[str] | None = None, clock: str = "wall"
) -> list[tuple[str, str, str, float, float]]:
    """(case, dtype, pass, compiled seconds, reference seconds) for each case (keys of CASES) and pass."""
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
    rows = []
    for dtype in dtypes:
        for key in cases or DEFAULT_CASES[device]:
            case = make_case(**CASES[key], dtype=dtype, device=device)
            for backward, pass_name in ((False, "forward"), (True, "fwd+bwd")):
                compiled, reference = _compare(
                    _step(case, "compiled", backward), _step(case, "pytorch", backward), repeat, device, clock
                )
                rows.append((case.name, str(dtype).replace("torch.", ""), pass_name, compiled, reference))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per entry (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="wall clock or process CPU time")
    parser.add_argument("--cases", default=None, help=f"comma-separated, of {', '.join(CASES)} (default: all on CPU)")
    args = parser.parse_args(argv)
    cases = None if args.cases is None else args.cases.split(",")
    unknown = sorted(set(cases or ()) - set(CASES))
    if unknown:
        parser.error(f"unknown --cases {unknown}; choose from {', '.join(CASES)}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible GPU")
    available, reason = msda.compiled_backend_available(torch.device(args.device), torch.float32)
    if not available:
        parser.error(f"the compiled operator cannot run on {args.device}: {reason}")
    # without OpenMP in the build, the operator's CPU kernels ignore torch's thread count
    openmp = (msda.extension_build_info() or {}).get("openmp")
    print(
        f"device: {args.device}, torch threads: {torch.get_num_threads()}, operator built with OpenMP: {openmp}, "
        f"repeat: {args.repeat} (median), clock: {args.clock}"
    )
    print("| case | dtype | pass | compiled ms | reference ms | reference / compiled |")
    print("|---|---|---|---:|---:|---:|")
    for name, dtype, pass_name, compiled, reference in benchmark(args.device, args.repeat, cases, args.clock):
        times = f"{compiled * 1e3:.1f} | {reference * 1e3:.1f} | {reference / compiled:.2f}"
        print(f"| {name} | {dtype} | {pass_name} | {times} |")


if __name__ == "__main__":
    main()
