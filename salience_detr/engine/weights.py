"""Which checkpoint tensors go into a model: strict by default, with one explicit exception for fine-tuning.

A tensor whose shape differs from the model's is an error, never a silent skip, except the class-dependent
tensors (every decoder layer's class head, the encoder's proposal class head and the denoising label embedding)
when fine-tuning on other classes: those keep the model's own initialisation and are logged per group. A
checkpoint of which more than ``MAX_UNFIT_FRACTION`` of the tensors do not fit is another model altogether.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# group name -> module path in SalienceDETR; aliases of these modules (encoder.enhance_mcsp) are found by identity
CLASS_HEAD_MODULES = {
    "decoder class heads": "transformer.decoder.class_head",
    "encoder proposal class head": "transformer.encoder_class_head",
    "denoising label embedding": "denoising_generator.label_encoder",
}
# up to this fraction of a checkpoint's tensors may be unknown to the model (e.g. an ImageNet classifier's fc)
MAX_UNFIT_FRACTION = 0.1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built from the config (the message says which config would)."""


@dataclasses.dataclass
class LoadPlan:
    """The outcome of matching a checkpoint to a model: what loads, what is re-initialised, what is unknown."""

    state_dict: dict[str, torch.Tensor]
    reinitialised: dict[str, list[str]]
    unexpected: list[str]


def class_head_keys(model: nn.Module) -> dict[str, list[str]]:
    """State-dict keys of each class-dependent group of ``model`` (aliases included); absent groups are left out."""
    named = model.state_dict(keep_vars=True)
    groups = {}
    for group, path in CLASS_HEAD_MODULES.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        ids = {id(tensor) for tensor in module.state_dict(keep_vars=True).values()}
        groups[group] = [key for key, tensor in named.items() if id(tensor) in ids]
    return groups


def _classes_in(shapes: Mapping[str, tuple[int, ...]], keys: list[str]) -> int | None:
    """Number of classes of a group: the first dimension of its first tensor."""
    return next((shapes[key][0] for key in keys if key in shapes and shapes[key]), None)


def _mismatch_message(source: str, fit: int, total: int, unfit: list[str], hint: str) -> str:
    examples = ", ".join(unfit[:5])
    return (
        f"{source}: only {fit} of {total} tensors fit the model ({len(unfit)} do not, e.g. {examples}); more than "
        f"{MAX_UNFIT_FRACTION:.0%} not fitting means it is a checkpoint of another model. {hint}"
    )


def plan_loading(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_new_classes: bool,
    source: str = "checkpoint",
    config_hint: str = "",
) -> LoadPlan:
    """Match ``state_dict`` to ``model`` or raise :class:`CheckpointMismatchError` saying why and what to do.

    Missing keys are fine (a backbone-only initialisation); unknown keys up to ``MAX_UNFIT_FRACTION`` (for ``.pkl``
    files a tensor that detectron2's name matching placed but found of another shape stays unknown, with its warning).
    """
    model_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    ckpt_shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    heads = class_head_keys(model)
    head_keys = {key for keys in heads.values() for key in keys}
    unexpected = [key for key in ckpt_shapes if key not in model_shapes]
    wrong = [key for key in ckpt_shapes if key in model_shapes and ckpt_shapes[key] != model_shapes[key]]
    other_wrong = [key for key in wrong if key not in head_keys]
    unfit = other_wrong + unexpected
    total = len(ckpt_shapes)
    hint = config_hint or "Use the config the checkpoint was trained with."
    if total and len(unfit) / total > MAX_UNFIT_FRACTION:
        raise CheckpointMismatchError(_mismatch_message(source, total - len(unfit), total, unfit, hint))
    if other_wrong:
        shapes = "; ".join(
            f"{key}: {ckpt_shapes[key]} in the checkpoint, {model_shapes[key]} in the model" for key in other_wrong[:5]
        )
        raise CheckpointMismatchError(
            f"{source}: {len(other_wrong)} tensors have other shapes than the model's ({shapes}). Only the class "
            f"heads may differ (fine-tuning on other classes). {hint}"
        )
    head_wrong = [key for key in wrong if key in head_keys]
    if head_wrong and not allow_new_classes:
        ckpt_classes = _classes_in(ckpt_shapes, head_wrong)
        model_classes = _classes_in(model_shapes, head_wrong)
        raise CheckpointMismatchError(
            f"{source} has {ckpt_classes} classes but the config's model has model.num_classes={model_classes}. "
            f"Set model.num_classes={ckpt_classes} to use it as it is, or fine-tune it on the config's classes "
            f"by training with train.init_checkpoint={source} (the class heads are then re-initialised)."
        )
    reinitialised = {group: [key for key in keys if key in head_wrong] for group, keys in heads.items()}
    reinitialised = {group: keys for group, keys in reinitialised.items() if keys}
    kept = {key: tensor for key, tensor in state_dict.items() if key not in head_wrong}
    return LoadPlan(kept, reinitialised, unexpected)


def log_reinitialised(plan: LoadPlan, model: nn.Module, source: str) -> None:
    """One INFO line per re-initialised group, with the class counts that made it necessary."""
    for group, keys in plan.reinitialised.items():
        model_classes = model.state_dict()[keys[0]].shape[0]
        logger.info(
            "Re-initialised %s (%d tensors: %s): %s was trained on other classes, the config has %d",
            group,
            len(keys),
            ", ".join(keys),
            source,
            model_classes,
        )


def checkpoint_metadata(
    thing_classes: list[str], num_classes: int, dataset: str, model_name: str, config_file: str = ""
) -> dict[str, Any]:
    """What a checkpoint records about its classes, so inference needs no dataset to label detections.

    ``num_classes`` is the model's (it may exceed the dataset's category count, e.g. COCO's 91 ids)."""
    return {
        "thing_classes": list(thing_classes),
        "num_classes": int(num_classes),
        "dataset": dataset,
        "model": model_name,
        "config_file": config_file,
    }


def config_hint(metadata: Mapping[str, Any] | None) -> str:
    """A sentence naming the config a checkpoint was trained with, when its metadata says."""
    if metadata and metadata.get("config_file"):
        return f"It was trained with --config-file {metadata['config_file']}; use that config."
    return ""
