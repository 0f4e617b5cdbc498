"""Train only some modules of a model (``train.trainable``), the rest exactly as loaded.

The use: add the RoI refinement head to a trained or official checkpoint by training the head alone. Its inputs are
detached, so this is what joint training does to the head, on a base that no longer moves. Frozen modules lose their
gradients and also run in eval mode, so BatchNorm statistics and dropout stay as loaded while the model trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

logger = logging.getLogger(__name__)


def freeze_all_but(model: nn.Module, trainable: Sequence[str]) -> list[nn.Module]:
    """Stop the gradients of every parameter outside the ``trainable`` module paths (e.g. ``["roi_refine"]``).

    Returns the largest modules that hold nothing trainable: the trainer keeps them in eval mode.
    """
    modules = dict(model.named_modules())
    for path in trainable:
        if path not in modules or not any(True for _ in modules[path].parameters()):
            known = sorted(name for name, _ in model.named_children())
            raise ValueError(
                f"train.trainable names {path!r}, which is not a module with parameters of the model; "
                f"give module paths such as {known[:6]} (or a dotted path below one)."
            )
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(f"{path}.") for path in trainable))

    frozen = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in trainable:
                continue
            if any(t.startswith(f"{path}.") for t in trainable):
                visit(f"{path}.", child)
            else:
                frozen.append(child)

    visit("", model)
    return frozen


def freeze_for_config(model: nn.Module, trainable: Sequence[str] | None) -> list[nn.Module]:
    """``freeze_all_but`` for ``train.trainable`` (None or empty: everything trains), with one log line of the count."""
    if not trainable:
        return []
    frozen = freeze_all_but(model, list(trainable))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Training only %s: %d of %d parameters", list(trainable), trained, total)
    return frozen
