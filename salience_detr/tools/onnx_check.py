"""How export_onnx decides that onnxruntime and PyTorch agree, and that it may write its output at all.

Detections are compared as sets, not slot by slot: the model returns its top-K sorted by score, so two detections
whose scores differ by rounding may swap slots between runtimes (and one may leave the top-K at its cut-off for
another of the same score). Each PyTorch detection must have its own onnxruntime detection with the same label and
box and score within the tolerance (an optimal one-to-one assignment); what is left over is described, not just
counted.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

EXAMPLES_SHOWN = 3
INFEASIBLE = 1e9  # assignment cost of two detections that do not agree


@dataclass
class Detections:
    """One image's detections: ``boxes`` (K, 4) XYXY, ``scores`` (K,), ``labels`` (K,)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def describe(self, index: int) -> str:
        box = ", ".join(f"{v:.2f}" for v in self.boxes[index])
        return f"#{index} label {int(self.labels[index])} score {self.scores[index]:.4f} box [{box}]"


@dataclass
class DetectionMatch:
    """The result of :func:`match_detections`: matched pairs, their largest differences, and what is left over."""

    pairs: list[tuple[int, int]]
    max_box_diff: float
    max_score_diff: float
    unmatched_reference: list[int] = field(default_factory=list)
    unmatched_other: list[int] = field(default_factory=list)
    at_cutoff: int = 0  # leftover pairs (one per side) excused as a swap at the top-K cut-off

    @property
    def ok(self) -> bool:
        return not self.unmatched_reference and not self.unmatched_other


def _box_and_score_diffs(reference: Detections, other: Detections) -> tuple[np.ndarray, np.ndarray]:
    """(K_reference, K_other) largest box coordinate difference and score difference of every pair."""
    boxes, other_boxes = reference.boxes.reshape(-1, 4), other.boxes.reshape(-1, 4)
    box = np.abs(boxes[:, None, :] - other_boxes[None, :, :]).max(-1, initial=0.0)
    return box, np.abs(reference.scores[:, None] - other.scores[None, :])


def _cutoff_candidates(indices: list[int], own: Detections, other: Detections, tolerance: float) -> list[int]:
    """Leftovers whose score ties the other side's lowest kept score (they may have swapped at the top-K cut-off),
    lowest score first."""
    if not len(other.scores):
        return []
    lowest = float(other.scores.min())
    return sorted((i for i in indices if own.scores[i] <= lowest + tolerance), key=lambda i: own.scores[i])


def _assign(reference: Detections, other: Detections, box_tolerance: float, score_tolerance: float):
    """Optimal one-to-one pairs that agree (same label, box and score within the tolerances), and the differences."""
    box_diff, score_diff = _box_and_score_diffs(reference, other)
    feasible = (
        (reference.labels[:, None] == other.labels[None, :])
        & (box_diff <= box_tolerance)
        & (score_diff <= score_tolerance)
    )
    cost = np.where(feasible, box_diff + score_diff, INFEASIBLE)
    rows, cols = linear_sum_assignment(cost) if cost.size else (np.array([], int), np.array([], int))
    return [(int(r), int(c)) for r, c in zip(rows, cols) if feasible[r, c]], box_diff, score_diff


def match_detections(
    reference: Detections, other: Detections, box_tolerance: float, score_tolerance: float
) -> DetectionMatch:
    """Match ``other`` to ``reference`` one to one, free of order (see the module docstring). Leftovers are excused
    only in equal numbers on both sides and only where their scores tie the other side's lowest score."""
    pairs, box_diff, score_diff = _assign(reference, other, box_tolerance, score_tolerance)
    matched_reference, matched_other = {r for r, _ in pairs}, {c for _, c in pairs}
    left_reference = [i for i in range(len(reference.scores)) if i not in matched_reference]
    left_other = [j for j in range(len(other.scores)) if j not in matched_other]
    swapped_in = _cutoff_candidates(left_reference, reference, other, score_tolerance)
    swapped_out = _cutoff_candidates(left_other, other, reference, score_tolerance)
    excused = min(len(swapped_in), len(swapped_out))
    return DetectionMatch(
        pairs=pairs,
        max_box_diff=float(max((box_diff[r, c] for r, c in pairs), default=0.0)),
        max_score_diff=float(max((score_diff[r, c] for r, c in pairs), default=0.0)),
        unmatched_reference=[i for i in left_reference if i not in swapped_in[:excused]],
        unmatched_other=[j for j in left_other if j not in swapped_out[:excused]],
        at_cutoff=excused,
    )


def label_mismatches(match: DetectionMatch, reference: Detections, other: Detections) -> int:
    """How many unmatched ``reference`` detections have, as their nearest ``other`` box, one of another label."""
    if not len(other.scores):
        return 0
    box_diff, _ = _box_and_score_diffs(reference, other)
    nearest = box_diff.argmin(1)
    return sum(int(reference.labels[i] != other.labels[nearest[i]]) for i in match.unmatched_reference)


def _leftover_lines(indices: list[int], own: Detections, other: Detections, names: tuple[str, str]) -> list[str]:
    if not len(other.scores):
        return [f"  {names[0]} {own.describe(i)}: {names[1]} has no detections" for i in indices[:EXAMPLES_SHOWN]]
    box_diff, _ = _box_and_score_diffs(own, other)
    lines = []
    for index in indices[:EXAMPLES_SHOWN]:
        nearest = int(box_diff[index].argmin())
        lines.append(
            f"  {names[0]} {own.describe(index)}; nearest {names[1]} {other.describe(nearest)} "
            f"(box differs by {box_diff[index, nearest]:.3g} px)"
        )
    return lines


def describe_differences(
    match: DetectionMatch, reference: Detections, other: Detections, names: tuple[str, str] = ("A", "B")
) -> str:
    """What differs, in words: a few unmatched detections of each side next to the nearest one of the other."""
    lines = [
        f"{len(match.pairs)} of {len(reference.scores)} {names[0]} detections match {names[1]} ones one to one "
        f"({match.at_cutoff} more swapped at the top-K cut-off); unmatched: {len(match.unmatched_reference)} "
        f"{names[0]}, {len(match.unmatched_other)} {names[1]}"
    ]
    lines += _leftover_lines(match.unmatched_reference, reference, other, names)
    lines += _leftover_lines(match.unmatched_other, other, reference, names[::-1])
    return "\n".join(lines)


def check_output_path(path: str) -> None:
    """Raise ``ValueError`` naming the fix unless a file can be written at ``path`` (its folder may not exist yet:
    the nearest existing one must take new files). Run before any export work."""
    if os.path.isdir(path):
        raise ValueError(f"--output {path!r} is a folder; pass a file path such as {os.path.join(path, 'model.onnx')}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"--output {path!r} cannot be created: {folder!r} is a file, not a folder; pass another path")
    try:  # a real write: permissions alone miss read-only file systems and root's rights
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"--output {path!r}: cannot write into {folder!r} ({error.strerror}); pass a path in a folder you can write"
        ) from error
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"--output {path!r} exists and is read-only; remove it or pass another path")
