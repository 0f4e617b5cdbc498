"""Timing and memory helpers the model-timing tools share (``benchmark`` and ``gpu_check``'s latency worker).

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
