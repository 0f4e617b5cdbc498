"""COCO-format datasets: registration from paths, path checks, and the training dataset dicts.

Paths are checked when a dataset is registered or used, so a wrong path fails in seconds with the path
named, before any model is built.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)


class DatasetPathError(FileNotFoundError):
    """A dataset's annotation file or image folder does not exist."""


def check_dataset_paths(name: str, json_file: str | None, image_root: str | None) -> None:
    """Raise :class:`DatasetPathError` naming the missing path of dataset ``name``."""
    for argument, path in (("json_file", json_file), ("image_root", image_root)):
        if not path:
            raise DatasetPathError(
                f"Dataset {name!r}: no {argument} given. Pass it, e.g. as the config override "
                f"datasets.<split>.{argument}=/path/to/it (configs/common/data/custom.py)."
            )
    for kind, path, exists in (
        ("annotation file", json_file, os.path.isfile),
        ("image folder", image_root, os.path.isdir),
    ):
        if not exists(path):
            raise DatasetPathError(
                f"Dataset {name!r}: {kind} {path!r} does not exist. Pass the right path (for COCO 2017 set "
                "DETECTRON2_DATASETS to the folder that holds coco/annotations and coco/train2017)."
            )


def read_coco_categories(json_file: str) -> list[dict[str, Any]]:
    """The ``categories`` of a COCO json, sorted by id (the order detectron2 uses for contiguous ids)."""
    try:
        with open(json_file, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"Annotation file {json_file!r} is not valid JSON ({error}). Pass the COCO-format json of the dataset "
            "(e.g. annotations/instances_train2017.json), not an image, archive or partial download."
        ) from error
    if not isinstance(content, dict):
        raise ValueError(
            f"Annotation file {json_file!r} holds a JSON {type(content).__name__}, not a COCO dataset object with "
            "images, annotations and categories (a results file is a list: pass it to evaluate_json --json)."
        )
    categories = content.get("categories")
    if not categories:
        raise ValueError(f"{json_file!r} has no 'categories': a COCO detection json needs them.")
    return sorted(categories, key=lambda c: c["id"])


def register_coco_dataset(name: str, json_file: str | None, image_root: str | None) -> dict[str, Any]:
    """Register a COCO-format dataset under ``name`` and return its metadata (with ``num_classes``).

    Re-registering the same name with the same paths is a no-op, so configs can be instantiated twice.
    """
    check_dataset_paths(name, json_file, image_root)
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        if metadata.get("json_file") != json_file or metadata.get("image_root") != image_root:
            raise ValueError(
                f"Dataset name {name!r} is already registered with other paths "
                f"({metadata.get('json_file')!r}, {metadata.get('image_root')!r}); choose a new name."
            )
        return dataset_info(name)
    categories = read_coco_categories(json_file)
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
    )
    return dataset_info(name)


def dataset_info(name: str) -> dict[str, Any]:
    """Paths, class names and ``num_classes`` of a registered dataset."""
    if name not in DatasetCatalog.list():
        raise KeyError(f"Dataset {name!r} is not registered. Registered: {', '.join(sorted(DatasetCatalog.list()))}")
    metadata = MetadataCatalog.get(name)
    thing_classes = list(metadata.get("thing_classes", []))
    return {
        "name": name,
        "json_file": metadata.get("json_file"),
        "image_root": metadata.get("image_root"),
        "thing_classes": thing_classes,
        "num_classes": len(thing_classes),
    }


def resolve_dataset(name: str, json_file: str | None = None, image_root: str | None = None) -> list[dict[str, Any]]:
    """The dicts of dataset ``name``, registering it from ``json_file`` and ``image_root`` when given (tools)."""
    if json_file or image_root:
        register_coco_dataset(name, json_file, image_root)
    elif name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {name!r} is not registered; pass its COCO json and image folder to register it. "
            f"Registered: {', '.join(sorted(DatasetCatalog.list()))}"
        )
    check_registered_paths([name])
    return DatasetCatalog.get(name)


def check_registered_paths(names: Sequence[str]) -> None:
    """Check the files behind registered COCO-format datasets (detectron2's builtin COCO included).

    Datasets generated on first use (the built-in synthetic set) are skipped: loading them creates the files.
    """
    for name in names:
        info = dataset_info(name)
        if MetadataCatalog.get(name).get("generated_on_first_use", False):
            continue
        if info["json_file"] and info["image_root"]:
            check_dataset_paths(name, info["json_file"], info["image_root"])


def _is_valid_box(annotation: dict[str, Any], min_side: float) -> bool:
    x0, y0, x1, y1 = BoxMode.convert(annotation["bbox"], annotation["bbox_mode"], BoxMode.XYXY_ABS)
    return annotation.get("iscrowd", 0) == 0 and x1 - x0 >= min_side and y1 - y0 >= min_side


def load_detection_dicts(
    names: str | Sequence[str],
    filter_empty: bool = True,
    min_box_side: float = 1.0,
    max_images: int | None = None,
) -> list[dict[str, Any]]:
    """Dataset dicts of ``names`` with crowd and degenerate boxes removed (docs/model.md#data).

    With ``filter_empty`` the images left without a valid box are dropped, and how many is logged.
    ``max_images`` keeps only the first images (quick checks such as ``train.fast_dev_run``).
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("load_detection_dicts needs at least one dataset name.")
    check_registered_paths(names)
    dataset_dicts = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        if not dicts:
            raise ValueError(f"Dataset {name!r} is empty.")
        dataset_dicts.extend(dicts)
    for record in dataset_dicts:
        if "annotations" in record:
            record["annotations"] = [a for a in record["annotations"] if _is_valid_box(a, min_box_side)]
    if filter_empty:
        before = len(dataset_dicts)
        dataset_dicts = [r for r in dataset_dicts if r.get("annotations")]
        logger.info("Removed %d of %d images without a valid box from %s.", before - len(dataset_dicts), before, names)
        if not dataset_dicts:
            raise ValueError(f"No image of {names} has a valid (non-crowd, >= {min_box_side}px) box.")
    return dataset_dicts if max_images is None else dataset_dicts[:max_images]
