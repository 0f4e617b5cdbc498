"""Detections as data: COCO results records (the format COCOEvaluator writes) for images and video frames.

Each record is a COCO result (``image_id`` when the image is one of a dataset's, ``category_id``, ``bbox``
XYWH in original pixels, ``score``) plus what a reader needs without the dataset: ``file_name``,
``category_name`` and, for videos, ``frame``. Category ids are the dataset's own (COCO's 1..90) when the
metadata maps them (``thing_dataset_id_to_contiguous_id``), else the model's contiguous class indices, so a
file for a dataset's images is scored as it is by ``python -m salience_detr.tools.evaluate_json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from detectron2.data import Metadata
from detectron2.structures import BoxMode, Instances

from salience_detr.utils.atomic import atomic_write

logger = logging.getLogger(__name__)


def detection_records(instances: Instances, metadata: Metadata, **fields: Any) -> list[dict[str, Any]]:
    """One record per detection; ``fields`` (``file_name``, ``image_id``, ``frame``) are copied into each,
    except those that are None (an id that is not known is left out, never guessed)."""
    to_dataset_id = {c: d for d, c in metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
    names = list(metadata.get("thing_classes", None) or [])
    known = {key: value for key, value in fields.items() if value is not None}
    boxes = BoxMode.convert(instances.pred_boxes.tensor.cpu().double(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    records = []
    for box, score, label in zip(boxes.tolist(), instances.scores.tolist(), instances.pred_classes.tolist()):
        record = {**known, "category_id": int(to_dataset_id.get(label, label))}
        if label < len(names):
            record["category_name"] = names[label]
        records.append({**record, "bbox": [round(v, 3) for v in box], "score": round(float(score), 6)})
    return records


class ImageIds:
    """Image ids of a COCO annotation file, looked up by image file: the same file (resolved path) first,
    else a file name that only one image of the dataset has."""

    def __init__(self, images: Sequence[dict[str, Any]], image_root: str) -> None:
        self.by_path = {os.path.realpath(os.path.join(image_root, i["file_name"])): i["id"] for i in images}
        file_names = {i["id"]: os.path.basename(i["file_name"]) for i in images}
        counts = Counter(file_names.values())
        self.by_name = {name: image_id for image_id, name in file_names.items() if counts[name] == 1}

    @classmethod
    def of_dataset(cls, metadata: Metadata) -> ImageIds | None:
        """The ids of the dataset behind ``metadata`` (its ``json_file`` and ``image_root``); None when it has
        no annotation file here (a checkpoint's metadata, a dataset not yet generated)."""
        json_file, image_root = metadata.get("json_file", None), metadata.get("image_root", None)
        if not json_file or not image_root or not os.path.isfile(json_file):
            logger.info("No annotation file for %r here: the results carry no image ids.", metadata.get("name", ""))
            return None
        with open(json_file) as file:
            return cls(json.load(file).get("images", []), image_root)

    def __call__(self, path: str) -> int | None:
        found = self.by_path.get(os.path.realpath(path))
        return found if found is not None else self.by_name.get(os.path.basename(path))


def write_results(path: str, records: Sequence[dict[str, Any]]) -> None:
    """The records as one JSON list, written atomically (a killed demo leaves no half file)."""
    atomic_write(path, lambda file: file.write(json.dumps(list(records)).encode()))


class ResultsFile:
    """Collects the records of a run (images and video frames) and writes them once, at the end."""

    def __init__(self, path: str, metadata: Metadata) -> None:
        self.check_path(path)
        self.path = path
        self.metadata = metadata
        self.image_ids = ImageIds.of_dataset(metadata)
        self.records: list[dict[str, Any]] = []

    @staticmethod
    def check_path(path: str) -> None:
        """Refuse a folder or a name without .json before any work is done."""
        if os.path.isdir(path) or not path.lower().endswith(".json"):
            raise ValueError(f"results file {path!r} must be a file name ending in .json (not a folder)")

    def add_image(self, file_name: str, instances: Instances) -> None:
        image_id = self.image_ids(file_name) if self.image_ids is not None else None
        self.records += detection_records(instances, self.metadata, image_id=image_id, file_name=file_name)

    def add_frame(self, source: str, frame: int, instances: Instances) -> None:
        self.records += detection_records(instances, self.metadata, file_name=source, frame=frame)

    def write(self) -> None:
        write_results(self.path, self.records)
        logger.info("Wrote %d detections to %s", len(self.records), self.path)
