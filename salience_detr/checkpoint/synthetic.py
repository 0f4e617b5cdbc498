"""Seeded random checkpoints in an official layout, for tests and the parity check (no download needed).

The official key lists (``tests/data/official_*_state_dict_keys.tsv``: key, shape, dtype, kind, numel) say what
a checkpoint holds; ``random_official_state_dict`` fills one from a seeded CPU ``torch.Generator`` with values per
kind of entry that keep every stage of the 56 M-parameter R50 model in a sensible range, so the same seed gives
the same tensors on any machine with the same torch.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .official import CLASS_ROW_KEYS, coco_category_ids

#: Where the checkout keeps the official R50 key list (relative to its root; tools run from there take it as default).
OFFICIAL_R50_KEYS = "tests/data/official_r50_state_dict_keys.tsv"
#: Buffers that hold configuration, not weights: the parity tool copies them from the official model.
CONSTANT_BUFFERS = (
    "position_embedding.dim_tx",
    "position_embedding.dim_ty",
    "transformer.level_filter_ratio",
    "transformer.layer_filter_ratio",
)
#: Bias of the class rows no COCO category uses: a trained head never scores them (they are never positives),
#: which keeps "max over classes" and the final top-k identical for 91 official rows and 80 converted ones.
UNUSED_CLASS_BIAS = -20.0
_BACKBONE_CONV = re.compile(r"backbone\..*conv\d\.weight|backbone\..*downsample\.0\.weight")
_BOX_DELTA = re.compile(r"transformer\.(decoder\.bbox_head\.\d+|encoder_bbox_head)\.layers\.2\.weight")
_STANDARD_NORMAL = re.compile(r"transformer\.(tgt_embed\.weight|level_embeds)|denoising_generator\..*")


@dataclass(frozen=True)
class OfficialEntry:
    """One row of the official key list: a state-dict entry and, for tied parameters, the key it shares."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tied_to: str | None


def read_official_keys(path: str | Path) -> list[OfficialEntry]:
    """Parse ``official_*_state_dict_keys.tsv`` (columns key, shape, dtype, kind, numel; kind ``param(tied:K)``)."""
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].split("\t")[:4] != ["key", "shape", "dtype", "kind"]:
        raise ValueError(f"{path} is not an official key list (expected the header 'key shape dtype kind numel')")
    entries = []
    for line in lines[1:]:
        if not line.strip():
            continue
        key, shape, dtype, kind, _ = line.split("\t")
        tied = kind[len("param(tied:") : -1] if kind.startswith("param(tied:") else None
        entries.append(OfficialEntry(key, tuple(ast.literal_eval(shape)), getattr(torch, dtype), tied))
    return entries


def _random_value(entry: OfficialEntry, generator: torch.Generator) -> Tensor:
    """A random tensor for one entry; the scale follows what the entry is, judged from its name and shape."""
    key, shape = entry.key, entry.shape

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    def normal(std: float) -> Tensor:
        return torch.randn(shape, generator=generator) * std

    if entry.dtype == torch.int64:  # BatchNorm's num_batches_tracked
        return torch.randint(0, 10_000, shape, generator=generator)
    if _STANDARD_NORMAL.fullmatch(key):
        return normal(1.0)
    if "background_embedding" in key:
        return uniform(0.0, 1.0)
    if key == "transformer.alpha":
        return uniform(-0.3, 0.3)
    if key.endswith("running_var"):
        return uniform(0.5, 2.0)
    if len(shape) == 1:  # norm scales; norm, linear and conv biases; running means
        return uniform(0.5, 1.5) if key.endswith(".weight") else normal(0.1)
    fan_in = math.prod(shape[1:])
    if _BACKBONE_CONV.fullmatch(key):  # He scaling for the ReLU trunk
        return normal(math.sqrt(2.0 / fan_in))
    if _BOX_DELTA.fullmatch(key):  # box heads refine their reference boxes, they do not replace them
        return normal(0.1 / math.sqrt(fan_in))
    return normal(1.0 / math.sqrt(fan_in))


def random_official_state_dict(
    entries: Sequence[OfficialEntry], seed: int, constants: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Seeded random weights with every key, shape and dtype of ``entries``; same seed, same tensors.

    ``constants`` gives the ``CONSTANT_BUFFERS`` values (copied, not drawn); without them those are random too,
    which only suits tests that never run the model. Tied entries share one tensor; the bias rows of class ids
    no COCO category uses are set to ``UNUSED_CLASS_BIAS``.
    """
    constants = constants or {}
    generator = torch.Generator().manual_seed(seed)
    unused_rows = sorted(set(range(91)) - set(coco_category_ids()))
    state_dict: dict[str, Tensor] = {}
    for entry in entries:
        if entry.key in constants:
            state_dict[entry.key] = constants[entry.key].clone()
        elif entry.tied_to is None:
            value = _random_value(entry, generator).to(entry.dtype)
            if CLASS_ROW_KEYS.fullmatch(entry.key) and entry.key.endswith(".bias") and entry.shape == (91,):
                value[unused_rows] = UNUSED_CLASS_BIAS
            state_dict[entry.key] = value
    for entry in entries:
        if entry.tied_to is not None:
            state_dict[entry.key] = state_dict[entry.tied_to]
    return state_dict
