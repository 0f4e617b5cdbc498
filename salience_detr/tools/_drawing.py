"""Drawing helpers the visualisation tools share: ground truth of a dataset record, and writing one PNG per record.

Private to ``salience_detr.tools`` (``visualize_data``, ``visualize_json_results``), so neither tool imports the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from tqdm import tqdm

from salience_detr.data.image_io import read_image


def draw_ground_truth(record: dict[str, Any], metadata, scale: float = 1.0) -> np.ndarray:
    """RGB image of ``record`` with its boxes and class names drawn."""
    image = read_image(record["file_name"], format="RGB")
    return Visualizer(image, metadata=metadata, scale=scale).draw_dataset_dict(record).get_image()


def output_path(output_dir: str, record: dict[str, Any]) -> str:
    """``{image_id}_{file stem}.png`` in ``output_dir``: unique per image even where file names repeat."""
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    return os.path.join(output_dir, f"{record['image_id']}_{stem}.png")


def write_drawings(
    records: Sequence[dict[str, Any]], draw: Callable[[dict[str, Any]], np.ndarray], output_dir: str, desc: str
) -> list[str]:
    """``draw(record)`` saved as a PNG per record (with a progress bar); returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for record in tqdm(records, desc=desc, unit="image"):
        path = output_path(output_dir, record)
        Image.fromarray(draw(record)).save(path)
        written.append(path)
    print(f"Wrote {len(written)} images to {output_dir}")
    return written
