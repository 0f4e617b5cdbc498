"""Hands the trainer's iteration to the model, for the parts of a loss that follow the schedule (RoI warm-up).

The model does not reach out for the trainer's state (an event storage lookup inside ``forward``): this hook sets
``model.iteration`` before every step, and the model passes it on as an argument.
"""

from __future__ import annotations

import torch
from detectron2.engine import HookBase

from .ema import unwrap_model


class ModelIterationHook(HookBase):
    """Before each step, ``model.iteration = trainer.iter`` on the unwrapped (non-DDP) model."""

    def __init__(self, model: torch.nn.Module):
        self.model = unwrap_model(model)
        if not hasattr(self.model, "iteration"):
            raise TypeError(
                f"{type(self.model).__name__} has no 'iteration' attribute to set; ModelIterationHook is for models "
                "that read the training iteration (SalienceDETR)."
            )

    def before_step(self) -> None:
        self.model.iteration = self.trainer.iter

    def after_train(self) -> None:
        self.model.iteration = None
