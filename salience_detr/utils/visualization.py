"""Pictures of what Salience DETR looks at: per-level salience heat-maps and the tokens it keeps.

The paper shows two figures that this module reproduces for any image: the salience maps, whose contours
follow the objects although the model only ever saw boxes, and the tokens kept by each encoder layer plus
the positions of the selected queries, which show the scale bias of the filtering and the redundancy that
the query NMS removes. Everything here works on plain tensors and RGB ``uint8`` arrays, so it is
independent of how the model returns them.

Coordinates: salience maps and token indices live on the padded network input (``padded_size``), of which
the top-left ``input_size`` is the resized image; pictures are drawn at the original image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from salience_detr.layers.levels import level_start_index

__all__ = [
    "LEVEL_COLORS",
    "draw_points",
    "label_panel",
    "level_start_index",
    "overlay_heatmap",
    "salience_heatmaps",
    "salience_panels",
    "tile_panels",
    "token_centers",
    "token_panels",
]

# One RGB colour per feature level (finest first), distinct on a dimmed photo.
LEVEL_COLORS = ((255, 64, 64), (255, 200, 0), (64, 220, 64), (64, 160, 255), (220, 80, 255))


def _check_sizes(**sizes: Sequence[int]) -> None:
    for name, size in sizes.items():
        if len(size) != 2 or min(int(v) for v in size) <= 0:
            raise ValueError(f"{name} must be (height, width) with positive values, got {tuple(size)}")


def salience_heatmaps(
    salience: Sequence[Tensor],
    input_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int],
) -> list[np.ndarray]:
    """Per-level salience probabilities in [0, 1] as float32 arrays of ``output_size``.

    ``salience``: one logit map per level, (H_l, W_l) or (1, H_l, W_l), covering the padded input. Each
    map is upsampled to the padded input, cropped to the image (padding dropped) and resized to the
    original image, so every level lines up with the photo.
    """
    _check_sizes(input_size=input_size, padded_size=padded_size, output_size=output_size)
    input_h, input_w = (int(v) for v in input_size)
    padded_h, padded_w = (int(v) for v in padded_size)
    if input_h > padded_h or input_w > padded_w:
        raise ValueError(f"input_size {tuple(input_size)} must fit inside padded_size {tuple(padded_size)}")
    heatmaps = []
    for level, logits in enumerate(salience):
        logits = logits.detach().float().cpu()
        if logits.dim() == 3 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.dim() != 2:
            raise ValueError(f"salience map of level {level} must be (H, W) or (1, H, W), got {tuple(logits.shape)}")
        probability = logits.sigmoid()[None, None]
        padded = F.interpolate(probability, size=(padded_h, padded_w), mode="bilinear", align_corners=False)
        image_part = padded[0, 0, :input_h, :input_w]
        resized = F.interpolate(image_part[None, None], size=tuple(int(v) for v in output_size), mode="bilinear")
        heatmaps.append(resized[0, 0].clamp(0, 1).numpy().astype(np.float32))
    return heatmaps


def overlay_heatmap(image_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heat-map (jet colour map) over an RGB image; ``alpha`` is the heat-map's weight."""
    if image_rgb.shape[:2] != heatmap.shape:
        raise ValueError(f"heat-map {heatmap.shape} and image {image_rgb.shape[:2]} must have the same size")
    scaled = np.clip(heatmap * 255.0, 0, 255).astype(np.uint8)
    colored = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image_rgb.astype(np.uint8), 1.0 - alpha, colored, alpha, 0.0)


def label_panel(panel_rgb: np.ndarray, text: str) -> np.ndarray:
    """Add a caption band above a panel; the font shrinks to fit the width, so small images stay readable.

    The band height depends only on the panel width, so captioned panels of one image tile together."""
    height, width = panel_rgb.shape[:2]
    scale = min(1.0, max(0.3, width / 500.0))
    band = round(34 * scale) + 6
    text_width = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
    fitted = scale * min(1.0, (width - 6) / max(text_width, 1))
    captioned = np.zeros((band + height, width, 3), dtype=np.uint8)
    captioned[band:] = panel_rgb
    baseline = band - max(2, band // 4)
    cv2.putText(captioned, text, (3, baseline), cv2.FONT_HERSHEY_SIMPLEX, fitted, (255, 255, 255), 1, cv2.LINE_AA)
    return captioned


def salience_panels(
    image_rgb: np.ndarray,
    detections_rgb: np.ndarray,
    heatmaps: Sequence[np.ndarray],
    caption: str,
    layout: str = "beside",
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Captioned panels for the salience figure: ``beside`` gives the detections (``caption``) then one
    heat-map per level over a gray copy of the photo; ``over`` blends the element-wise maximum over levels
    onto the detections."""
    if layout == "over":
        strongest = np.maximum.reduce(list(heatmaps)) if heatmaps else np.zeros(detections_rgb.shape[:2], np.float32)
        return [label_panel(overlay_heatmap(detections_rgb, strongest, alpha), f"{caption}, salience (max of levels)")]
    if layout != "beside":
        raise ValueError(f"salience layout must be 'beside' or 'over', got {layout!r}")
    gray = cv2.cvtColor(cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    panels = [label_panel(detections_rgb, caption)]
    for level, heatmap in enumerate(heatmaps):
        panels.append(label_panel(overlay_heatmap(gray, heatmap, alpha=0.65), f"salience level {level}"))
    return panels


def token_centers(
    indices: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, padded_size: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Level and (x, y) centre, in padded-input pixels, of flattened multi-scale token indices (M,)."""
    _check_sizes(padded_size=padded_size)
    indices = indices.detach().long().cpu().flatten()
    shapes = spatial_shapes.detach().long().cpu()
    starts = level_start_index.detach().long().cpu()
    total = int((shapes[:, 0] * shapes[:, 1]).sum())
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= total):
        raise ValueError(f"token indices must lie in [0, {total}) for spatial_shapes {shapes.tolist()}")
    levels = torch.bucketize(indices, starts, right=True) - 1
    offsets = indices - starts[levels]
    widths = shapes[levels, 1]
    heights = shapes[levels, 0]
    rows = torch.div(offsets, widths, rounding_mode="floor")
    cols = offsets - rows * widths
    padded_h, padded_w = (float(v) for v in padded_size)
    xs = (cols.double() + 0.5) / widths.double() * padded_w
    ys = (rows.double() + 0.5) / heights.double() * padded_h
    return levels, xs, ys


def draw_points(
    image_rgb: np.ndarray, xs: np.ndarray, ys: np.ndarray, colors: Sequence[tuple[int, int, int]], radius: int
) -> np.ndarray:
    """Filled dots at pixel positions (points outside the image are skipped) on a dimmed copy of the image."""
    canvas = np.ascontiguousarray((image_rgb.astype(np.float32) * 0.45).astype(np.uint8))
    height, width = canvas.shape[:2]
    for x, y, color in zip(xs, ys, colors):
        if 0 <= x < width and 0 <= y < height:
            cv2.circle(canvas, (int(x), int(y)), radius, tuple(int(c) for c in color), thickness=-1)
    return canvas


def token_panels(
    image_rgb: np.ndarray,
    index_sets: Sequence[Tensor],
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    input_size: Sequence[int],
    padded_size: Sequence[int],
    captions: Sequence[str],
) -> list[np.ndarray]:
    """One panel per set of flattened token indices (the tokens an encoder layer updated, or the tokens the
    queries were selected from), each token a dot at its cell centre coloured by level (``LEVEL_COLORS``)."""
    _check_sizes(input_size=input_size)
    if len(captions) != len(index_sets):
        raise ValueError(f"need one caption per index set, got {len(captions)} for {len(index_sets)}")
    height, width = image_rgb.shape[:2]
    scale_x = width / float(input_size[1])
    scale_y = height / float(input_size[0])
    radius = max(1, round(min(height, width) / 200))
    panels = []
    for caption, indices in zip(captions, index_sets):
        levels, xs, ys = token_centers(indices, spatial_shapes, level_start_index, padded_size)
        colors = [LEVEL_COLORS[level % len(LEVEL_COLORS)] for level in levels.tolist()]
        panel = draw_points(image_rgb, (xs * scale_x).numpy(), (ys * scale_y).numpy(), colors, radius)
        panels.append(label_panel(panel, f"{caption}: {indices.numel()} tokens"))
    return panels


def tile_panels(panels: Sequence[np.ndarray], max_columns: int = 4) -> np.ndarray:
    """Arrange same-size RGB panels row by row (at most ``max_columns`` per row) on a black canvas."""
    if not panels:
        raise ValueError("tile_panels needs at least one panel")
    shape = panels[0].shape
    if any(panel.shape != shape for panel in panels):
        raise ValueError(f"all panels must have the same shape, got {[panel.shape for panel in panels]}")
    columns = min(max_columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    height, width = shape[:2]
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for position, panel in enumerate(panels):
        row, column = divmod(position, columns)
        canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = panel
    return canvas
