"""Check the image files of a config's datasets before training: each exists, decodes, and has the json's size.

    python -m salience_detr.tools.check_dataset --config-file configs/salience_detr/salience_detr_tiny_synthetic.py
    python -m salience_detr.tools.check_dataset --config-file CFG --max-images 1000 \
        datasets.train.json_file=/data/x/train.json datasets.train.image_root=/data/x/train

Missing, corrupt, truncated and wrong-size files are counted with examples and the fix, and a wrong size caused by
EXIF orientation is named as such. Exit status 0 when every checked file is fine, 1 otherwise. ``train_net.py``
runs the same check (``train.check_images``, ``salience_detr.data.image_check.check_images_on_each_machine``) right
after loading the config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import salience_detr  # noqa: F401  (registers the built-in datasets)
from salience_detr.config.loading import config_dataset_names, load_config
from salience_detr.data.image_check import check_images
from salience_detr.tools.user_errors import exit_on_user_error

SPLITS = ("train", "test")


def datasets_of(cfg: Any, splits: Sequence[str] = SPLITS) -> list[str]:
    """The config's dataset names of ``splits``, each once, in order."""
    names: list[str] = []
    for split in splits:
        names += [name for name in config_dataset_names(cfg, split) if name not in names]
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig .py file")
    parser.add_argument("--max-images", type=int, help="check a seeded random sample of this many per dataset")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="dataloaders to check")
    parser.add_argument("--workers", type=int, help="decoding threads (default: the CPU count, at most 8)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        raise SystemExit(f"--max-images must be a positive number of images, got {args.max_images}; omit it for all")
    cfg = load_config(args.config_file, args.opts)
    names = datasets_of(cfg, args.splits)
    if not names:
        raise SystemExit(f"{args.config_file} names no dataset under dataloader.{{{','.join(args.splits)}}}")
    report = check_images(names, max_images=args.max_images, raise_on_problems=False, workers=args.workers)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    with exit_on_user_error("check_dataset"):
        sys.exit(main())
