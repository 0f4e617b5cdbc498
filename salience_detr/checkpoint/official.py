"""Convert an official Salience-DETR checkpoint (xiuqhou/Salience-DETR) into this project's state dict.

The transformer, neck, position embedding and denoising names already mirror the official ones; what changes:

- the backbone: official keys follow torchvision's layout; a rename rule per backbone family (``BACKBONE_RULES``)
  maps them onto this project's backbone (ResNet: detectron2's ``stem`` / ``res{2..5}`` names, docs/model.md#backbone);
- the class rows: the official heads have 91 rows indexed by COCO category id; this project's heads have one
  row per contiguous detectron2 class, so the rows of the 80 COCO ids are picked in detectron2's order;
- ``_classes_`` (class names stored by the official trainer) is dropped.

Everything is checked against the target model's shapes: a key that cannot be placed, a shape that does not
fit, or a target entry left unfilled is refused with a message that names it.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling.backbone import ResNet
from torch import Tensor

from salience_detr.utils.atomic import atomic_write

from .backbone_layouts import BACKBONE_LAYOUTS

#: One official ``backbone.*`` entry -> this project's entry, both keys with the ``backbone.`` prefix.
BackboneRule = Callable[[str, Tensor], "tuple[str, Tensor]"]

CLASS_ROW_KEYS = re.compile(
    r"transformer\.decoder\.class_head\.\d+\.(weight|bias)"
    r"|transformer\.encoder_class_head\.(weight|bias)"
    r"|transformer\.encoder\.enhance_mcsp\.(weight|bias)"
    r"|denoising_generator\.label_encoder\.weight"
)
DROPPED_KEYS = frozenset({"_classes_"})
CHECKPOINT_WRAPPERS = ("model", "state_dict", "ema")

_RESNET_STEM = re.compile(r"backbone\.(conv1|bn1)\.(.+)")
_RESNET_BLOCK = re.compile(r"backbone\.layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)")


class ConversionError(ValueError):
    """The official checkpoint does not fit the target model; the message lists every offending key."""


def convert_resnet_entry(key: str, value: Tensor) -> tuple[str, Tensor]:
    """torchvision ResNet names -> detectron2 ResNet names (``layer1`` -> ``res2``, ``bnK`` -> ``convK.norm``)."""
    if match := _RESNET_STEM.fullmatch(key):
        module, rest = match.groups()
        return f"backbone.stem.conv1.{'norm.' if module == 'bn1' else ''}{rest}", value
    if match := _RESNET_BLOCK.fullmatch(key):
        layer, block, module, rest = match.groups()
        renamed = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(module)
        if renamed is None:
            renamed = f"conv{module[-1]}.norm" if module.startswith("bn") else module
        return f"backbone.res{int(layer) + 1}.{block}.{renamed}.{rest}", value
    raise ConversionError(
        f"official ResNet checkpoint key {key!r} matches no torchvision ResNet name (conv1, bn1, layerN.i.convK, "
        "layerN.i.bnK, layerN.i.downsample.{0,1}); is the checkpoint from a different backbone family?"
    )


#: Backbone family (as ``backbone_family`` names it) -> rename rule for one official ``backbone.*`` entry;
#: the large backbones' rules live in ``backbone_layouts``.
BACKBONE_RULES: dict[str, BackboneRule] = {"resnet": convert_resnet_entry, **BACKBONE_LAYOUTS}


def backbone_family(backbone: torch.nn.Module) -> str:
    """The ``BACKBONE_RULES`` family of a backbone module: detectron2 ``ResNet`` -> "resnet", else by class name."""
    if isinstance(backbone, ResNet):
        return "resnet"
    name = type(backbone).__name__.lower()
    for family in BACKBONE_RULES:
        if family in name:
            return family
    raise ConversionError(
        f"no checkpoint rename rule for backbone {type(backbone).__name__}; known families: {sorted(BACKBONE_RULES)}"
    )


def coco_category_ids() -> list[int]:
    """COCO category ids in detectron2's contiguous order (index = contiguous id), from its builtin metadata."""
    id_map = MetadataCatalog.get("coco_2017_train").thing_dataset_id_to_contiguous_id
    return [dataset_id for dataset_id, _ in sorted(id_map.items(), key=lambda item: item[1])]


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Tensor], str | None]:
    """Return ``(state_dict, wrapper)``: a plain state dict (wrapper None) or the one under a wrapper key.

    The wrapper keys are "model", "state_dict" and "ema"."""
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"expected a state dict or a dict holding one, got {type(checkpoint).__name__}")
    if checkpoint and all(isinstance(value, Tensor) for value in checkpoint.values()):
        return dict(checkpoint), None
    for wrapper in CHECKPOINT_WRAPPERS:
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return dict(inner), wrapper
    raise ConversionError(
        f"found no state dict in the checkpoint: top-level keys {sorted(map(str, checkpoint))[:10]}; expected a plain "
        f"state dict of tensors or one under {list(CHECKPOINT_WRAPPERS)}"
    )


def _pick_class_rows(key: str, value: Tensor, target_rows: int, class_ids: Sequence[int] | None) -> Tensor:
    if value.shape[0] == target_rows:
        return value
    if class_ids is None:
        if value.shape[0] != 91 or target_rows != 80:
            raise ConversionError(
                f"{key}: the checkpoint has {value.shape[0]} class rows and the model {target_rows}; only 91 -> 80 "
                "(COCO ids -> detectron2 COCO classes) is automatic, pass class_ids for other datasets"
            )
        class_ids = coco_category_ids()
    if len(class_ids) != target_rows or max(class_ids) >= value.shape[0]:
        raise ConversionError(
            f"{key}: class_ids has {len(class_ids)} entries (max {max(class_ids)}) but the model has {target_rows} "
            f"classes and the checkpoint {value.shape[0]} rows"
        )
    return value[torch.as_tensor(list(class_ids), dtype=torch.long)].clone()


def convert_official_state_dict(
    official: Mapping[str, Tensor],
    target_shapes: Mapping[str, Sequence[int]],
    family: str = "resnet",
    class_ids: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Official state dict -> this project's state dict for a model whose entries have ``target_shapes``.

    ``class_ids[c]`` is the official class row of this project's class ``c``; by default the COCO ids of
    detectron2's 80 classes when the checkpoint has 91 rows and the model 80. Raises ``ConversionError``
    listing every key that cannot be placed, does not fit, or is left missing.
    """
    if family not in BACKBONE_RULES:
        raise ConversionError(f"unknown backbone family {family!r}; known: {sorted(BACKBONE_RULES)}")
    rename_backbone = BACKBONE_RULES[family]
    converted: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, value in official.items():
        if key in DROPPED_KEYS:
            continue
        try:
            new_key, new_value = rename_backbone(key, value) if key.startswith("backbone.") else (key, value)
        except ValueError as error:
            problems.append(str(error))
            continue
        if new_key not in target_shapes:
            problems.append(f"{key!r} (-> {new_key!r}): no such entry in the target model")
            continue
        target_shape = tuple(target_shapes[new_key])
        if CLASS_ROW_KEYS.fullmatch(new_key) and new_value.dim() > 0:
            try:
                new_value = _pick_class_rows(new_key, new_value, target_shape[0], class_ids)
            except ConversionError as error:
                problems.append(str(error))
                continue
        if tuple(new_value.shape) != target_shape:
            problems.append(
                f"{key!r} (-> {new_key!r}): shape {tuple(new_value.shape)} does not fit the model's {target_shape}"
            )
            continue
        if new_key in converted:
            problems.append(f"{key!r}: a second official entry maps to {new_key!r}")
            continue
        converted[new_key] = new_value
    missing = sorted(set(target_shapes) - set(converted))
    if missing:
        problems.append(f"{len(missing)} model entries get no value from the checkpoint: {missing[:20]}")
    if problems:
        listed = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        raise ConversionError(f"cannot convert the official checkpoint ({len(problems)} problems):\n  {listed}{more}")
    return converted


def convert_into_model(
    model: torch.nn.Module,
    official: Mapping[str, Tensor],
    family: str | None = None,
    class_ids: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Convert ``official`` for ``model`` and load it strictly; returns the converted state dict.

    The target shapes come from the model itself and the backbone family from its backbone unless given, so the
    converter, the parity tool and its test all fill a model the same way; a strict load proves nothing is left out.
    """
    target_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    family = family or backbone_family(model.backbone)
    converted = convert_official_state_dict(official, target_shapes, family=family, class_ids=class_ids)
    model.load_state_dict(converted, strict=True)
    return converted


PICKLE_MAGIC = 0x80  # first byte of a pickle of protocol 2 or newer (torch.save's legacy format)


def check_checkpoint_format(path: str) -> None:
    """Raise :class:`ConversionError` unless ``path`` is a torch.save file: a zip archive or a pickle. Checked before
    torch.load, whose errors on other files (a text file, a partial download) are chained pickle messages."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path} does not exist; pass the path of the official checkpoint (.pth) to convert")
    with open(path, "rb") as f:
        first = f.read(1)
    if not zipfile.is_zipfile(path) and first != bytes([PICKLE_MAGIC]):
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle): it may be a partial "
            "download, an HTML error page or another format. Download the official .pth file again."
        )


def load_official_checkpoint(path: str, allow_pickle: bool = False) -> tuple[dict[str, Tensor], str | None]:
    """Read a checkpoint file on the CPU and unwrap its state dict (see ``unwrap_checkpoint``).

    Loads with ``weights_only=True`` unless ``allow_pickle``: only do that for files from a trusted source.
    """
    check_checkpoint_format(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        if allow_pickle:
            raise ConversionError(
                f"{path} cannot be unpickled even with --allow-pickle ({error}): the file is damaged or was not "
                "written by torch.save. Download the official .pth file again."
            ) from error
        raise ConversionError(
            f"{path} holds objects other than tensors, so it cannot be read in safe mode ({error}); if you trust the "
            "file, pass --allow-pickle"
        ) from error
    return unwrap_checkpoint(checkpoint)


def save_model_checkpoint(state_dict: Mapping[str, Tensor], path: str) -> None:
    """Write ``{"model": state_dict}`` (DetectionCheckpointer's layout) atomically."""
    atomic_write(path, lambda file: torch.save({"model": dict(state_dict)}, file))
