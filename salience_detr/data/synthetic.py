"""A built-in detection dataset of drawn shapes, so training and evaluation run with no download.

Images hold circles, squares, triangles, ellipses and crosses from tiny to large on textured backgrounds,
overlapping each other (boxes cover the visible part; mostly hidden shapes are not annotated). Every image
comes from its own seeded generator, so the set is identical on every machine. It is written once, as
JPEG + COCO json, into ``$SALIENCE_DETR_CACHE`` (default ``~/.cache/salience_detr``): built in a temporary
folder and renamed into place, so an interrupted run never leaves half a dataset behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "ellipse", "cross")
SPLITS = ("train", "val")
FORMAT_VERSION = 1
MIN_VISIBLE_FRACTION = 0.4


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Generator parameters; the cache folder name is derived from them."""

    num_train: int = 600
    num_val: int = 100
    image_size: int = 256
    max_objects: int = 6
    min_object_size: int = 12
    max_object_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {self.num_train}, {self.num_val}")
        if not 4 <= self.min_object_size <= self.max_object_size <= self.image_size:
            raise ValueError(
                "Need 4 <= min_object_size <= max_object_size <= image_size, got "
                f"{self.min_object_size}, {self.max_object_size}, {self.image_size}"
            )
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")

    def num_images(self, split: str) -> int:
        return self.num_train if split == "train" else self.num_val

    def folder_name(self) -> str:
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"synthetic_shapes_v{FORMAT_VERSION}_{digest}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SALIENCE_DETR_CACHE", Path.home() / ".cache" / "salience_detr"))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One of four textures: gradient, checkerboard, stripes, blurred noise; always with pixel noise."""
    base = rng.uniform(40, 215, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        direction = rng.normal(size=2)
        ramp = (xx * direction[0] + yy * direction[1]) / (np.abs(direction).sum() * max(height, width))
        pattern = ramp[..., None] * rng.uniform(-80, 80, size=3)
    elif kind == 1:
        cell = rng.integers(8, 40)
        checker = ((xx // cell + yy // cell) % 2)[..., None]
        pattern = checker * rng.uniform(-40, 40, size=3)
    elif kind == 2:
        period = rng.uniform(6, 30)
        angle = rng.uniform(0, np.pi)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)[..., None]
        pattern = wave * rng.uniform(-35, 35, size=3)
    else:
        noise = rng.normal(size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
        pattern = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) * 30
    image = base + pattern + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _rotated(points: np.ndarray, angle: float, center: np.ndarray) -> np.ndarray:
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (points @ rotation.T + center).round().astype(np.int32)


def _draw_shape(mask: np.ndarray, class_id: int, center: np.ndarray, size: float, rng: np.random.Generator) -> None:
    """Fill ``mask`` (uint8) with shape ``class_id`` of extent about ``size`` around ``center``."""
    half = size / 2
    angle = rng.uniform(0, np.pi)
    cx, cy = (int(round(v)) for v in center)
    name = SHAPE_CLASSES[class_id]
    if name == "circle":
        cv2.circle(mask, (cx, cy), max(2, int(round(half))), 1, thickness=-1)
    elif name == "ellipse":
        axes = (max(2, int(round(half))), max(2, int(round(half * rng.uniform(0.35, 0.6)))))
        cv2.ellipse(mask, (cx, cy), axes, float(np.degrees(angle)), 0, 360, 1, thickness=-1)
    elif name == "square":
        side = half / np.sqrt(2) * 1.3
        corners = np.array([[-side, -side], [side, -side], [side, side], [-side, side]])
        cv2.fillPoly(mask, [_rotated(corners, angle, center)], 1)
    elif name == "triangle":
        vertex_angles = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        corners = np.stack([np.cos(vertex_angles), np.sin(vertex_angles)], axis=1) * half
        cv2.fillPoly(mask, [_rotated(corners, angle, center)], 1)
    else:
        arm = half * 0.3
        for bar in (
            np.array([[-half, -arm], [half, -arm], [half, arm], [-half, arm]]),
            np.array([[-arm, -half], [arm, -half], [arm, half], [-arm, half]]),
        ):
            cv2.fillPoly(mask, [_rotated(bar, angle, center)], 1)


def generate_image(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One RGB image and its annotations (COCO XYWH boxes of the visible part, 0-based class ids)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    height, width = (int(spec.image_size * s) for s in rng.uniform(0.85, 1.15, size=2))
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int32)
    placed = []
    for object_id in range(int(rng.integers(1, spec.max_objects + 1))):
        class_id = int(rng.integers(len(SHAPE_CLASSES)))
        size = float(np.exp(rng.uniform(np.log(spec.min_object_size), np.log(spec.max_object_size))))
        center = rng.uniform([size / 3, size / 3], [width - size / 3, height - size / 3])
        mask = np.zeros((height, width), dtype=np.uint8)
        _draw_shape(mask, class_id, center, size, rng)
        filled = mask.astype(bool)
        if not filled.any():
            continue
        color = rng.uniform(0, 255, size=3)
        shade = rng.normal(0, 8, size=(height, width, 1))
        image[filled] = np.clip(color + shade[filled], 0, 255).astype(np.uint8)
        owner[filled] = object_id
        placed.append((object_id, class_id, int(filled.sum())))
    annotations = []
    for object_id, class_id, full_area in placed:
        ys, xs = np.nonzero(owner == object_id)
        if len(xs) < MIN_VISIBLE_FRACTION * full_area:
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        annotations.append(
            {"class_id": class_id, "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)], "area": int(len(xs))}
        )
    return image, annotations


def _write_split(spec: SyntheticSpec, split: str, folder: Path) -> None:
    image_dir = folder / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(spec.num_images(split)):
        image, objects = generate_image(spec, split, index)
        file_name = f"{index:06d}.jpg"
        if not cv2.imwrite(str(image_dir / file_name), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise OSError(f"Could not write {image_dir / file_name}")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["class_id"] + 1,
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (folder / f"{split}.json").write_text(json.dumps(coco))


def ensure_synthetic_dataset(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the dataset folder, generating it first if it is not complete in the cache."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / spec.folder_name()
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Generating the synthetic dataset (%d train, %d val images) in %s", spec.num_train, spec.num_val, target
    )
    staging = Path(tempfile.mkdtemp(prefix=".partial_", dir=root))
    try:
        for split in SPLITS:
            _write_split(spec, split, staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("Another process finished %s first; using it.", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def synthetic_split_paths(
    spec: SyntheticSpec, split: str, cache_dir: str | os.PathLike | None = None
) -> tuple[str, str]:
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / spec.folder_name()
    return str(folder / f"{split}.json"), str(folder / split)


def _load_split(spec: SyntheticSpec, split: str, cache_dir: str | None, name: str) -> list[dict[str, Any]]:
    ensure_synthetic_dataset(spec, cache_dir)
    json_file, image_root = synthetic_split_paths(spec, split, cache_dir)
    return load_coco_json(json_file, image_root, name)


def register_synthetic_datasets(
    prefix: str = "synthetic", cache_dir: str | None = None, **spec_fields: Any
) -> dict[str, Any]:
    """Register ``{prefix}_train`` and ``{prefix}_val``; the images are generated on first use.

    ``spec_fields`` are :class:`SyntheticSpec` fields (tests pass tiny sizes). Registering the same names
    again replaces the earlier registration, so a config can choose other generator parameters.
    """
    spec = SyntheticSpec(**spec_fields)
    infos = {}
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        json_file, image_root = synthetic_split_paths(spec, split, cache_dir)
        DatasetCatalog.register(name, lambda s=split, n=name: _load_split(spec, s, cache_dir, n))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            generated_on_first_use=True,
            thing_classes=list(SHAPE_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPE_CLASSES))},
        )
        infos[split] = {
            "name": name,
            "json_file": json_file,
            "image_root": image_root,
            "num_classes": len(SHAPE_CLASSES),
        }
    return infos
