"""DETR-style dataset mapper: the augmentation of docs/model.md#augmentation expressed with detectron2 transforms.

The augmentations come from the config (``augmentations``, detectron2 ``T.Augmentation`` objects; presets in
``salience_detr.data.augmentations``). Without them the mapper runs the DETR recipe: training, a random
horizontal flip, then with equal probability either a multi-scale resize, or a resize -> random crop ->
multi-scale resize; evaluation, one shortest-edge resize. The model receives
uint8 CHW RGB images and ``Instances`` with absolute XYXY boxes in the augmented image; crowd and
degenerate boxes are removed here so the model never sees them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .augmentations import detr_train_augmentations, resize_test_augmentations
from .image_io import check_image_size, read_image

logger = logging.getLogger(__name__)

UNREADABLE_POLICIES = ("raise", "skip")
MIN_BOX_SIDE = 1.0  # pixels; thinner boxes are degenerate (docs/model.md#augmentation)


class UnreadableImageError(RuntimeError):
    """An image file of the dataset could not be decoded."""


class DetrDatasetMapper:
    """Map one detectron2 dataset dict to the model input of ``SalienceDETR``.

    ``augmentations`` replaces the default DETR recipe; without it, the size arguments scale that recipe
    down for small images (unset, they are the COCO sizes). ``on_unreadable="skip"`` logs a warning, counts
    the file and returns ``None`` (detectron2's ``MapDataset`` then draws another image); ``"raise"`` stops
    with the file name.
    """

    def __init__(
        self,
        is_train: bool,
        augmentations: Sequence[T.Augmentation] | None = None,
        min_sizes: Sequence[int] | None = None,
        max_size: int | None = None,
        crop_pre_sizes: Sequence[int] | None = None,
        crop_size: Sequence[int] | None = None,
        test_min_size: int | None = None,
        test_max_size: int | None = None,
        image_format: str = "RGB",
        on_unreadable: str = "raise",
    ) -> None:
        if on_unreadable not in UNREADABLE_POLICIES:
            raise ValueError(f"on_unreadable must be one of {UNREADABLE_POLICIES}, got {on_unreadable!r}")
        sizes = dict(
            min_sizes=min_sizes,
            max_size=max_size,
            crop_pre_sizes=crop_pre_sizes,
            crop_size=crop_size,
            test_min_size=test_min_size,
            test_max_size=test_max_size,
        )
        if augmentations is None:
            augmentations = _default_recipe(is_train, {k: v for k, v in sizes.items() if v is not None})
        elif any(v is not None for v in sizes.values()):
            given = sorted(k for k, v in sizes.items() if v is not None)
            raise ValueError(
                f"DetrDatasetMapper got both augmentations and {given}, which only size the default DETR recipe; "
                "set the sizes in the augmentations preset instead, or leave augmentations unset."
            )
        self.augmentations = T.AugmentationList(list(augmentations))
        self.is_train = is_train
        self.image_format = image_format
        self.on_unreadable = on_unreadable
        self.unreadable_count = 0

    def _read_image(self, file_name: str) -> np.ndarray | None:
        try:
            return read_image(file_name, format=self.image_format)
        except (OSError, ValueError, SyntaxError) as error:
            if self.on_unreadable == "raise":
                raise UnreadableImageError(
                    f"Cannot read image {file_name!r} ({error}). Fix or remove the file, or build the mapper "
                    "with on_unreadable='skip' to skip such images with a warning."
                ) from error
            self.unreadable_count += 1
            logger.warning(
                "Skipping unreadable image %s (%s); %d skipped so far.", file_name, error, self.unreadable_count
            )
            return None

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict["file_name"])
        if image is None:
            return None
        check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train or annotations is None:
            return dataset_dict
        kept = [
            utils.transform_instance_annotations(_boxes_only(obj), transforms, image_shape)
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(kept, image_shape)
        dataset_dict["instances"] = instances[_has_min_side(instances.gt_boxes.tensor, MIN_BOX_SIDE)]
        return dataset_dict


def _default_recipe(is_train: bool, sizes: dict[str, Any]) -> list[T.Augmentation]:
    """The DETR recipe at the given sizes (the COCO ones where a size is missing)."""
    if is_train:
        train_keys = ("min_sizes", "max_size", "crop_pre_sizes", "crop_size")
        return detr_train_augmentations(**{key: sizes[key] for key in train_keys if key in sizes})
    test_keys = {"test_min_size": "min_size", "test_max_size": "max_size"}
    return resize_test_augmentations(**{name: sizes[key] for key, name in test_keys.items() if key in sizes})


def _has_min_side(boxes: torch.Tensor, min_side: float) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)


def _boxes_only(annotation: dict[str, Any]) -> dict[str, Any]:
    """Drop masks and keypoints: this is a box detector, and transforming polygons costs time."""
    return {key: value for key, value in annotation.items() if key not in ("segmentation", "keypoints")}
