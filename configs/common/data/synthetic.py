# The built-in synthetic shapes dataset (5 classes, ~256 px images), generated on first use into
# $SALIENCE_DETR_CACHE. Sizes are scaled down from the COCO recipe to match the small images.
# The generator parameters are SyntheticSpec's defaults, so the names synthetic_train / synthetic_val mean the
# same images here and in the tools (which register the defaults on import).
from detectron2.config import LazyCall as L

from salience_detr.data import register_synthetic_datasets

from .coco_detr import dataloader

datasets = dict(synthetic=L(register_synthetic_datasets)(prefix="synthetic", num_train=600, num_val=100))

dataloader.train.dataset.names = "synthetic_train"
dataloader.train.mapper.update(min_sizes=[192, 224, 256], max_size=320, crop_pre_sizes=[192, 224], crop_size=[128, 192])
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 2
dataloader.test.dataset.names = "synthetic_val"
dataloader.test.mapper.update(test_min_size=224, test_max_size=320)
dataloader.test.num_workers = 2
