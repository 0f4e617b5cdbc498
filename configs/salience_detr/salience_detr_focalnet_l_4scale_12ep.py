"""Salience DETR FocalNet-L (LRF, focal level 4) 4-scale, 12 epochs (1x) on COCO 2017: the official recipe.

Recipe: docs/model.md#training-recipe.

The optimizer is the R50 one: the official recipe uses the same parameter groups for every backbone (backbone
lr x 0.1, no weight decay on names containing "norm" or "bias"); the timm names this wrapper uses fall into the
same groups as the official ones (post-norms ``normK_post``, layer scales ``lsK.gamma``, output norms).
"""

from ..models.salience_detr_focalnet_l import model
from .salience_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

# The official run started from Microsoft's FocalNet-L fl4 ImageNet-22k weights (focalnet_large_lrf_384_fl4.pth).
# Convert them once to this model's keys, then train:
#   python -c "from salience_detr.checkpoint.backbone_layouts import save_pretrained_trunk as s; \
#       s('focalnet', 'focalnet_large_lrf_384_fl4.pth', 'pretrained/focalnet_l_fl4_in22k.pth')"
train.init_checkpoint = "pretrained/focalnet_l_fl4_in22k.pth"
train.output_dir = "./output/salience_detr_focalnet_l_4scale_12ep"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
