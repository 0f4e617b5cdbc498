"""Hands the trainer's iteration to the model, for the parts of a loss that follow the schedule (RoI warm-up).

The model does not reach out for the trainer's state (an event storage lookup inside ``forward``): this hook sets
``model.iteration`` before every step, and the model passes it on as an argument. Models without an ``iteration``
attribute (a user's own meta-architecture, the tests' stand-ins) do not read the schedule and are left alone.
"""

from __future__ import annotations

import torch
from detectron2.engine import HookBase

from .ema import unwrap_model


class ModelIterationHook(HookBase):
    """Before each step, ``model.iteration = trainer.iter`` on the unwrapped (non-DDP) model, if it has one."""

    def __init__(self, model: torch.nn.Module):
        unwrapped = unwrap_model(model)
        self.model = unwrapped if hasattr(unwrapped, "iteration") else None

    def before_step(self) -> None:
        if self.model is not None:
            self.model.iteration = self.trainer.iter

    def after_train(self) -> None:
        if self.model is not None:
            self.model.iteration = None
