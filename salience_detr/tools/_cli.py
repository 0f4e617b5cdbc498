"""Helpers the command-line tools share: dataset arguments and reading a COCO results file.

Private to ``salience_detr.tools``: each tool imports them from here rather than from another tool, so a tool can
change its own interface without breaking the others.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULT_FIELDS = frozenset({"image_id", "category_id", "bbox", "score"})


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
