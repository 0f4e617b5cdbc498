"""Draw the ground truth of a registered dataset with detectron2's Visualizer, one PNG per image.

    python -m salience_detr.tools.visualize_data --dataset synthetic_train --output vis/gt --num-images 20
    python -m salience_detr.tools.visualize_data --dataset my_val --coco-json val.json --image-root val/ --output vis
    python -m salience_detr.tools.visualize_data --source dataloader --output vis/train --num-images 20 \
        --config-file configs/salience_detr/salience_detr_tiny_synthetic.py

``--source dataloader`` draws what the model sees in training: the config's train dataloader, after its
mapper's augmentations, with the boxes that survived them.
"""

from __future__ import annotations

import argparse
import functools

from detectron2.data import MetadataCatalog

import salience_detr  # noqa: F401  (registers the built-in datasets)
from salience_detr.data import resolve_dataset
from salience_detr.tools._cli import add_dataset_arguments
from salience_detr.tools._dataloader_view import add_dataloader_arguments, draw_dataloader
from salience_detr.tools._drawing import draw_ground_truth, write_drawings
from salience_detr.tools.user_errors import exit_on_user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_dataloader_arguments(parser, argv) == "annotation":
        add_dataset_arguments(parser, "synthetic_train")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--num-images", type=int, default=None, help="draw only the first N images")
    parser.add_argument("--scale", type=float, default=1.0, help="drawing scale")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.source == "dataloader":
        return draw_dataloader(args.config_file, args.opts, args.output, args.num_images, args.scale)
    records = resolve_dataset(args.dataset, args.coco_json, args.image_root)[: args.num_images]
    metadata = MetadataCatalog.get(args.dataset)
    draw = functools.partial(draw_ground_truth, metadata=metadata, scale=args.scale)
    return write_drawings(records, draw, args.output, desc=f"Drawing {args.dataset}")


if __name__ == "__main__":
    with exit_on_user_error("visualize_data"):
        main()
