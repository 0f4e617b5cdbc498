"""Which class the detector predicted for each ground-truth object, at one IoU and one score threshold.

COCOeval matches detections to objects per category, so it cannot tell "a cat called a dog" from "a cat
missed plus a dog imagined". Here detections are matched to objects of any class: per image, detections in
descending score each take the unmatched object they overlap most (IoU >= the threshold). A matched pair
counts in (object class, predicted class); an unmatched object in (its class, background), a missed object;
an unmatched detection in (background, its class), a false positive. Crowd objects are left out, as the
training mapper leaves them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BACKGROUND = "background"


def box_iou_xywh(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every pair of COCO (x, y, width, height) boxes: (N, 4), (M, 4) -> (N, M)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    union = a[:, 2:].prod(axis=1)[:, None] + b[:, 2:].prod(axis=1)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def match_detections(
    gt_boxes: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """For each detection, the index of the object it matched, or -1 (greedy in descending score, any class)."""
    det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    matched = np.full(len(det_scores), -1, dtype=np.int64)
    if len(det_scores) == 0 or len(gt_boxes) == 0:
        return matched
    ious = box_iou_xywh(det_boxes, gt_boxes)
    taken = np.zeros(ious.shape[1], dtype=bool)
    for det in np.argsort(-det_scores, kind="stable"):
        candidates = np.where(taken, -1.0, ious[det])
        best = int(candidates.argmax())
        if candidates[best] >= iou_threshold:
            matched[det] = best
            taken[best] = True
    return matched


def _add_image(
    matrix: np.ndarray, gts: Sequence[dict], dts: Sequence[dict], index: Mapping[Any, int], iou: float
) -> None:
    background = len(index)
    gt_boxes = np.array([g["bbox"] for g in gts], dtype=np.float64).reshape(-1, 4)
    det_boxes = np.array([d["bbox"] for d in dts], dtype=np.float64).reshape(-1, 4)
    matched = match_detections(gt_boxes, det_boxes, np.array([d["score"] for d in dts]), iou)
    for det, gt in enumerate(matched):
        row = index[gts[gt]["category_id"]] if gt >= 0 else background
        matrix[row, index[dts[det]["category_id"]]] += 1
    for gt in sorted(set(range(len(gts))) - set(matched.tolist())):
        matrix[index[gts[gt]["category_id"]], background] += 1


def confusion_matrix(
    ground_truth: Mapping[Any, Sequence[dict]],
    detections: Mapping[Any, Sequence[dict]],
    category_ids: Sequence[int],
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> np.ndarray:
    """(K + 1, K + 1) counts: rows are the objects' classes, columns the predicted ones, last of each background.

    ``ground_truth`` and ``detections`` map an image id to COCO annotations / results (``bbox`` XYWH,
    ``category_id``, ``score`` for detections, optional ``iscrowd``); images are those of ``ground_truth``.
    Detections below ``score_threshold`` or of a category outside ``category_ids`` are not counted."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    index = {category_id: i for i, category_id in enumerate(category_ids)}
    matrix = np.zeros((len(index) + 1, len(index) + 1), dtype=np.int64)
    for image_id, objects in ground_truth.items():
        gts = [g for g in objects if not g.get("iscrowd", 0) and g["category_id"] in index]
        dts = [d for d in detections.get(image_id, ()) if d["score"] >= score_threshold and d["category_id"] in index]
        _add_image(matrix, gts, dts, index, iou_threshold)
    return matrix


def confusion_from_coco(evaluator: Any, iou_threshold: float = 0.5, score_threshold: float = 0.5) -> np.ndarray:
    """The confusion matrix of a COCOeval's images and categories (``evaluator.params``), from its own
    ground truth and results objects, so it counts exactly what that evaluation scored."""
    params = evaluator.params
    category_ids = list(params.catIds)
    image_ids = list(params.imgIds)
    coco_gt, coco_dt = evaluator.cocoGt, evaluator.cocoDt
    ground_truth = {i: coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[i], catIds=category_ids)) for i in image_ids}
    detections = {i: coco_dt.loadAnns(coco_dt.getAnnIds(imgIds=[i], catIds=category_ids)) for i in image_ids}
    return confusion_matrix(ground_truth, detections, category_ids, iou_threshold, score_threshold)
