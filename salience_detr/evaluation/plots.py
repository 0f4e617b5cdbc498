"""Pictures and tables of one COCOeval run: per-class precision-recall curves and the confusion matrix.

Drawn with matplotlib's object-oriented API (no pyplot), so nothing needs a display or touches global state.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from salience_detr.utils.atomic import atomic_write

from .confusion import BACKGROUND, confusion_from_coco

PR_IOUS = (0.5, 0.75)  # the curves drawn per class; COCO's AP averages ten IoUs from 0.5 to 0.95
MAX_ANNOTATED_CLASSES = 30  # above this the confusion matrix cells are too small for their counts


def precision_recall_curves(evaluator: Any, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """(recall points (R,), precision (K, R)) at ``iou``, all areas, the most detections; NaN for a class
    without objects. Read from ``evaluator.eval['precision']`` (IoU, recall, class, area, max detections)."""
    iou_index = int(np.argmin(np.abs(evaluator.params.iouThrs - iou)))
    if not math.isclose(evaluator.params.iouThrs[iou_index], iou):
        raise ValueError(f"IoU {iou} is not one of the evaluation's thresholds {evaluator.params.iouThrs.tolist()}")
    precision = evaluator.eval["precision"][iou_index, :, :, 0, -1].T.astype(np.float64)
    return np.asarray(evaluator.params.recThrs), np.where(precision < 0, np.nan, precision)


def _save(figure: Figure, path: str) -> None:
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def plot_precision_recall(evaluator: Any, names: Sequence[str], path: str) -> None:
    """One panel per class with its precision-recall curves (PR_IOUS) and their APs in the legend."""
    curves = {iou: precision_recall_curves(evaluator, iou) for iou in PR_IOUS}
    columns = math.ceil(math.sqrt(len(names)))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(3 * columns, 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for k, (name, ax) in enumerate(zip(names, axes)):
        for iou, (recall, precision) in curves.items():
            ap = np.nanmean(precision[k]) * 100 if not np.isnan(precision[k]).all() else float("nan")
            ax.plot(recall, precision[k], label=f"IoU {iou:g}: AP {ap:.1f}")
        ax.set(title=name, xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.legend(loc="lower left", fontsize="small")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    _save(figure, path)


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: str, title: str) -> None:
    """Colours are row fractions (where each class's objects went), numbers are counts."""
    totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    side = max(4.0, 0.45 * len(labels) + 2)
    figure = Figure(figsize=(side + 1, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, label="fraction of the row")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=90)
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="ground truth", title=title)
    if len(labels) <= MAX_ANNOTATED_CLASSES + 1:
        for (row, column), count in np.ndenumerate(matrix):
            colour = "white" if fractions[row, column] > 0.5 else "black"
            ax.text(column, row, str(count), ha="center", va="center", color=colour, fontsize="small")
    _save(figure, path)


def _confusion_csv(matrix: np.ndarray, labels: Sequence[str]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["ground truth \\ predicted", *labels])
    for label, row in zip(labels, matrix.tolist()):
        writer.writerow([label, *row])
    return text.getvalue().encode()


def write_evaluation_plots(
    evaluator: Any, output_dir: str, iou_threshold: float = 0.5, score_threshold: float = 0.5
) -> dict[str, str]:
    """precision_recall.png, confusion_matrix.png/.csv/.json of an evaluated and accumulated COCOeval."""
    if "precision" not in getattr(evaluator, "eval", {}):
        raise ValueError("the COCOeval has not been accumulated; call evaluate() and accumulate() first")
    names = [evaluator.cocoGt.cats[c]["name"] for c in evaluator.params.catIds]
    labels = [*names, BACKGROUND]
    matrix = confusion_from_coco(evaluator, iou_threshold, score_threshold)
    paths = {
        name: os.path.join(output_dir, name)
        for name in ("precision_recall.png", "confusion_matrix.png", "confusion_matrix.csv", "confusion_matrix.json")
    }
    plot_precision_recall(evaluator, names, paths["precision_recall.png"])
    title = f"IoU >= {iou_threshold:g}, score >= {score_threshold:g}"
    plot_confusion(matrix, labels, paths["confusion_matrix.png"], title)
    atomic_write(paths["confusion_matrix.csv"], lambda file: file.write(_confusion_csv(matrix, labels)))
    record = {
        "labels": labels,
        "rows": "ground truth",
        "columns": "predicted",
        "iou_threshold": iou_threshold,
        "score_threshold": score_threshold,
        "matrix": matrix.tolist(),
    }
    atomic_write(paths["confusion_matrix.json"], lambda file: file.write(json.dumps(record, indent=2).encode()))
    return paths
