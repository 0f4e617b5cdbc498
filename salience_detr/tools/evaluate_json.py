"""COCO evaluation of an existing detection results file against a registered dataset, without the model.

    python -m salience_detr.tools.evaluate_json --dataset synthetic_val \
        --json output/salience_detr_tiny_synthetic/inference/coco_instances_results.json
    python -m salience_detr.tools.evaluate_json --dataset my_val --coco-json val.json --image-root val/ --json res.json

The results file is what detectron2's COCOEvaluator writes (``coco_instances_results.json``: dataset category
ids, XYWH boxes). Like detectron2's COCOEvaluator, every image of the dataset counts (an image without
results has all its objects missed); ``--only-result-images`` scores only the images that have results, which
is what a run evaluated on a subset (``dataloader.test.dataset.max_images``) needs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
from pathlib import Path

from detectron2.data import MetadataCatalog
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

import salience_detr  # noqa: F401  (registers the built-in datasets)
from salience_detr.data import resolve_dataset
from salience_detr.data.results_check import check_results_match
from salience_detr.evaluation import write_evaluation_plots
from salience_detr.tools._cli import add_dataset_arguments, load_results

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def evaluate_results(
    json_file: str,
    results: list[dict],
    only_result_images: bool = False,
    plots_dir: str | None = None,
    plot_score_threshold: float = 0.5,
) -> dict[str, float]:
    """Box AP metrics (percent; NaN where a size range has no object) and per-category AP; with ``plots_dir``,
    precision-recall curves and the confusion matrix of the same evaluation are written there."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(json_file)
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(
            f"{len(unknown)} image ids of the results are not in {json_file!r}, e.g. {sorted(unknown)[:5]}"
        )
    if not results:
        if plots_dir:
            logging.getLogger(__name__).warning("The results file is empty: nothing to plot in %s.", plots_dir)
        return {name: 0.0 for name in METRIC_NAMES}
    image_ids = sorted({r["image_id"] for r in results}) if only_result_images else sorted(coco_gt.getImgIds())
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    evaluator.params.imgIds = image_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    if plots_dir:
        write_evaluation_plots(evaluator, plots_dir, score_threshold=plot_score_threshold)
    metrics = {name: float(v * 100 if v >= 0 else "nan") for name, v in zip(METRIC_NAMES, evaluator.stats)}
    precision = evaluator.eval["precision"]  # iou, recall, class, area, max dets
    for index, category_id in enumerate(evaluator.params.catIds):
        per_class = precision[:, :, index, 0, -1]
        per_class = per_class[per_class > -1]
        name = coco_gt.cats[category_id]["name"]
        metrics[f"AP-{name}"] = float(per_class.mean() * 100) if per_class.size else float("nan")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser, "synthetic_val, coco_2017_val")
    parser.add_argument("--json", required=True, help="COCO results file (coco_instances_results.json)")
    parser.add_argument(
        "--only-result-images", action="store_true", help="score only the images that appear in the results"
    )
    parser.add_argument("--output", help="write the metrics to this JSON file")
    parser.add_argument(
        "--plots", metavar="DIR", help="write precision-recall curves and a confusion matrix (IoU 0.5) to DIR"
    )
    parser.add_argument(
        "--plot-score-threshold", type=float, default=0.5, help="minimum score of a detection in the confusion matrix"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    results = load_results(args.json)
    records = resolve_dataset(args.dataset, args.coco_json, args.image_root)  # also generates a built-in dataset
    check_results_match(results, args.dataset, f"Results file {args.json!r}", records)
    json_file = MetadataCatalog.get(args.dataset).json_file
    metrics = evaluate_results(json_file, results, args.only_result_images, args.plots, args.plot_score_threshold)
    print(tabulate([[f"{metrics[n]:.3f}" for n in METRIC_NAMES]], headers=METRIC_NAMES, tablefmt="pipe"))
    per_class = [(k[3:], f"{v:.3f}") for k, v in metrics.items() if k.startswith("AP-")]
    print(tabulate(per_class, headers=["category", "AP"], tablefmt="pipe"))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
