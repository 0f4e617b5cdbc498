from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from salience_detr.compat import detectron2_has_compiled_ops
from salience_detr.data import DetrDatasetMapper, load_detection_dicts

# COCO 2017 as registered by detectron2 under $DETECTRON2_DATASETS (coco/annotations, coco/train2017, ...).
dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(load_detection_dicts)(names="coco_2017_train", filter_empty=True),
    mapper=L(DetrDatasetMapper)(is_train=True, image_format="RGB", on_unreadable="raise"),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(load_detection_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(is_train=False, image_format="RGB", on_unreadable="raise"),
    num_workers=4,
)

# The fast evaluation needs detectron2's compiled ops, which a pure-Python detectron2 does not have.
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    use_fast_impl=detectron2_has_compiled_ops(),
)
