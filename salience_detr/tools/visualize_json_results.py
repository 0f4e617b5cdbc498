"""Draw the detections of a COCO results file next to the ground truth, one PNG per image.

    python -m salience_detr.tools.visualize_json_results \
        --input output/salience_detr_tiny_synthetic/inference/coco_instances_results.json \
        --dataset synthetic_val --output output/salience_detr_tiny_synthetic/vis --conf-threshold 0.5 --num-images 8

Left: predictions with a score of at least ``--conf-threshold``; right: ground truth.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.visualizer import Visualizer

import salience_detr  # noqa: F401  (registers the built-in datasets)
from salience_detr.data import resolve_dataset
from salience_detr.data.image_io import read_image
from salience_detr.data.results_check import check_results_match
from salience_detr.tools._cli import add_dataset_arguments, load_results
from salience_detr.tools._drawing import draw_ground_truth, write_drawings


def results_to_instances(results: list[dict], image_size: tuple[int, int], id_map: dict[int, int]) -> Instances:
    """Instances of one image from COCO results (dataset category ids mapped to contiguous ids)."""
    instances = Instances(image_size)
    boxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
    instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    instances.scores = np.array([r["score"] for r in results], dtype=np.float32)
    try:
        instances.pred_classes = np.array([id_map[r["category_id"]] for r in results], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"Results use category id {error.args[0]}, which the dataset does not have.") from None
    return instances


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="COCO results file (coco_instances_results.json)")
    add_dataset_arguments(parser, "synthetic_val")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--conf-threshold", type=float, default=0.5, help="draw detections at or above this score")
    parser.add_argument("--num-images", type=int, default=None, help="draw only the first N images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    results = load_results(args.input)
    records = resolve_dataset(args.dataset, args.coco_json, args.image_root)
    check_results_match(results, args.dataset, f"Results file {args.input!r}", records)
    records = records[: args.num_images]
    by_image = defaultdict(list)
    for result in results:
        if result["score"] >= args.conf_threshold:
            by_image[result["image_id"]].append(result)
    metadata = MetadataCatalog.get(args.dataset)
    id_map = metadata.get("thing_dataset_id_to_contiguous_id")

    def draw(record: dict) -> np.ndarray:
        image = read_image(record["file_name"], format="RGB")
        predictions = results_to_instances(by_image[record["image_id"]], image.shape[:2], id_map)
        drawn = Visualizer(image, metadata=metadata).draw_instance_predictions(predictions).get_image()
        return np.concatenate([drawn, draw_ground_truth(record, metadata)], axis=1)

    return write_drawings(records, draw, args.output, desc="Drawing detections")


if __name__ == "__main__":
    main()
