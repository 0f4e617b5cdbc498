"""Exponential moving average of the model weights (optional; the official recipe does not use it).

The average lives in a separate copy of the model, so evaluating "with EMA" is evaluating that copy, and
its state is a checkpointable so a resumed run continues the same average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class ModelEMA:
    """EMA of parameters and floating buffers, with the usual warm-up ``min(decay, (1+n)/(10+n))``.

    The warm-up keeps the average from being dominated by the random initial weights in short runs.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(unwrap_model(model)).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        current = unwrap_model(model).state_dict()
        for name, averaged in self.model.state_dict().items():
            if averaged.dtype.is_floating_point:
                averaged.mul_(decay).add_(current[name].detach().to(averaged.dtype), alpha=1 - decay)
            else:
                averaged.copy_(current[name])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


class EMAHook(HookBase):
    """Update the EMA after every optimizer step."""

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema

    def after_step(self) -> None:
        self.ema.update(self.trainer.model)
