# Augmentation presets for DetrDatasetMapper: `train` and `test` lists of detectron2 T.Augmentation.
# Without a preset the mapper runs the DETR recipe sized by its own min_sizes/max_size/... arguments.
# Two lines in an experiment config switch to a preset (the mappers' size arguments are dropped, the
# preset's own sizes apply):
#     from ..common.data.augmentations import use_augmentations
#     use_augmentations(dataloader, "lsj")
# and overrides then reach the preset's arguments, e.g. dataloader.train.mapper.augmentations.image_size=800.
import copy

from detectron2.config import LazyCall as L

from salience_detr.data.augmentations import (
    detr_train_augmentations,
    large_scale_jitter,
    resize_test_augmentations,
)

LSJ_SIZE = 1024

presets = dict(
    # the DETR recipe at the COCO sizes, as the mapper runs it by default
    detr=dict(train=L(detr_train_augmentations)(), test=L(resize_test_augmentations)()),
    # large-scale jitter (the official Salience DETR code's `lsj` preset): scale 0.1-2 of a square, crop or pad
    lsj=dict(
        train=L(large_scale_jitter)(image_size=LSJ_SIZE, min_scale=0.1, max_scale=2.0),
        test=L(resize_test_augmentations)(min_size=LSJ_SIZE, max_size=LSJ_SIZE),
    ),
)

_MAPPER_SIZE_ARGUMENTS = ("min_sizes", "max_size", "crop_pre_sizes", "crop_size", "test_min_size", "test_max_size")


def use_augmentations(dataloader, name: str) -> None:
    """Give dataloader.train and dataloader.test the mappers' augmentations of preset `name`."""
    if name not in presets:
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of {sorted(presets)}")
    for split in ("train", "test"):
        mapper = dataloader[split].mapper
        for argument in _MAPPER_SIZE_ARGUMENTS:
            mapper.pop(argument, None)
        mapper.augmentations = copy.deepcopy(presets[name][split])
