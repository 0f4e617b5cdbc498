"""Small shared blocks of the DETR heads: the ReLU MLP and the initialisation of class and box heads.

The encoder's two-stage heads, the decoder's per-layer heads and the RoI head all build on these, so the
initialisation that the official checkpoints were trained from lives in one place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: Focal-loss prior probability of every class at initialisation (RetinaNet, DETR heads).
PRIOR_PROBABILITY = 0.01


class MLP(nn.Module):
    """Linear layers with ReLU in between (not after the last); weights live in ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}.")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """Runs on rows: a (..., C) input is flattened once, so each layer is one addmm without reshapes around it."""
        leading = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x.view(*leading, x.shape[-1])


def init_class_head(head: nn.Linear, prior_probability: float = PRIOR_PROBABILITY) -> None:
    """Focal-loss prior: every class starts at ``prior_probability`` (bias -log(99) for 0.01)."""
    if not 0.0 < prior_probability < 1.0:
        raise ValueError(f"prior_probability must lie in (0, 1), got {prior_probability}.")
    nn.init.constant_(head.bias, -math.log((1 - prior_probability) / prior_probability))


def init_box_head(head: MLP) -> None:
    """A zero last layer makes the first prediction equal to the reference box."""
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
