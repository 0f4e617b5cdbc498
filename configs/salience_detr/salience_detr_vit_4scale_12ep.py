"""Salience DETR ViT-B/16 + simple pyramid 4-scale, 12 epochs on COCO 2017; no official recipe or checkpoint.

The R50 recipe, except that the freshly initialised pyramid learns at the full rate (only the ViT itself gets
lr x 0.1) and, as usual for ViTs, the position embedding and class token get no weight decay.
"""

from ..models.salience_detr_vit import model
from .salience_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

optimizer.params.low_lr_keywords = ("backbone.vit.", "sampling_offsets", "reference_points")
optimizer.params.no_decay_keywords = ("norm", "bias", "pos_embed", "cls_token")

# Start from ImageNet ViT-B/16 weights in timm's layout, their keys prefixed with "backbone.vit." (classifier and
# final norm left out, this backbone has neither), e.g. on a machine with internet access:
#   python -c "import timm, torch; m = timm.create_model('vit_base_patch16_224.augreg_in21k', pretrained=True); \
#       torch.save({'model': {'backbone.vit.' + k: v for k, v in m.state_dict().items() \
#       if not k.startswith(('head', 'norm.'))}}, 'pretrained/vit_b16_in21k.pth')"
train.init_checkpoint = "pretrained/vit_b16_in21k.pth"
train.output_dir = "./output/salience_detr_vit_4scale_12ep"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
