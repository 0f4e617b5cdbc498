"""Salience DETR Swin-L (IN-22k, window 7) 4-scale, 12 epochs (1x) on COCO 2017: the official recipe.

Recipe: docs/model.md#training-recipe.

The optimizer is the R50 one: the official recipe uses the same parameter groups for every backbone (backbone
lr x 0.1, no weight decay on names containing "norm" or "bias", which includes the relative position bias tables),
and this wrapper keeps torchvision's names.
"""

from ..models.salience_detr_swin_l import model
from .salience_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

# The official run started from the ImageNet-22k Swin-L weights in torchvision layout
# (swin_large_patch4_window7_224_22k.pth of xiuqhou/pretrained_weights). Convert them once, then train:
#   python -c "from salience_detr.checkpoint.backbone_layouts import save_pretrained_trunk as s; \
#       s('swin', 'swin_large_patch4_window7_224_22k.pth', 'pretrained/swin_l_in22k.pth')"
train.init_checkpoint = "pretrained/swin_l_in22k.pth"
train.output_dir = "./output/salience_detr_swin_l_4scale_12ep"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
