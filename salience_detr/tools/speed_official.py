"""CPU inference time of this project's R50 model against the official implementation's, side by side in one run.

    python -m salience_detr.tools.speed_official --official-root /path/to/Salience-DETR [--threads 1] \
        [--num-iter 5] [--warmup 1] [--height 800 --width 1066] [--no-ablation] [--output output/speed_official.json]

Both models hold the same seeded random weights in the official layout (``checkpoint.official_model``) and see the
same normalized image (batch 1). Each round runs the official model and every variant of ours once, interleaved, so
a change of load hits all of them alike; the report gives the median of ``--num-iter`` rounds after ``--warmup``
untimed ones, in CPU time of the process (``time.process_time``: the time the machine spent, which a shared
machine distorts less than the wall clock; with more threads it adds up every thread's time) and in wall time
(what a user waits for; the number that counts on an idle machine).

The variants are the levers of ``modeling.cpu_inference``, added one at a time (``--no-ablation``: none and all);
the last one, all levers, is the default CPU inference path. Every variant's detections, on the official model's
choice of queries (random weights leave many near-tied ones that float noise may swap), must match the official
ones by content (as the parity check does) and ours without levers to 1e-4 in score, else the tool exits with 1.
For the fastest variant the time is split by stage (backbone, neck, encoder, transformer neck, decoder,
postprocess, the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor, nn

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.checkpoint.official import coco_category_ids
from salience_detr.checkpoint.official_model import official_and_ours, recorded_query_index
from salience_detr.checkpoint.parity import (
    detections_like_ours,
    forced_query_order,
    parity_images,
    unmatched_detections,
)
from salience_detr.checkpoint.synthetic import OFFICIAL_R50_KEYS
from salience_detr.modeling.cpu_inference import CPU_LEVERS, optimize_for_cpu_inference
from salience_detr.tools._timing import interleaved_rounds

#: Cumulative ablation: each variant adds the next lever of ``optimize_for_cpu_inference`` to the one before.
LEVERS = tuple(CPU_LEVERS)
#: Submodules timed by hooks in both models (the official one names them alike); ours adds ``postprocess``.
STAGES = {
    "backbone": "backbone",
    "neck": "neck",
    "encoder": "transformer.encoder",
    "transformer neck": "transformer.neck",
    "decoder": "transformer.decoder",
}
#: Same detections: label equal, box within this many pixels, score within SCORE_TOL (as the parity check).
SCORE_TOL = 1e-4
BOX_TOL = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-root", required=True, help="a clone of github.com/xiuqhou/Salience-DETR")
    parser.add_argument("--keys", default=OFFICIAL_R50_KEYS, help="official R50 state-dict key list (.tsv)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the image")
    parser.add_argument("--height", type=int, default=800, help="image height (the test resize of 800 x 1066)")
    parser.add_argument("--width", type=int, default=1066, help="image width")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the idle measurement: 2)")
    parser.add_argument("--num-iter", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--no-ablation", action="store_true", help="only ours without and with all levers")
    parser.add_argument("--output", default="output/speed_official.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    for name in ("height", "width", "threads", "num_iter"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if min(args.height, args.width) < 320:
        parser.error(f"the official model needs images of at least 320x320, got {args.height}x{args.width}")
    return args


def lever_variants(ours: nn.Module, ablation: bool) -> dict[str, nn.Module]:
    """Copies of our model with no lever, then one more lever each (or straight to all without ``ablation``).

    The ablation's variants are named by the lever they add: "ours + fuse_bn", then "+ channels_last" (which has
    both), and so on; the last one has all levers."""
    steps = [LEVERS[: count + 1] for count in range(len(LEVERS))] if ablation else [LEVERS]
    variants = {"ours, no lever": ours}
    for levers in steps:
        variant = copy.deepcopy(ours)
        optimize_for_cpu_inference(variant, **{lever: lever in levers for lever in LEVERS})
        name = ("ours + " if len(levers) == 1 else "+ ") + levers[-1]
        variants[name if ablation else "ours, all levers"] = variant
    return variants


@contextlib.contextmanager
def stage_timer(model: nn.Module, stages: dict[str, str], seconds: dict[str, float]) -> Iterator[None]:
    """Within the block, add each named submodule's CPU time per call to ``seconds[stage]``."""
    starts: dict[str, float] = {}
    handles = []
    for stage, name in stages.items():
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda *_, s=stage: starts.__setitem__(s, time.process_time())))
        handles.append(
            module.register_forward_hook(
                lambda *_, s=stage: seconds.__setitem__(s, seconds.get(s, 0.0) + time.process_time() - starts[s])
            )
        )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def our_forward(model: nn.Module, image: Tensor, seconds: dict[str, float] | None = None) -> dict[str, Tensor]:
    """Our detections of one normalized image (scores, COCO labels, boxes); ``seconds`` gets the stage split."""
    inference = model.inference

    def timed_inference(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return inference(*args, **kwargs)
        finally:
            seconds["postprocess"] = seconds.get("postprocess", 0.0) + time.process_time() - start

    timer = stage_timer(model, STAGES, seconds) if seconds is not None else contextlib.nullcontext()
    if seconds is not None:
        model.inference = timed_inference
    try:
        with timer:
            instances = model([{"image": image}])[0]["instances"]
    finally:
        model.__dict__.pop("inference", None)
    labels = torch.as_tensor(coco_category_ids())[instances.pred_classes]
    return {"scores": instances.scores, "labels": labels, "boxes": instances.pred_boxes.tensor}


def official_forward(model: nn.Module, image: Tensor, seconds: dict[str, float] | None = None) -> dict[str, Tensor]:
    """The official detections of one image, clipped and filtered as ours are (``parity.detections_like_ours``)."""
    with stage_timer(model, STAGES, seconds) if seconds is not None else contextlib.nullcontext():
        result = model([image])[0]
    return detections_like_ours(result["scores"], result["labels"], result["boxes"], tuple(image.shape[-2:]))


def detection_check(detections: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Any]]:
    """Per variant of ours: detections without a match in the official ones and in ours without levers, and the
    largest score difference to the latter in rank order."""
    official, base = detections["official"], detections["ours, no lever"]
    checks = {}
    for name, mine in detections.items():
        if name == "official":
            continue
        same_count = len(mine["scores"]) == len(base["scores"])
        checks[name] = {
            "detections": len(mine["scores"]),
            "unmatched_vs_official": len(unmatched_detections(mine, official, SCORE_TOL, BOX_TOL)),
            "unmatched_vs_no_lever": len(unmatched_detections(mine, base, SCORE_TOL, BOX_TOL)),
            "max_score_diff_vs_no_lever": (
                (mine["scores"] - base["scores"]).abs().max().item() if same_count else float("nan")
            ),
        }
    return checks


def median_stages(splits: list[dict[str, float]], totals: list[float]) -> dict[str, float]:
    """Median CPU seconds per stage over the timed rounds, and ``other``: each round's total less its stages."""
    stages = {stage: statistics.median(split.get(stage, 0.0) for split in splits) for stage in splits[0]}
    stages["other"] = statistics.median(total - sum(split.values()) for split, total in zip(splits, totals))
    return stages


def measure(
    official: nn.Module, variants: dict[str, nn.Module], image: Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Detections check, interleaved timings and the stage split of the official model and our last variant."""
    fastest = list(variants)[-1]
    splits: dict[str, list[dict[str, float]]] = {"official": [], fastest: []}

    def run(name: str, model: nn.Module, forward: Callable[..., dict[str, Tensor]]) -> Callable[[], Any]:
        def call() -> Any:
            if name in splits:
                splits[name].append({})
            return forward(model, image, splits[name][-1] if name in splits else None)

        return call

    with torch.no_grad():
        with recorded_query_index(official) as chosen:
            detections = {"official": official_forward(official, image)}
        for name, model in variants.items():
            with forced_query_order(model.transformer, chosen["query_index"]):
                detections[name] = our_forward(model, image)
        runs = {"official": run("official", official, official_forward)}
        runs.update({name: run(name, model, our_forward) for name, model in variants.items()})
        for split in splits.values():
            split.clear()
        times = interleaved_rounds(runs, args.warmup, args.num_iter)
    medians = {name: {clock: statistics.median(values) for clock, values in t.items()} for name, t in times.items()}
    splits = {name: split[args.warmup :] for name, split in splits.items()}
    stages = {name: median_stages(split, times[name]["cpu"]) for name, split in splits.items()}
    return {"times": times, "medians": medians, "stages": stages, "checks": detection_check(detections)}


def format_report(result: dict[str, Any]) -> str:
    """The timing table (ratios to the official model, by the CPU and the wall clock) and the stage split."""
    medians, checks = result["medians"], result["checks"]
    official = medians["official"]
    rows = []
    for name, median in medians.items():
        check = checks.get(name, {})
        rows.append(
            [
                name,
                f"{median['cpu']:.3f}",
                f"{median['cpu'] / official['cpu']:.3f}",
                f"{median['wall']:.3f}",
                f"{median['wall'] / official['wall']:.3f}",
                check.get("unmatched_vs_official", "-"),
                check.get("unmatched_vs_no_lever", "-"),
            ]
        )
    headers = ["model", "CPU s", "x official", "wall s", "x official", "unmatched vs official", "vs no lever"]
    ((ours_name, ours_stages),) = [(n, s) for n, s in result["stages"].items() if n != "official"]
    official_stages = result["stages"]["official"]
    stage_rows = [
        [stage, f"{seconds:.3f}", f"{official_stages[stage]:.3f}" if stage in official_stages else "-"]
        for stage, seconds in ours_stages.items()
    ]
    return "\n\n".join(
        [
            tabulate(rows, headers=headers, tablefmt="pipe"),
            f"CPU seconds by stage (median), {ours_name} and the official model:",
            tabulate(stage_rows, headers=["stage", ours_name, "official"], tablefmt="pipe"),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    official, ours, _ = official_and_ours(Path(args.official_root), args.seed, args.keys)
    ours.pixel_mean.zero_()  # the image is already normalized, as the official model (eval_transform off) takes it
    ours.pixel_std.fill_(1.0)
    image = parity_images(args.seed, [(args.height, args.width)])[0]
    result = measure(official, lever_variants(ours, not args.no_ablation), image, args)
    print(
        f"R50 eval forward, one {args.height}x{args.width} image, {args.threads} thread(s), median of "
        f"{args.num_iter} interleaved rounds after {args.warmup} warm-up; torch {torch.__version__}\n"
    )
    print(format_report(result))
    report = {
        "input_size": [args.height, args.width],
        "threads": args.threads,
        "num_iter": args.num_iter,
        "warmup": args.warmup,
        "seed": args.seed,
        "torch": torch.__version__,
        **result,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(f"\nWrote {args.output}")
    failed = [
        name
        for name, check in result["checks"].items()
        if check["unmatched_vs_official"] or check["unmatched_vs_no_lever"]
    ]
    if failed:
        print(
            f"error: detections differ (label, box within {BOX_TOL} px, score within {SCORE_TOL}) for: "
            f"{', '.join(failed)}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
