"""Convert an official Salience-DETR checkpoint into one that ``DetectionCheckpointer`` loads into this project's model.

    python -m salience_detr.tools.convert_official IN.pth OUT.pth [--config-file configs/models/salience_detr_r50.py]

The model of the config is built on the CPU to learn its entries and shapes; the converted state dict must fill
it exactly (strict load) before anything is written. See ``salience_detr.checkpoint.official`` for the mapping.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detectron2.config import instantiate

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.checkpoint.official import (
    BACKBONE_RULES,
    CLASS_ROW_KEYS,
    DROPPED_KEYS,
    ConversionError,
    backbone_family,
    convert_into_model,
    load_official_checkpoint,
    save_model_checkpoint,
)
from salience_detr.config import get_config_file, load_config

DEFAULT_CONFIG = "models/salience_detr_r50.py"  # packaged config (salience_detr.config.get_config_file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="official checkpoint (.pth): a state dict, or one under model/state_dict/ema")
    parser.add_argument("output", help="where to write {'model': state_dict} for DetectionCheckpointer")
    parser.add_argument(
        "--config-file",
        default=None,
        help=f"LazyConfig whose `model` the checkpoint must fill (default: the packaged configs/{DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--backbone-family",
        choices=sorted(BACKBONE_RULES),
        help="backbone key layout of the checkpoint (default: from the config's backbone)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="load files holding non-tensor objects (trusted files only)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.config_file = args.config_file or get_config_file(DEFAULT_CONFIG)
    if not Path(args.config_file).is_file():
        print(f"error: config file {args.config_file} not found; pass --config-file", file=sys.stderr)
        return 2
    model = instantiate(load_config(args.config_file, inference=True, checkpoint="").model)
    family = args.backbone_family or backbone_family(model.backbone)
    try:
        official, wrapper = load_official_checkpoint(args.input, allow_pickle=args.allow_pickle)
        converted = convert_into_model(model, official, family=family)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    save_model_checkpoint(converted, args.output)
    source = f"the '{wrapper}' entry of {args.input}" if wrapper else f"{args.input} (a plain state dict)"
    resized = sorted(
        key for key in converted if CLASS_ROW_KEYS.fullmatch(key) and converted[key].shape != official[key].shape
    )
    dropped = sorted(DROPPED_KEYS & set(official))
    print(f"read {len(official)} tensors from {source}; backbone layout: {family}")
    if resized:
        print(f"class rows picked by category id in {len(resized)} entries: {', '.join(resized)}")
    if dropped:
        print(f"dropped: {', '.join(dropped)}")
    print(f"wrote {len(converted)} entries to {args.output}; they fill {args.config_file}'s model exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
