# The built-in synthetic shapes dataset (5 classes, ~320 px images), generated on first use into
# $SALIENCE_DETR_CACHE. Sizes are scaled down from the COCO recipe to match the small images.
from detectron2.config import LazyCall as L

from salience_detr.data import register_synthetic_datasets

from .coco_detr import dataloader

datasets = dict(synthetic=L(register_synthetic_datasets)(prefix="synthetic", num_train=600, num_val=100))

dataloader.train.dataset.names = "synthetic_train"
dataloader.train.mapper.update(
    min_sizes=[256, 288, 320, 352], max_size=480, crop_pre_sizes=[224, 256, 288], crop_size=[192, 288]
)
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 2
dataloader.test.dataset.names = "synthetic_val"
dataloader.test.mapper.update(test_min_size=320, test_max_size=480)
dataloader.test.num_workers = 2
