import torch
from detectron2.config import LazyCall as L

from salience_detr.engine import detr_param_groups

# AdamW of docs/model.md#optimizer. train_net.py sets optimizer.params.model to the model before instantiation.
# Backbone and sampling_offsets parameters get lr x 0.1; names containing "norm" or "bias" get no weight decay.
AdamW = L(torch.optim.AdamW)(
    params=L(detr_param_groups)(base_lr="${..lr}", weight_decay="${..weight_decay}", low_lr_factor=0.1),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
    # one fused kernel per group instead of several calls per parameter, and no host read of the step counters (the
    # foreach update reads each twice); equal to the per-parameter loop to float rounding (tests/test_optim_fused.py)
    fused=True,
)
