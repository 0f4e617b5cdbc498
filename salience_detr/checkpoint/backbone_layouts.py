"""How the official checkpoints' ``backbone.*`` entries map onto this project's large-backbone wrappers.

One pure function per family takes an official ``(key, tensor)`` and returns this project's ``(key, tensor)``,
both with the ``backbone.`` prefix (the meta-architecture's attribute). A key a rule does not recognise raises,
so a converter never drops weights silently. Key lists: ``official_{convnext_l,swin_l,focalnet_l}_backbone_keys.tsv``.

- ConvNeXt: the official trunk is torchvision's ``features.*`` and so is ours: identity.
- Swin: the official backbone is ``Sequential(feature_extractor, post_process)``, so its keys carry ``backbone.0.``;
  ours are torchvision's ``features.*`` directly. ``relative_position_index`` is kept, not dropped: torchvision
  stores it as a persistent buffer, and the official value is the same deterministic index for window 7.
- FocalNet: Microsoft layout (official) to timm layout (ours): ``patch_embed`` -> ``stem``; stage ``i``'s
  downsampler -> stage ``i + 1``'s; ``gamma_k`` -> ``lsk.gamma``; post-norms ``normk`` -> ``normk_post``; the
  linear ``modulation.{f,proj}`` and ``mlp.fc{1,2}`` weights become 1x1 conv weights; the per-stage output norms
  ``backbone.1.norm{1,2,3}`` -> ``output_norms.res{3,4,5}``.

``pretrained_trunk_state_dict`` applies the same rules to the ImageNet classification weights the official runs
started from (torchvision ConvNeXt-L, torchvision-layout Swin-L 22k, Microsoft FocalNet-L fl4), so a training run
can begin from them through ``train.init_checkpoint``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = [
    "BACKBONE_LAYOUTS",
    "convert_backbone_state_dict",
    "convert_convnext_entry",
    "convert_focalnet_entry",
    "convert_swin_entry",
    "pretrained_trunk_state_dict",
    "save_pretrained_trunk",
]

LayoutRule = Callable[[str, Tensor], "tuple[str, Tensor]"]

_CONVNEXT_KEY = re.compile(r"backbone\.features\.\d+\.")
_SWIN_KEY = re.compile(r"backbone\.0\.(features\.\d+\..+)")
_FOCALNET_STEM = re.compile(r"backbone\.0\.patch_embed\.(proj|norm)\.(weight|bias)")
_FOCALNET_DOWNSAMPLE = re.compile(r"backbone\.0\.layers\.(\d+)\.downsample\.(.+)")
_FOCALNET_BLOCK = re.compile(
    r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\."
    r"(gamma_[12]|norm[12]\.(?:weight|bias)|mlp\.fc[12]\.(?:weight|bias)"
    r"|modulation\.(?:f|h|proj)\.(?:weight|bias)|modulation\.focal_layers\.\d+\.0\.weight)"
)
_FOCALNET_OUTPUT_NORM = re.compile(r"backbone\.1\.norm(\d)\.(weight|bias)")
_FOCALNET_LINEAR_TO_CONV = re.compile(r"(modulation\.(f|proj)|mlp\.fc[12])\.weight")


def _unknown(family: str, key: str) -> ValueError:
    return ValueError(
        f"official {family} checkpoint key {key!r} matches no rule in salience_detr.checkpoint.backbone_layouts; "
        f"is the checkpoint from a different backbone family than the config's?"
    )


def convert_convnext_entry(key: str, value: Tensor) -> tuple[str, Tensor]:
    """Official ConvNeXt-L key -> ``ConvNeXtBackbone`` key: both are torchvision's ``features.*``."""
    if not _CONVNEXT_KEY.match(key):
        raise _unknown("ConvNeXt", key)
    return key, value


def convert_swin_entry(key: str, value: Tensor) -> tuple[str, Tensor]:
    """Official Swin-L key -> ``SwinBackbone`` key: drop the feature-extractor index ``0.``."""
    match = _SWIN_KEY.fullmatch(key)
    if match is None:
        raise _unknown("Swin", key)
    return f"backbone.{match.group(1)}", value


def _focalnet_block_key(stage: str, block: str, rest: str) -> str:
    rest = re.sub(r"^gamma_(\d)$", r"ls\1.gamma", rest)
    rest = re.sub(r"^norm(\d)\.", r"norm\1_post.", rest)  # official FocalNet-L blocks are post-norm
    return f"backbone.layers.{stage}.blocks.{block}.{rest}"


def convert_focalnet_entry(key: str, value: Tensor) -> tuple[str, Tensor]:
    """Official FocalNet-L key (Microsoft layout) -> ``FocalNetBackbone`` key (timm layout), reshaping linears."""
    if match := _FOCALNET_STEM.fullmatch(key):
        return f"backbone.stem.{match.group(1)}.{match.group(2)}", value
    if match := _FOCALNET_DOWNSAMPLE.fullmatch(key):
        return f"backbone.layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}", value
    if match := _FOCALNET_OUTPUT_NORM.fullmatch(key):
        return f"backbone.output_norms.res{int(match.group(1)) + 2}.{match.group(2)}", value
    if match := _FOCALNET_BLOCK.fullmatch(key):
        new_key = _focalnet_block_key(*match.groups())
        if _FOCALNET_LINEAR_TO_CONV.search(match.group(3)) and value.dim() == 2:
            value = value[:, :, None, None]
        return new_key, value
    raise _unknown("FocalNet", key)


#: Family name (as configs and the converter spell it) -> rule for one official ``backbone.*`` entry.
BACKBONE_LAYOUTS: dict[str, LayoutRule] = {
    "convnext": convert_convnext_entry,
    "swin": convert_swin_entry,
    "focalnet": convert_focalnet_entry,
}


def convert_backbone_state_dict(family: str, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Apply ``family``'s rule to every ``backbone.*`` entry of an official state dict; other entries are ignored."""
    if family not in BACKBONE_LAYOUTS:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {sorted(BACKBONE_LAYOUTS)}")
    rule = BACKBONE_LAYOUTS[family]
    converted = dict(rule(key, value) for key, value in state_dict.items() if key.startswith("backbone."))
    if len(converted) != sum(key.startswith("backbone.") for key in state_dict):
        raise ValueError(f"two official {family} keys map to the same project key; the layout rules are wrong")
    return converted


#: Where each family's official detector keeps the classification trunk, and the classifier parts to leave out.
_TRUNK_PREFIX = {"convnext": "backbone.", "swin": "backbone.0.", "focalnet": "backbone.0."}
_CLASSIFIER_ONLY = re.compile(r"(classifier|head|norm)\.")


def pretrained_trunk_state_dict(family: str, classification: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ImageNet classification weights -> this project's ``backbone.*`` entries (classifier and final norm left out).

    The FocalNet output norms have no classification counterpart and keep their initialisation, as officially.
    """
    if family not in _TRUNK_PREFIX:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {sorted(_TRUNK_PREFIX)}")
    trunk = {_TRUNK_PREFIX[family] + k: v for k, v in classification.items() if not _CLASSIFIER_ONLY.match(k)}
    return convert_backbone_state_dict(family, trunk)


def save_pretrained_trunk(family: str, source: str, destination: str) -> None:
    """Convert a classification checkpoint file into ``{"model": backbone entries}`` for ``train.init_checkpoint``."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint)
    torch.save({"model": pretrained_trunk_state_dict(family, state_dict)}, destination)
