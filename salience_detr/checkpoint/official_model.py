"""The official R50 Salience DETR and ours holding the same seeded random weights (parity and speed tools).

The official model is built from a clone's own ``configs/salience_detr/salience_detr_resnet50_800_1333.py``
(imported from the clone; its ImageNet download is skipped since every weight is replaced), ours from the packaged
``salience_detr/salience_detr_r50_4scale_12ep.py``. One seeded random state dict in the official layout
(``checkpoint.synthetic``) is loaded strictly into the official model and, through the converter, into ours. Both
take normalized images: the official ``eval_transform`` is off here, and callers set our pixel mean and std to 0 and
1 (``parity.our_stages`` does it for one call).
"""

from __future__ import annotations

import contextlib
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from detectron2.config import instantiate
from torch import Tensor, nn

from salience_detr.config import get_config

from .official import convert_into_model
from .synthetic import CONSTANT_BUFFERS, OFFICIAL_R50_KEYS, random_official_state_dict, read_official_keys

__all__ = ["OFFICIAL_CONFIG", "OUR_CONFIG", "build_official_model", "official_and_ours", "recorded_query_index"]

OUR_CONFIG = "salience_detr/salience_detr_r50_4scale_12ep.py"  # packaged config (salience_detr.config.get_config)
OFFICIAL_CONFIG = Path("configs") / "salience_detr" / "salience_detr_resnet50_800_1333.py"


def build_official_model(root: Path) -> nn.Module:
    """Import the official R50 config from a clone; raises SystemExit naming what is missing."""
    config = root / OFFICIAL_CONFIG
    transformer = root / "models" / "bricks" / "salience_transformer.py"
    if not config.is_file() or not transformer.is_file():
        raise SystemExit(
            f"error: --official-root {root} is not a clone of github.com/xiuqhou/Salience-DETR "
            f"(expected {OFFICIAL_CONFIG} and models/bricks/salience_transformer.py in it)"
        )
    sys.path.insert(0, str(root))
    try:
        import models.backbones.resnet as official_resnet
    except ImportError as error:
        raise SystemExit(
            f"error: cannot import the official code from {root} ({error}); install its requirements.txt"
        ) from error
    official_resnet.load_checkpoint = lambda *args, **kwargs: None  # no ImageNet download: all weights replaced
    model = runpy.run_path(str(config))["model"]
    model.eval_transform = None  # the inputs are already normalized
    return model.eval()


def official_and_ours(
    root: Path, seed: int, keys: str | Path = OFFICIAL_R50_KEYS
) -> tuple[nn.Module, nn.Module, dict[str, Tensor]]:
    """Both models in eval mode holding the same random weights of ``seed``; returns them and the official state
    dict (``keys``: the official R50 key list, by default the checkout's)."""
    official_model = build_official_model(Path(root))
    constants = {key: official_model.state_dict()[key] for key in CONSTANT_BUFFERS}
    official_weights = random_official_state_dict(read_official_keys(keys), seed, constants)
    official_model.load_state_dict(official_weights, strict=True)
    ours = instantiate(get_config(OUR_CONFIG).model).eval()
    convert_into_model(ours, official_weights)
    return official_model, ours, official_weights


@contextlib.contextmanager
def recorded_query_index(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within the block, the official transformer's query choice (its NMS over the top-k proposals, B x Q) of the
    last forward is in the yielded dict's ``query_index``: ours can then be run on the same queries
    (``parity.forced_query_order``), so that a swap of two near-tied queries cannot pass for a difference."""
    transformer = model.transformer
    nms = transformer.nms_on_topk_index
    selections: dict[str, Tensor] = {}

    def recording_nms(*args: Any, **kwargs: Any) -> Tensor:
        selections["query_index"] = nms(*args, **kwargs)
        return selections["query_index"]

    transformer.nms_on_topk_index = recording_nms
    try:
        yield selections
    finally:
        del transformer.nms_on_topk_index
