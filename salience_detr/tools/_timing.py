"""Timing and memory helpers the timing tools share (``benchmark``, ``benchmark_ops``, ``speed_official`` and
``gpu_check``'s latency worker).

Private to ``salience_detr.tools`` and torch-only, so ``gpu_check`` can use them on a bare GPU machine and no tool
imports another tool.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def time_forward(run: Callable[[], Any], device: torch.device, warmup: int, num_iter: int) -> list[float]:
    """Seconds per call, after ``warmup`` untimed calls; CUDA events on GPU, a wall clock on CPU."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(num_iter):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            seconds.append(start.elapsed_time(end) / 1000.0)
        else:
            begin = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - begin)
    return seconds


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: the process's CPU time, all threads


def interleaved_rounds(
    runs: dict[str, Callable[[], Any]],
    warmup: int,
    num_iter: int,
    clocks: Sequence[str] = ("cpu", "wall"),
    synchronize: Callable[[], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of every run on each of ``clocks`` (keys of ``CLOCKS``), the runs interleaved within each round so
    that a change of load hits them alike; warm-up rounds dropped. ``synchronize`` (``torch.cuda.synchronize``)
    runs before and after each timed call."""
    times: dict[str, dict[str, list[float]]] = {name: {clock: [] for clock in clocks} for name in runs}
    for round_index in range(warmup + num_iter):
        for name, run in runs.items():
            if synchronize is not None:
                synchronize()
            starts = [CLOCKS[clock]() for clock in clocks]
            run()
            if synchronize is not None:
                synchronize()
            if round_index >= warmup:
                for clock, start in zip(clocks, starts):
                    times[name][clock].append(CLOCKS[clock]() - start)
    return times


def timing_numbers(seconds: Sequence[float], images_per_call: int) -> dict[str, float]:
    """Median, min and max milliseconds per call, and images/s at the median."""
    median = statistics.median(seconds)
    return {
        "latency_ms_median": median * 1000.0,
        "latency_ms_min": min(seconds) * 1000.0,
        "latency_ms_max": max(seconds) * 1000.0,
        "images_per_s": images_per_call / median,
    }


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory since the last reset: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    scale = 2**20 if platform.system() == "Darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, "process peak RSS (includes Python itself)"


def random_image(height: int, width: int, device: torch.device, seed: int = 0) -> Tensor:
    """A seeded uint8 CHW image, the input format of the model: timings that do not depend on a dataset."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8).to(device)
