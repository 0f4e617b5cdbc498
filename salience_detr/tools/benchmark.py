"""Cost of a Salience DETR config: parameters, FLOPs, latency, images/s and peak memory.

    python -m salience_detr.tools.benchmark --config-file configs/salience_detr/salience_detr_r50_4scale_12ep.py \
        [--height 800 --width 1333] [--device cpu|cuda] [--num-iter 50] [--output benchmark.json]

The model runs in eval mode on one random image of exactly the given size (the size after the test resize), with
random weights unless ``--weights`` names a checkpoint: cost does not depend on the weights except through how many
proposals survive NMS (``train.init_checkpoint``, often ImageNet backbone weights, is ignored). FLOPs come from
fvcore (one multiply-add = one flop) with a handle for multi-scale deformable attention, which fvcore would
otherwise skip: it counts the compiled operator and the pure-PyTorch path (``grid_sample``) alike. When the config
has an RoI refinement head, both the head on and off (``model.roi_refine=None``) are measured in the same run. """

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.config import instantiate
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from tabulate import tabulate
from torch import Tensor, nn

import salience_detr  # noqa: F401  (makes detectron2 importable and registers the model)
from salience_detr.config import load_config
from salience_detr.engine import AtomicDetectionCheckpointer
from salience_detr.layers.ms_deform_attn import BACKEND_ENV, BACKENDS, resolve_backend
from salience_detr.modeling.fuse import fuse_conv_bn
from salience_detr.tools._timing import peak_memory_mb, random_image, time_forward
from salience_detr.utils.inference import DetectionsAsTensors

logger = logging.getLogger(__name__)

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
    median = statistics.median(seconds)
    result.update(
        latency_ms_median=median * 1000.0,
        latency_ms_min=min(seconds) * 1000.0,
        latency_ms_max=max(seconds) * 1000.0,
        images_per_s=batch_size / median,
    )
    result["peak_memory_mb"], result["memory_kind"] = peak_memory_mb(device)
    return result


def roi_variants(cfg: Any) -> dict[str, Any]:
    """Configs to measure: the RoI refinement head on and off when the model has one, else the model alone."""
    if "roi_refine" not in cfg.model:
        return {"model (no RoI head)": cfg}
    if cfg.model.roi_refine is None:
        return {"roi_refine off": cfg}
    head_off = copy.deepcopy(cfg)
    head_off.model.roi_refine = None
    return {"roi_refine on": cfg, "roi_refine off": head_off}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    headers = ["variant", "params (M)", "GFLOPs", "of which MSDA", "latency ms (median)", "images/s", "peak mem (MB)"]
    rows = [
        [
            name,
            f"{r['params_m']:.2f}",
            f"{r['gflops']:.2f}",
            f"{r['gflops_deformable_attention']:.2f}",
            f"{r['latency_ms_median']:.1f}",
            f"{r['images_per_s']:.2f}",
            f"{r['peak_memory_mb']:.0f}",
        ]
        for name, r in results.items()
    ]
    return tabulate(rows, headers=headers, tablefmt="pipe")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig .py file")
    parser.add_argument("--height", type=int, default=800, help="input height after the test resize")
    parser.add_argument("--width", type=int, default=1333, help="input width after the test resize")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iter", type=int, default=50, help="timed forward passes (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    parser.add_argument("--backend", choices=BACKENDS, help=f"deformable attention backend (sets {BACKEND_ENV})")
    parser.add_argument("--weights", help="checkpoint to load (default: random weights)")
    parser.add_argument(
        "--fuse-bn", action="store_true", help="fold batch norms into the preceding convolutions (inference only)"
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
    if not os.path.isfile(args.config_file):
        raise SystemExit(f"config file {args.config_file!r} does not exist; pass a LazyConfig .py file")
    if args.weights and not os.path.isfile(args.weights):
        raise SystemExit(f"--weights {args.weights!r} does not exist; pass a checkpoint file or leave it out")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    device = check_args(args)
    if args.backend:
        os.environ[BACKEND_ENV] = args.backend
    cfg = load_config(args.config_file, args.opts, inference=True, checkpoint=args.weights or "")
    results = {}
    for name, variant_cfg in roi_variants(cfg).items():
        logger.info("Benchmarking %s", name)
        model = instantiate(variant_cfg.model)
        if args.weights:
            AtomicDetectionCheckpointer(model).load(args.weights)
        if args.fuse_bn:
            logger.info("Folded %d batch norms into convolutions", fuse_conv_bn(model.eval()))
        results[name] = benchmark_model(
            model, args.height, args.width, device, args.batch_size, args.warmup, args.num_iter
        )
    report = {
        "config_file": args.config_file,
        "input_size": [args.height, args.width],
        "batch_size": args.batch_size,
        "fuse_bn": args.fuse_bn,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "num_iter": args.num_iter,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "deformable_attention_backend": resolve_backend(device, torch.float32),
        "results": results,
    }
    print(format_table(results))
    output_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(output_dir, exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(f"Wrote {args.output}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
