# Any COCO-format dataset, registered from paths under new names. Give the paths as overrides, e.g.
#   train_net.py --config-file <experiment using this file> \
#     datasets.train.json_file=/data/x/train.json datasets.train.image_root=/data/x/train \
#     datasets.val.json_file=/data/x/val.json datasets.val.image_root=/data/x/val
# train_net.py registers `datasets` first (a missing path stops there), and when model.num_classes is None
# it takes the number of categories of the training json.
from detectron2.config import LazyCall as L

from salience_detr.data import register_coco_dataset

from .coco_detr import dataloader

datasets = dict(
    train=L(register_coco_dataset)(name="custom_train", json_file=None, image_root=None),
    val=L(register_coco_dataset)(name="custom_val", json_file=None, image_root=None),
)

dataloader.train.dataset.names = "custom_train"
dataloader.test.dataset.names = "custom_val"
