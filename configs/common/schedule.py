import math

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

# COCO 2017 train has 117 266 images with annotations; the recipe counts epochs at a total batch of 16.
COCO_TRAIN_IMAGES = 117266
TOTAL_BATCH_SIZE = 16
ITERS_PER_EPOCH = math.ceil(COCO_TRAIN_IMAGES / TOTAL_BATCH_SIZE)


def multistep_with_warmup(total_iters, drop_iters, warmup_iters=1000, warmup_factor=0.001):
    """LR multiplier: linear warm-up from `warmup_factor`, then x0.1 at each of `drop_iters`."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[0.1**i for i in range(len(drop_iters) + 1)],
            milestones=list(drop_iters),
            num_updates=total_iters,
        ),
        warmup_length=min(warmup_iters, total_iters - 1) / total_iters,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


# 12 epochs (1x): the LR drops after epoch 10, i.e. for the 11th and 12th epochs (official MultiStepLR([10])).
ITERS_12EP = 12 * ITERS_PER_EPOCH
lr_multiplier_12ep = multistep_with_warmup(ITERS_12EP, [10 * ITERS_PER_EPOCH])

# 24 epochs (2x): drop after epoch 20 (DINO-style; the official repo does not publish its 2x milestone).
ITERS_24EP = 24 * ITERS_PER_EPOCH
lr_multiplier_24ep = multistep_with_warmup(ITERS_24EP, [20 * ITERS_PER_EPOCH])
