"""The RoI head's ablation (issue #5): the same schedule with and without the head, over several seeds.

Arms, per seed (each skipped when its ``model_final.pth`` exists, so a killed ablation picks up where it stopped):

- ``base``: the baseline config;
- ``roi``: its ``_roi`` twin, base and head trained together;
- ``head_only``: the ``_roi`` twin with ``train.trainable=[roi_refine]`` from the trained base of that seed (the
  ``base`` arm's weights, else the ``roi`` arm's without its head): a fresh head trained alone on a base that no
  longer moves, as when adding the head to a released checkpoint.

Every run is evaluated with COCOEvaluator as configured; the ``_roi`` weights also with the IoU head's rescoring on
(beta 0.2; the config refines boxes only) and with the head off, a paired comparison on the same weights. Prints AP /
AP50 / AP75 per run, means and paired differences, and writes them as JSON.

  python -m salience_detr.tools.roi_ablation --seeds 0 1 2 [--arms base roi head_only]
      [--output-dir output/roi_ablation] [--opts k=v ...]

The head leaves the base model's training bit for bit unchanged (tests/test_roi_refine.py), so "roi: head off"
equals "baseline" seed by seed, and ``--arms roi head_only`` is enough once that has been seen (runs already on disk
are reported either way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from detectron2.config import instantiate
from detectron2.evaluation import inference_on_dataset
from torch import nn

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.config import load_config
from salience_detr.engine import AtomicDetectionCheckpointer
from salience_detr.tools._cli import checkout_root, run_step
from salience_detr.tools.user_errors import exit_on_user_error
from salience_detr.utils.atomic import atomic_write

BASELINE = "configs/salience_detr/salience_detr_tiny_synthetic.py"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


RESCORING_BETA = 0.2


def as_trained(model: nn.Module) -> None:
    """The run's own config, unchanged."""


def head_off(model: nn.Module) -> None:
    model.roi_refine = None


def rescored(model: nn.Module) -> None:
    model.roi_refine.iou_beta = RESCORING_BETA


# evaluated variants: (name, arm, change applied to the trained model before evaluating it)
VARIANTS: list[tuple[str, str, Callable[[nn.Module], None]]] = [
    ("baseline", "base", as_trained),
    ("roi: head on", "roi", as_trained),
    (f"roi: head on, rescored (beta {RESCORING_BETA})", "roi", rescored),
    ("roi: head off", "roi", head_off),
    ("head only: head on", "head_only", as_trained),
    (f"head only: head on, rescored (beta {RESCORING_BETA})", "head_only", rescored),
]
ARMS = ("base", "roi", "head_only")
HEAD_OFF = "roi: head off"


def roi_twin(config_file: str) -> str:
    path = Path(config_file)
    twin = path.with_name(f"{path.stem}_roi{path.suffix}")
    if not twin.is_file():
        raise FileNotFoundError(
            f"{config_file} has no RoI twin {twin}; every Salience DETR config needs a *_roi* twin."
        )
    return str(twin)


def evaluate(config_file: str, overrides: list[str], weights: Path, change: Callable[[nn.Module], None]) -> dict:
    """COCO bbox metrics of ``weights``, after ``change``, on the config's test set."""
    cfg = load_config(config_file, overrides)
    model = instantiate(cfg.model).to(cfg.train.device)
    AtomicDetectionCheckpointer(model).load(str(weights))
    change(model)
    cfg.dataloader.evaluator.output_dir = None
    loader = instantiate(cfg.dataloader.test)
    results = inference_on_dataset(model.eval(), loader, instantiate(cfg.dataloader.evaluator))
    return {key: results["bbox"][key] for key in METRICS}


def table(rows: list[dict]) -> str:
    lines = ["| run | seed | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['seed']} | " + " | ".join(f"{row[m]:.1f}" for m in METRICS) + " |")
    for name, *_ in VARIANTS:
        chosen = [row for row in rows if row["variant"] == name]
        if len(chosen) > 1:
            means = [statistics.mean(row[m] for row in chosen) for m in METRICS]
            spreads = [statistics.stdev(row[m] for row in chosen) for m in METRICS]
            cells = " | ".join(f"{mu:.1f} ± {sd:.1f}" for mu, sd in zip(means, spreads))
            lines.append(f"| **{name}**, mean ± sd | {len(chosen)} seeds | {cells} |")
    off = {row["seed"]: row for row in rows if row["variant"] == HEAD_OFF}
    for name in (name for name, arm, _ in VARIANTS if arm != "base" and name != HEAD_OFF):
        pairs = [(row, off[row["seed"]]) for row in rows if row["variant"] == name and row["seed"] in off]
        if pairs:
            deltas = [[on[m] - base[m] for on, base in pairs] for m in METRICS]
            cells = " | ".join(f"{statistics.mean(d):+.1f} ({min(d):+.1f} to {max(d):+.1f})" for d in deltas)
            lines.append(f"| **{name} minus head off**, mean (range) | {len(pairs)} seeds | {cells} |")
    return "\n".join(lines)


def base_weights(output_dir: Path, seed: int) -> Path:
    """The trained base of ``seed``: the baseline run's weights, else the ``roi`` run's with the head left out."""
    baseline = output_dir / f"base_seed{seed}" / "model_final.pth"
    if baseline.is_file():
        return baseline
    joint = output_dir / f"roi_seed{seed}" / "model_final.pth"
    if not joint.is_file():
        raise FileNotFoundError(f"the head_only arm of seed {seed} needs a trained base: {baseline} or {joint}.")
    stripped = output_dir / f"roi_seed{seed}" / "base_without_head.pth"
    if not stripped.is_file():
        model = torch.load(joint, map_location="cpu", weights_only=False)["model"]
        base = {key: value for key, value in model.items() if not key.startswith("roi_refine.")}
        atomic_write(str(stripped), lambda f: torch.save({"model": base}, f))
    return stripped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=BASELINE, help="baseline config; its *_roi twin is the other arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to train")
    parser.add_argument("--output-dir", default="output/roi_ablation")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="key=value overrides for every arm")
    args = parser.parse_args(argv)

    root = checkout_root("roi_ablation")
    twin = roi_twin(str(root / args.config_file))
    configs = {"base": str(root / args.config_file), "roi": twin, "head_only": twin}
    output_dir = (root / args.output_dir).resolve()
    timings: dict[str, float] = {}
    rows = []
    for seed in args.seeds:
        for arm, config_file in configs.items():
            run_dir = output_dir / f"{arm}_seed{seed}"
            overrides = [f"train.seed={seed}", f"train.output_dir={run_dir}", *args.opts]
            if not (run_dir / "model_final.pth").is_file():
                if arm not in args.arms:
                    continue
                if arm == "head_only":
                    init = base_weights(output_dir, seed)
                    overrides += ["train.trainable=[roi_refine]", f"train.init_checkpoint={init}"]
                command = [sys.executable, "train_net.py", "--config-file", config_file, "--resume", *overrides]
                run_step("roi_ablation", f"train {arm}, seed {seed}", command, root, timings)
            for name, variant_arm, change in VARIANTS:
                if variant_arm == arm:
                    metrics = evaluate(config_file, overrides, run_dir / "model_final.pth", change)
                    rows.append({"variant": name, "seed": seed, **metrics})
                    print(f"{name}, seed {seed}: " + "  ".join(f"{m} {metrics[m]:.1f}" for m in METRICS), flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ablation.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))
    print(f"\nper-run metrics: {output_dir / 'ablation.json'}")


if __name__ == "__main__":
    with exit_on_user_error("roi_ablation"):
        main()
