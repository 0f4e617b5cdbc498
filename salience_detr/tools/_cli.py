"""Helpers the command-line tools share: dataset arguments, reading a COCO results file, running steps, the
GPU bundle's names.

Private to ``salience_detr.tools``: each tool imports them from here rather than from another tool, so a tool can
change its own interface without breaking the others.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULT_FIELDS = frozenset({"image_id", "category_id", "bbox", "score"})
# the offline wheel bundle of the GPU check: written by prepare_gpu_bundle, verified and installed by gpu_check
BUNDLE_DIR = ".gpu_bundle"
MANIFEST = "manifest.json"


def add_dataset_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """--dataset, plus --coco-json/--image-root to register a dataset that is not registered yet."""
    parser.add_argument("--dataset", required=True, help=f"registered dataset name, e.g. {example}")
    parser.add_argument("--coco-json", help="register --dataset from this COCO annotation file")
    parser.add_argument("--image-root", help="image folder of --coco-json")


def load_results(path: str) -> list[dict]:
    """A COCO detection results list (what COCOEvaluator writes), refused with the reason if it is not one."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"Results file {path!r} does not exist.") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"Results file {path!r} is not valid JSON ({error}).") from error
    if not isinstance(results, list) or any(not RESULT_FIELDS <= set(r) for r in results):
        raise ValueError(
            f"{path!r} is not a COCO detection results list: every entry needs image_id, category_id, bbox, score."
        )
    return results


def checkout_root(tool: str) -> Path:
    """The checkout holding train_net.py and demo/: the current directory (the package does not locate sources)."""
    candidate = Path.cwd()
    if (candidate / "train_net.py").is_file() and (candidate / "demo" / "demo.py").is_file():
        return candidate
    sys.exit(f"{tool}: run it from the salience-detr checkout (train_net.py and demo/demo.py were not found).")


def run_step(tool: str, title: str, command: list[str], cwd: Path, timings: dict[str, float]) -> None:
    """Run one printed command as a user would type it, record its wall time; stop the tool if it fails."""
    print(f"\n=== {title}\n$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd)
    timings[title] = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"{tool}: step '{title}' failed with exit code {completed.returncode}.")
