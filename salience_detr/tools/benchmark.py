"""Cost of a Salience DETR config: parameters, FLOPs, latency, images/s, peak memory, ATen calls and host syncs.

    python -m salience_detr.tools.benchmark --config-file configs/salience_detr/salience_detr_r50_4scale_12ep.py \
        [--task eval|train|data] [--height 800 --width 1333] [--device cpu|cuda] [--num-iter 50] \
        [--train-data loader|random] [--cpu-speedups] [--output benchmark.json]

``--task eval`` (the default): the model runs in eval mode on random images of exactly the given size (the size
after the test resize), with random weights unless ``--weights`` names a checkpoint: cost does not depend on the
weights except through how many proposals survive NMS (``train.init_checkpoint``, often ImageNet backbone weights,
is ignored). FLOPs come from fvcore (one multiply-add = one flop) with a handle for multi-scale deformable attention,
which fvcore would otherwise skip: it counts the compiled operator and the pure-PyTorch path (``grid_sample``)
alike. When the config has an RoI refinement head, both the head on and off (``model.roi_refine=None``) are measured
in the same run.

``--task train`` times training steps (the trainer's step: forward, backward, clipping, optimizer) of the config's
model and optimizer, on batches of its train dataloader fetched before the timing (``--train-data loader``, so the
loader's speed is not part of it) or on random batches of ``--batch-size`` images of the given size with a few boxes
each (``--train-data random``, which needs no dataset). ``--task data`` times the train dataloader alone.

Every model task also counts the ATen calls and the data-dependent host syncs of one step (one eval forward, one
training step): on a GPU each sync stalls the stream and thousands of small calls make a step launch-bound.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from tabulate import tabulate
from torch import Tensor, nn

import salience_detr  # noqa: F401  (makes detectron2 importable and registers the model)
from salience_detr.config import load_config
from salience_detr.engine import (
    AtomicDetectionCheckpointer,
    DetrTrainer,
    freeze_for_config,
    resolve_amp,
    trainer_from_config,
)
from salience_detr.layers.ms_deform_attn import BACKEND_ENV, BACKENDS, resolve_backend
from salience_detr.modeling.cpu_inference import optimize_on_cpu
from salience_detr.modeling.fuse import fuse_conv_bn
from salience_detr.tools._timing import peak_memory_mb, random_image, time_forward, timing_numbers
from salience_detr.tools.user_errors import exit_on_user_error
from salience_detr.utils.dispatch_count import DispatchCounts, count_dispatch
from salience_detr.utils.inference import DetectionsAsTensors

logger = logging.getLogger(__name__)

TASKS = ("eval", "train", "data")
SYNC_SITES_REPORTED = 12  # the lines of code with the most syncs in a training step
TRAIN_DATA = ("loader", "random")
DEFORMABLE_ATTENTION = "deformable_attention"
# Bilinear interpolation reads 4 neighbours per channel (4 multiply-adds); the attention weight adds one more.
MACS_PER_SAMPLED_CHANNEL = 5


def deformable_attention_flop_handle(inputs: list[Any], outputs: list[Any]) -> Counter:
    """``salience_detr::ms_deform_attn(value (B,Nv,H,Dh), shapes, starts, locations (B,Nq,H,L,P,2), weights, step)``."""
    batch, _, heads, head_dim = get_shape(inputs[0])
    _, queries, _, levels, points, _ = get_shape(inputs[3])
    samples = batch * queries * heads * levels * points
    return Counter({DEFORMABLE_ATTENTION: samples * head_dim * MACS_PER_SAMPLED_CHANNEL})


def grid_sample_flop_handle(inputs: list[Any], outputs: list[Any]) -> Counter:
    """``grid_sampler(input (N,C,Hin,Win), grid (N,Hout,Wout,2), ...)``: one bilinear sample per output element.

    The reference deformable attention weights each sample exactly once afterwards (an element-wise product
    fvcore ignores), so that multiply-add is counted here and both backends report the same number."""
    batch, channels = get_shape(inputs[0])[:2]
    _, out_height, out_width, _ = get_shape(inputs[1])
    return Counter({DEFORMABLE_ATTENTION: batch * channels * out_height * out_width * MACS_PER_SAMPLED_CHANNEL})


def attention_flop_handle(inputs: list[Any], outputs: list[Any]) -> Counter:
    """``scaled_dot_product_attention(q (..., L, E), k (..., S, E), v (..., S, Ev))``: QK^T then weights x V."""
    query, value = get_shape(inputs[0]), get_shape(inputs[2])
    leading = 1
    for size in query[:-2]:
        leading *= size
    return Counter({"attention": leading * query[-2] * value[-2] * (query[-1] + value[-1])})


def count_flops(model: nn.Module, image: Tensor) -> dict[str, Any]:
    """Total and per-component GFLOPs of one forward pass, and the ops fvcore could not count."""
    analysis = FlopCountAnalysis(DetectionsAsTensors(model), (image,))
    analysis.set_op_handle("salience_detr::ms_deform_attn", deformable_attention_flop_handle)
    analysis.set_op_handle("aten::grid_sampler", grid_sample_flop_handle)  # F.grid_sample, traced
    analysis.set_op_handle("aten::scaled_dot_product_attention", attention_flop_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    by_module = analysis.by_module()
    # top-level modules and their children (e.g. transformer.encoder), the granularity of the paper's cost tables
    names = [name for name, _ in model.named_modules() if name and name.count(".") <= 1]
    components = {name: by_module.get(f"model.{name}", 0) / 1e9 for name in names}
    return {
        "gflops": analysis.total() / 1e9,
        "gflops_deformable_attention": analysis.by_operator().get(DEFORMABLE_ATTENTION, 0) / 1e9,
        "gflops_by_component": {name: value for name, value in components.items() if value > 0},
        "uncounted_ops": dict(sorted(analysis.unsupported_ops().items())),
    }


def benchmark_model(
    model: nn.Module, height: int, width: int, device: torch.device, batch_size: int, warmup: int, num_iter: int
) -> dict[str, Any]:
    """Every measurement for one instantiated model (moved to ``device``, eval mode)."""
    model = model.to(device).eval()
    images = [random_image(height, width, device, seed) for seed in range(batch_size)]
    inputs = [{"image": image} for image in images]
    result: dict[str, Any] = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    }
    with torch.no_grad():
        flops = count_flops(model, images[0])
        result.update(flops)
        result["gflops"] = flops["gflops"] * batch_size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_forward(lambda: model(inputs), device, warmup, num_iter)
        with count_dispatch() as counts:
            model(inputs)
    result.update(timing_numbers(seconds, batch_size))
    result["peak_memory_mb"], result["memory_kind"] = peak_memory_mb(device)
    result.update(dispatch_numbers(counts))
    return result


def dispatch_numbers(counts: DispatchCounts) -> dict[str, Any]:
    """The counts of one step for the report (see salience_detr.utils.dispatch_count for what is a sync)."""
    return {
        "aten_calls": counts.total_calls,
        "host_syncs": counts.total_syncs,
        "host_syncs_by_kind": dict(counts.syncs.most_common()),
    }


def random_training_batch(height: int, width: int, batch_size: int, num_classes: int, seed: int) -> list[dict]:
    """``batch_size`` random images with 1 to 4 random boxes each, in the train mapper's format (CPU tensors)."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for index in range(batch_size):
        count = int(torch.randint(1, 5, (), generator=generator))
        corners = torch.rand(count, 2, 2, generator=generator) * torch.tensor([width, height])
        boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values + 4.0], dim=1)
        boxes = boxes.clamp(max=torch.tensor([width, height, width, height], dtype=boxes.dtype))
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (count,), generator=generator)
        image = random_image(height, width, torch.device("cpu"), seed * batch_size + index)
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def build_trainer(cfg: Any, model: nn.Module, batches: list[list[dict]]) -> DetrTrainer:
    """The trainer train_net builds (``train.trainable``, optimizer, accumulation, clipping, AMP of the config),
    cycling ``batches``."""
    frozen = freeze_for_config(model, cfg.train.get("trainable"))
    cfg.optimizer.params.model = model
    amp_dtype = resolve_amp(cfg.train.amp.enabled, cfg.train.amp.get("dtype", "float16"), cfg.train.device)
    return trainer_from_config(cfg, model, itertools.cycle(batches), instantiate(cfg.optimizer), amp_dtype, frozen)


def benchmark_train(
    cfg: Any, model: nn.Module, batches: list[list[dict]], device: torch.device, warmup: int, num_iter: int
) -> dict[str, Any]:
    """Seconds per training step and the counts of one step (the first, counted before the timed ones)."""
    model = model.to(device).train()
    trainer = build_trainer(cfg, model, batches)
    images_per_step = len(batches[0]) * trainer.accumulate_steps
    with EventStorage(0) as storage:
        trainer.storage, trainer.iter = storage, 0
        counts, optimizer_counts = count_training_step(trainer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_forward(trainer.run_step, device, warmup, num_iter)
    result: dict[str, Any] = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "images_per_step": images_per_step,
        **timing_numbers(seconds, images_per_step),
    }
    result["peak_memory_mb"], result["memory_kind"] = peak_memory_mb(device)
    result.update(dispatch_numbers(counts))
    result["host_sync_sites"] = dict(counts.sync_sites.most_common(SYNC_SITES_REPORTED))
    result["optimizer_aten_calls"] = optimizer_counts.total_calls
    result["optimizer_host_syncs"] = optimizer_counts.total_syncs
    return result


def count_training_step(trainer: DetrTrainer) -> tuple[DispatchCounts, DispatchCounts]:
    """The counts of one ``run_step``, and of its ``optimizer.step`` alone: torch's optimizers keep their step
    counters in CPU tensors and read each with ``.item()`` (one per parameter for AdamW), which counts as a sync
    here but waits for no device, on a GPU neither; the other syncs are the model's and the trainer's."""
    optimizer_counts = DispatchCounts()
    step = trainer.optimizer.step

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        with count_dispatch() as inner:
            output = step(*args, **kwargs)
        optimizer_counts.calls.update(inner.calls)
        optimizer_counts.syncs.update(inner.syncs)
        return output

    trainer.optimizer.step = counted_step
    try:
        with count_dispatch(sync_sites=True) as counts:
            trainer.run_step()
    finally:
        del trainer.optimizer.step  # the class's step again
    return counts, optimizer_counts


def benchmark_data(loader: Any, warmup: int, num_iter: int) -> dict[str, Any]:
    """Seconds per batch of a dataloader after ``warmup`` untimed batches (workers starting, first files read)."""
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    seconds, images = [], 0
    for _ in range(num_iter):
        start = time.perf_counter()
        images += len(next(batches))
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "batches": num_iter,
        "images": images,
        "batch_ms_median": median * 1000.0,
        "batch_ms_max": max(seconds) * 1000.0,
        "images_per_s": images / sum(seconds),
    }


def roi_variants(cfg: Any) -> dict[str, Any]:
    """Configs to measure: the RoI refinement head on and off when the model has one, else the model alone."""
    if "roi_refine" not in cfg.model:
        return {"model (no RoI head)": cfg}
    if cfg.model.roi_refine is None:
        return {"roi_refine off": cfg}
    head_off = copy.deepcopy(cfg)
    head_off.model.roi_refine = None
    return {"roi_refine on": cfg, "roi_refine off": head_off}


TABLE_COLUMNS = {  # per task: (header, result key, format)
    "eval": [
        ("params (M)", "params_m", ".2f"),
        ("GFLOPs", "gflops", ".2f"),
        ("of which MSDA", "gflops_deformable_attention", ".2f"),
        ("latency ms (median)", "latency_ms_median", ".1f"),
        ("images/s", "images_per_s", ".2f"),
        ("peak mem (MB)", "peak_memory_mb", ".0f"),
        ("ATen calls", "aten_calls", "d"),
        ("host syncs", "host_syncs", "d"),
    ],
    "train": [
        ("params (M)", "params_m", ".2f"),
        ("images/step", "images_per_step", "d"),
        ("step ms (median)", "latency_ms_median", ".1f"),
        ("images/s", "images_per_s", ".2f"),
        ("peak mem (MB)", "peak_memory_mb", ".0f"),
        ("ATen calls", "aten_calls", "d"),
        ("host syncs", "host_syncs", "d"),
        ("of which optimizer", "optimizer_host_syncs", "d"),
    ],
    "data": [
        ("batches", "batches", "d"),
        ("images", "images", "d"),
        ("batch ms (median)", "batch_ms_median", ".1f"),
        ("batch ms (max)", "batch_ms_max", ".1f"),
        ("images/s", "images_per_s", ".2f"),
    ],
}


def format_table(results: dict[str, dict[str, Any]], task: str = "eval") -> str:
    columns = TABLE_COLUMNS[task]
    rows = [[name, *(format(r[key], spec) for _, key, spec in columns)] for name, r in results.items()]
    return tabulate(rows, headers=["variant", *(header for header, _, _ in columns)], tablefmt="pipe")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig .py file")
    parser.add_argument("--task", choices=TASKS, default="eval", help="eval forward, training step or dataloader")
    parser.add_argument("--height", type=int, default=800, help="input height after the test resize")
    parser.add_argument("--width", type=int, default=1333, help="input width after the test resize")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=1, help="images per eval forward or random train batch")
    parser.add_argument("--num-iter", type=int, default=50, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--train-data",
        choices=TRAIN_DATA,
        default="loader",
        help="--task train: batches of the config's train dataloader, or random ones of --height x --width",
    )
    parser.add_argument("--backend", choices=BACKENDS, help=f"deformable attention backend (sets {BACKEND_ENV})")
    parser.add_argument("--weights", help="checkpoint to load (default: random weights)")
    parser.add_argument(
        "--fuse-bn", action="store_true", help="fold batch norms into the preceding convolutions (--task eval only)"
    )
    parser.add_argument(
        "--cpu-speedups",
        action="store_true",
        help="--task eval on a CPU: apply the levers of modeling.cpu_inference first, as the demo and --eval-only do "
        "(params and FLOPs are then the levered model's: folded norms, merged RepVGG branches)",
    )
    parser.add_argument("--output", default="output/benchmark.json", help="where to write the JSON results")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser


def check_args(args: argparse.Namespace) -> torch.device:
    for name in ("height", "width", "batch_size", "num_iter"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.fuse_bn and args.task != "eval":
        raise SystemExit(f"--fuse-bn folds batch norms for inference; it applies to --task eval, not {args.task}")
    if args.cpu_speedups and (args.task != "eval" or torch.device(args.device).type != "cpu"):
        raise SystemExit(
            f"--cpu-speedups applies the CPU inference levers: use it with --task eval --device cpu "
            f"(got --task {args.task} --device {args.device})"
        )
    if not os.path.isfile(args.config_file):
        raise SystemExit(f"config file {args.config_file!r} does not exist; pass a LazyConfig .py file")
    if args.weights and not os.path.isfile(args.weights):
        raise SystemExit(f"--weights {args.weights!r} does not exist; pass a checkpoint file or leave it out")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return device


def build_model(cfg: Any, args: argparse.Namespace) -> nn.Module:
    """The config's model with ``--weights`` loaded (random weights without), batch norms folded with --fuse-bn,
    and the CPU inference levers with --cpu-speedups."""
    model = instantiate(cfg.model)
    if args.weights:
        AtomicDetectionCheckpointer(model).load(args.weights)
    if args.fuse_bn:
        logger.info("Folded %d batch norms into convolutions", fuse_conv_bn(model.eval()))
    # what the demo and --eval-only run on a CPU (benchmarks/speed.md); off by default, so that the report gives the
    # configured architecture's parameters and FLOPs (check_args allows it with --task eval --device cpu only)
    if args.cpu_speedups:
        logger.info("CPU inference levers (modules changed): %s", optimize_on_cpu(model.eval()))
    return model


def training_batches(cfg: Any, args: argparse.Namespace) -> tuple[list[list[dict]], str]:
    """The batches a train benchmark cycles through, fetched before any timing, and what they are."""
    steps = (args.warmup + args.num_iter + 1) * cfg.train.accumulate_steps
    if args.train_data == "random":
        seeds = range(min(steps, 4))
        batches = [
            random_training_batch(args.height, args.width, args.batch_size, cfg.model.num_classes, s) for s in seeds
        ]
        return batches, f"random batches of {args.batch_size} images of {args.height}x{args.width}, 1-4 boxes each"
    batches = list(itertools.islice(instantiate(cfg.dataloader.train), steps))
    return batches, f"{len(batches)} batches of dataloader.train, fetched before the timing"


def run_task(cfg: Any, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results per measured variant, and what the report says about the input."""
    warmup, num_iter = args.warmup, args.num_iter
    if args.task == "data":
        loader = cfg.dataloader.train
        result = benchmark_data(instantiate(loader), warmup, num_iter)
        return {"dataloader.train": result}, {"num_workers": loader.get("num_workers")}
    if args.task == "train":
        batches, source = training_batches(cfg, args)
        info: dict[str, Any] = {"train_data": source}
        run = functools.partial(benchmark_train, cfg, batches=batches, device=device, warmup=warmup, num_iter=num_iter)
    else:
        info = {"input_size": [args.height, args.width], "batch_size": args.batch_size, "fuse_bn": args.fuse_bn}
        info["cpu_speedups"] = args.cpu_speedups
        size = {"height": args.height, "width": args.width, "batch_size": args.batch_size}
        run = functools.partial(benchmark_model, **size, device=device, warmup=warmup, num_iter=num_iter)
    results = {}
    for name, variant_cfg in roi_variants(cfg).items():
        logger.info("Benchmarking %s (%s)", name, args.task)
        results[name] = run(build_model(variant_cfg, args))
    return results, info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    device = check_args(args)
    if args.backend:
        os.environ[BACKEND_ENV] = args.backend
    # the data of the train and data tasks must be there; eval and random batches need only the classes
    inference = args.task == "eval" or (args.task == "train" and args.train_data == "random")
    cfg = load_config(args.config_file, args.opts, inference=inference, checkpoint=args.weights or "")
    results, info = run_task(cfg, args, device)
    report = {
        "task": args.task,
        "config_file": args.config_file,
        **info,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "num_iter": args.num_iter,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "deformable_attention_backend": resolve_backend(device, torch.float32),
        "results": results,
    }
    print(format_table(results, args.task))
    output_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(output_dir, exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(f"Wrote {args.output}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    with exit_on_user_error("benchmark"):
        main()
