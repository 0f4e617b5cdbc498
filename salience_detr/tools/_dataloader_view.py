"""``visualize_data --source dataloader``: images of a config's train dataloader as the model receives them.

The images come out of the config's own mapper (its augmentations, its image format) and dataloader, and the
boxes drawn are the ``gt_boxes`` that survived the augmentation, so a wrong preset or size shows at a glance.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from detectron2.config import instantiate
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from tqdm import tqdm

from salience_detr.config.loading import load_config

SOURCES = ("annotation", "dataloader")
DEFAULT_NUM_IMAGES = 16  # the train dataloader never ends, so the dataloader source always draws a fixed number


def add_dataloader_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> str:
    """Add --source (and, for the dataloader source, --config-file and --opts); returns the chosen source."""
    help_text = (
        "annotation: the dataset's images and boxes as stored; dataloader: the config's train dataloader after "
        "augmentation (needs --config-file)"
    )
    parser.add_argument("--source", choices=SOURCES, default="annotation", help=help_text)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--source", choices=SOURCES, default="annotation")
    source = early.parse_known_args(argv)[0].source
    if source == "dataloader":
        parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig whose train data to draw")
        parser.add_argument(
            "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, e.g. dataloader.train.num_workers=0"
        )
    return source


def draw_model_input(
    per_image: dict[str, Any], metadata: Metadata, image_format: str, scale: float = 1.0
) -> np.ndarray:
    """RGB ``uint8`` picture of one mapped dataset dict (CHW ``image`` in ``image_format``, ``instances``)."""
    image = convert_image_to_rgb(per_image["image"].permute(1, 2, 0).numpy(), image_format)
    visualizer = Visualizer(np.ascontiguousarray(image), metadata=metadata, scale=scale)
    instances = per_image.get("instances")
    if instances is None or len(instances) == 0:
        return visualizer.output.get_image()
    names = metadata.get("thing_classes", None)
    labels = [names[c] if names else str(c) for c in instances.gt_classes.tolist()]
    return visualizer.overlay_instances(boxes=instances.gt_boxes, labels=labels).get_image()


def _train_metadata(cfg: Any) -> Metadata:
    names = cfg.dataloader.train.dataset.get("names")
    if not names:
        return MetadataCatalog.get("__unused")
    return MetadataCatalog.get(names if isinstance(names, str) else names[0])


def draw_dataloader(
    config_file: str, overrides: Sequence[str], output_dir: str, num_images: int | None, scale: float = 1.0
) -> list[str]:
    """Draw the first ``num_images`` images of the config's train dataloader into ``output_dir``; their paths."""
    count = DEFAULT_NUM_IMAGES if num_images is None else num_images
    if count < 1:
        raise ValueError(f"--num-images must be a positive number, got {count}")
    cfg = load_config(config_file, overrides)
    image_format = cfg.dataloader.train.mapper.get("image_format", "RGB")
    metadata = _train_metadata(cfg)
    loader = instantiate(cfg.dataloader.train)
    os.makedirs(output_dir, exist_ok=True)
    written: list[str] = []
    with tqdm(total=count, desc="Drawing the train dataloader", unit="image") as progress:
        for batch in loader:
            for per_image in batch[: count - len(written)]:
                stem = os.path.splitext(os.path.basename(per_image["file_name"]))[0]
                path = os.path.join(output_dir, f"{len(written):04d}_{stem}.png")
                Image.fromarray(draw_model_input(per_image, metadata, image_format, scale)).save(path)
                written.append(path)
                progress.update()
            if len(written) == count:
                break
    print(f"Wrote {len(written)} augmented training images to {output_dir}")
    return written
