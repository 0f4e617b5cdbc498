"""Test helpers for "your own dataset": a generated 3-class COCO-format dataset and the README's config file.

The dataset reuses the built-in synthetic shapes with their five classes merged into three (round, angular,
cross), so it is a real detection task whose class count differs from the built-in data's five.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from salience_detr.data.synthetic import SyntheticSpec, generate_image

THREE_CLASSES = ("round", "angular", "cross")
# built-in class id (circle, square, triangle, ellipse, cross) -> index in THREE_CLASSES
MERGED = {0: 0, 1: 1, 2: 1, 3: 0, 4: 2}

# The README's "Fine-tune on your own dataset" config, with the base experiment as a parameter (R50 there).
USER_CONFIG = """\
from configs.salience_detr.{base} import dataloader, lr_multiplier, model, optimizer, train
from configs.common.data.custom import datasets

dataloader.train.dataset.names = "${{datasets.train.name}}"
dataloader.test.dataset.names = "${{datasets.val.name}}"
model.num_classes = None  # the number of categories in the training json
"""


def write_three_class_split(root: Path, split: str, spec: SyntheticSpec) -> tuple[str, str]:
    """Images and a COCO json for ``split`` under ``root``; returns (json_file, image_root)."""
    image_root = root / split
    image_root.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(spec.num_images(split)):
        image, objects = generate_image(spec, split, index)
        file_name = f"{index:04d}.png"
        cv2.imwrite(str(image_root / file_name), image[:, :, ::-1])
        images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": MERGED[obj["class_id"]] + 1,
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(THREE_CLASSES)]
    json_file = root / f"{split}.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(json_file), str(image_root)


def write_user_config(folder: Path, base: str = "salience_detr_tiny_synthetic") -> Path:
    """The README's config file, written outside configs/ (it imports the project's configs absolutely)."""
    path = folder / "my_dataset.py"
    path.write_text(USER_CONFIG.format(base=base))
    return path


def dataset_overrides(root: Path, prefix: str) -> list[str]:
    """The README's dataset overrides for the dataset under ``root``, registered under names ``prefix``_*."""
    return [
        f"datasets.train.name={prefix}_train",
        f"datasets.train.json_file={root / 'train.json'}",
        f"datasets.train.image_root={root / 'train'}",
        f"datasets.val.name={prefix}_val",
        f"datasets.val.json_file={root / 'val.json'}",
        f"datasets.val.image_root={root / 'val'}",
    ]
