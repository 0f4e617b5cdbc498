"""Datasets and the DETR dataset mapper. Importing this package registers the built-in synthetic dataset
(``synthetic_train`` / ``synthetic_val``; its images are generated on first use)."""

from .datasets import (
    DatasetPathError,
    check_dataset_paths,
    dataset_info,
    load_detection_dicts,
    register_coco_dataset,
    resolve_dataset,
)
from .image_check import ImageCheckError, ImageCheckReport, check_images
from .image_io import read_image
from .mapper import DetrDatasetMapper, UnreadableImageError
from .results_check import ResultsMismatchError, check_results_match
from .synthetic import SHAPE_CLASSES, SyntheticSpec, ensure_synthetic_dataset, register_synthetic_datasets

register_synthetic_datasets()

__all__ = [
    "SHAPE_CLASSES",
    "DatasetPathError",
    "DetrDatasetMapper",
    "ImageCheckError",
    "ImageCheckReport",
    "ResultsMismatchError",
    "SyntheticSpec",
    "UnreadableImageError",
    "check_dataset_paths",
    "check_images",
    "check_results_match",
    "dataset_info",
    "ensure_synthetic_dataset",
    "load_detection_dicts",
    "read_image",
    "register_coco_dataset",
    "register_synthetic_datasets",
    "resolve_dataset",
]
