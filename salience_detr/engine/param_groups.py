"""Optimizer parameter groups by parameter name (docs/model.md#optimizer).

Backbone parameters and the deformable attention's ``sampling_offsets`` train at a lower learning rate,
and parameters whose name contains ``norm`` or ``bias`` get no weight decay. Matching on names (substrings)
rather than module types is what the official recipe does, so the groups match it parameter for parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def detr_param_groups(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    low_lr_factor: float = 0.1,
    low_lr_keywords: Sequence[str] = ("backbone", "sampling_offsets", "reference_points"),
    no_decay_keywords: Sequence[str] = ("norm", "bias"),
) -> list[dict[str, Any]]:
    """Group the trainable parameters of ``model`` into at most four (lr, weight decay) groups.

    Tied parameters are listed once. Empty groups are left out (torch optimizers accept that, but they
    clutter the logs).
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        lr = base_lr * low_lr_factor if any(k in name for k in low_lr_keywords) else base_lr
        decay = 0.0 if any(k in name for k in no_decay_keywords) else weight_decay
        groups.setdefault((lr, decay), []).append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters to optimize.")
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]
