"""The README's main job: train, evaluate and look at a small Salience DETR, on CPU, with no download.

Runs, as the commands a user would type (each printed before it runs):
  1. ``train_net.py`` on the small config: trains on the built-in synthetic dataset (generated on first use),
     then evaluates with detectron2's ``COCOEvaluator`` (AP table, ``coco_instances_results.json``);
  2. ``visualize_json_results``: draws predictions beside ground truth for a few validation images;
  3. ``demo/demo.py``: detections and salience heat-maps of one validation image, from the trained weights.
Ends with a summary: AP, wall time of each step, and where the files are.

  python -m salience_detr.tools.quickstart [--output-dir output/quickstart] [--opts train.max_iter=100 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from salience_detr.config import load_config
from salience_detr.data import dataset_info
from salience_detr.tools._cli import checkout_root, run_step
from salience_detr.tools.user_errors import exit_on_user_error

DEFAULT_CONFIG = "configs/salience_detr/salience_detr_tiny_synthetic.py"
NUM_DRAWN_IMAGES = 4
DRAW_THRESHOLD = 0.3


def last_bbox_metrics(output_dir: Path) -> dict[str, float]:
    """The last evaluation's bbox metrics that train_net.py logged to metrics.json."""
    metrics_file = output_dir / "metrics.json"
    found: dict[str, float] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line)
            bbox = {key.split("/", 1)[1]: value for key, value in record.items() if key.startswith("bbox/")}
            if bbox:
                found = bbox
    return found


def draw_command(python: str, val: dict, results_file: Path, output_dir: Path) -> list[str]:
    """visualize_json_results on the evaluation's results: predictions beside ground truth for a few images."""
    return [
        python,
        "-m",
        "salience_detr.tools.visualize_json_results",
        "--input",
        str(results_file),
        "--dataset",
        val["name"],
        "--coco-json",
        val["json_file"],
        "--image-root",
        val["image_root"],
        "--output",
        str(output_dir / "detections"),
        "--num-images",
        str(NUM_DRAWN_IMAGES),
        "--conf-threshold",
        str(DRAW_THRESHOLD),
    ]


def demo_command(python: str, config_file: str, image: Path, output_dir: Path, overrides: list[str]) -> list[str]:
    """demo/demo.py with salience maps on one image, from the weights training just wrote."""
    return [
        python,
        "demo/demo.py",
        "--config-file",
        config_file,
        "--input",
        str(image),
        "--output",
        str(output_dir / "demo"),
        "--confidence-threshold",
        str(DRAW_THRESHOLD),
        "--show-salience",
        "--opts",
        *overrides,
        f"train.init_checkpoint={output_dir / 'model_final.pth'}",
    ]


def print_summary(timings: dict[str, float], output_dir: Path, results_file: Path) -> None:
    """Wall time of each step, the AP of the last evaluation, and where the files are."""
    metrics = last_bbox_metrics(output_dir)
    print("\n=== quickstart summary")
    for title, seconds in timings.items():
        print(f"{title:<28s} {seconds / 60:6.1f} min")
    if metrics:
        print("COCO bbox " + "  ".join(f"{key} {metrics[key]:.1f}" for key in ("AP", "AP50", "AP75") if key in metrics))
    print(f"results: {results_file}\ndrawings: {output_dir / 'detections'}\ndemo: {output_dir / 'demo'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="LazyConfig of the model to train")
    parser.add_argument("--output-dir", default="output/quickstart", help="where everything is written")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    args = parser.parse_args(argv)

    root = checkout_root("quickstart")
    output_dir = (root / args.output_dir).resolve()
    config_file = str(root / args.config_file)
    overrides = [f"train.output_dir={output_dir}", "train.overwrite=True", *args.opts]  # a rerun replaces the last

    cfg = load_config(config_file, overrides)
    val = dataset_info(cfg.dataloader.test.dataset.names)
    results_file = output_dir / "inference" / "coco_instances_results.json"
    python = sys.executable
    timings: dict[str, float] = {}
    train_command = [python, "train_net.py", "--config-file", config_file, *overrides]
    run_step("quickstart", "train and evaluate", train_command, root, timings)
    draw = draw_command(python, val, results_file, output_dir)
    run_step("quickstart", "draw validation detections", draw, root, timings)
    first_image = sorted(Path(val["image_root"]).iterdir())[0]
    demo = demo_command(python, config_file, first_image, output_dir, overrides)
    run_step("quickstart", "demo on one image", demo, root, timings)
    print_summary(timings, output_dir, results_file)


if __name__ == "__main__":
    with exit_on_user_error("quickstart"):
        main()
