"""Salience DETR ConvNeXt-L 4-scale, 12 epochs (1x) on COCO 2017: the official recipe (docs/model.md#training-recipe).

The optimizer is the R50 one: the official recipe uses the same parameter groups for every backbone (backbone
lr x 0.1, no weight decay on names containing "norm" or "bias"), and this wrapper keeps torchvision's names.
"""

from ..models.salience_detr_convnext_l import model
from .salience_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

# The official run started from torchvision's ConvNeXt-L ImageNet-1k weights (convnext_large-ea097f82.pth).
# Convert them once to this model's keys, then train:
#   python -c "from salience_detr.checkpoint.backbone_layouts import save_pretrained_trunk as s; \
#       s('convnext', 'convnext_large-ea097f82.pth', 'pretrained/convnext_l_in1k.pth')"
train.init_checkpoint = "pretrained/convnext_l_in1k.pth"
train.output_dir = "./output/salience_detr_convnext_l_4scale_12ep"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
