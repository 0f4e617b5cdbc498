"""Run a Salience DETR LazyConfig on single images and video frames, and draw what it found (and saw).

``SaliencePredictor`` is detectron2's ``DefaultPredictor`` for LazyConfigs: it builds ``cfg.model``, loads
``train.init_checkpoint``, and prepares each image exactly as the config's test mapper does (its resize and
its image format), so the demo sees the model as evaluation does. ``VisualizationDemo`` turns predictions
into pictures: detections above a confidence threshold, and optionally the per-level salience heat-maps
and the tokens kept by each encoder layer (see ``salience_detr.utils.visualization``).

Load the config with ``salience_detr.config.load_config(path, overrides, inference=True)``: it resolves
``model.num_classes`` and, where the dataset is not available, takes the class names from the checkpoint.
"""

from __future__ import annotations

# first, in a block of its own: besides registering the model and datasets, the import hides torch's jit.script
# deprecation warning that detectron2 and fvcore trigger when they are imported (salience_detr.compat)
import salience_detr  # noqa: F401

# isort: split
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from salience_detr.utils.inference import load_model_for_inference, resize_for_model, test_augmentations
from salience_detr.utils.visualization import (
    label_panel,
    level_start_index,
    salience_heatmaps,
    salience_panels,
    tile_panels,
    token_panels,
)


def dataset_metadata(cfg: Any) -> Metadata:
    """Metadata (class names) of the config's first test dataset; detectron2's empty metadata if there is none."""
    names = cfg.get("dataloader", {}).get("test", {}).get("dataset", {}).get("names")
    if not names:
        return MetadataCatalog.get("__unused")
    return MetadataCatalog.get(names if isinstance(names, str) else names[0])


@dataclass
class Prediction:
    """One image's detections (original pixels) plus, when asked for, what the encoder looked at."""

    instances: Instances
    input_size: tuple[int, int]
    padded_size: tuple[int, int]
    salience: list[torch.Tensor] | None = None
    selected_indices: list[torch.Tensor] | None = None
    spatial_shapes: torch.Tensor | None = None
    query_index: torch.Tensor | None = None


class SaliencePredictor:
    """Callable: BGR ``uint8`` image (H, W, 3), as OpenCV reads it -> ``Prediction`` (no grad); a list of
    images -> a list of predictions, in order.

    A list runs as batches of up to ``batch_size`` images that share one input size after the test resize:
    padding a smaller image to a larger one changes what the convolutions see at its borders, so batching
    only equal sizes keeps every prediction the one the image gets alone. (On inputs so small that an image
    keeps fewer than ``num_queries`` proposals, a batch still uses the fewest of any image, see
    ``grid_nms``.)"""

    def __init__(self, cfg: Any, device: str | None = None, with_internals: bool = False) -> None:
        self.model = load_model_for_inference(cfg, device)
        self.augmentations, self.input_format = test_augmentations(cfg)
        self.with_internals = with_internals
        if with_internals:
            if not hasattr(self.model, "return_salience") or not hasattr(self.model, "transformer"):
                raise ValueError(
                    f"{type(self.model).__name__} has no 'return_salience' switch or no 'transformer', so salience "
                    "maps and kept tokens cannot be shown; use a SalienceDETR config."
                )
            self.model.return_salience = True

    def _padded(self, height: int, width: int) -> tuple[int, int]:
        divisor = max(1, int(getattr(self.model, "size_divisibility", 1) or 1))
        return -(-height // divisor) * divisor, -(-width // divisor) * divisor

    def __call__(
        self, images_bgr: np.ndarray | Sequence[np.ndarray], batch_size: int | None = None
    ) -> Prediction | list[Prediction]:
        if isinstance(images_bgr, np.ndarray):
            return self._run([self._prepare(images_bgr)])[0]
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")
        inputs = [self._prepare(image_bgr) for image_bgr in images_bgr]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(inputs):
            by_size.setdefault(tuple(item["image"].shape[1:]), []).append(index)
        step = batch_size or max(1, len(inputs))
        predictions: list[Prediction | None] = [None] * len(inputs)
        for indices in by_size.values():
            for start in range(0, len(indices), step):
                batch = indices[start : start + step]
                for index, prediction in zip(batch, self._run([inputs[i] for i in batch])):
                    predictions[index] = prediction
        return predictions

    def _prepare(self, image_bgr: np.ndarray) -> dict[str, Any]:
        """The model input of one image: resized as the test mapper does, CHW, with its original size."""
        resized = resize_for_model(image_bgr, self.augmentations, self.input_format)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": image_bgr.shape[0], "width": image_bgr.shape[1]}

    def _run(self, inputs: list[dict[str, Any]]) -> list[Prediction]:
        """One forward over inputs of one size."""
        with torch.inference_mode():
            outputs = self.model(inputs)
        input_size = tuple(inputs[0]["image"].shape[1:])
        return [self._prediction(output, input_size, self._padded(*input_size)) for output in outputs]

    def _prediction(self, output: dict[str, Any], input_size: tuple[int, int], padded: tuple[int, int]) -> Prediction:
        prediction = Prediction(output["instances"].to("cpu"), input_size, padded)
        if self.with_internals:
            prediction.salience = [level.cpu() for level in output["salience"]]
            prediction.selected_indices = [indices.cpu() for indices in output["selected_indices"]]
            prediction.spatial_shapes = output["spatial_shapes"].cpu()
            prediction.query_index = output["query_index"].cpu()
        return prediction


def above_threshold(instances: Instances, threshold: float) -> Instances:
    """Detections with score >= threshold (the model itself returns its top-k without a threshold)."""
    return instances[instances.scores >= threshold]


class VisualizationDemo:
    """Predict and draw: detections, then optional salience and kept-token panels, tiled into one picture."""

    def __init__(
        self,
        cfg: Any,
        confidence_threshold: float = 0.5,
        show_salience: bool = False,
        show_queries: bool = False,
        salience_layout: str = "beside",
        device: str | None = None,
    ) -> None:
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {confidence_threshold}")
        self.metadata = dataset_metadata(cfg)
        self.confidence_threshold = confidence_threshold
        self.show_salience = show_salience
        self.show_queries = show_queries
        self.salience_layout = salience_layout
        self.predictor = SaliencePredictor(cfg, device, with_internals=show_salience or show_queries)

    def _panels(self, image_bgr: np.ndarray, prediction: Prediction, kept: Instances, drawn_rgb: np.ndarray) -> list:
        """Captioned panels: detections, then salience heat-maps and kept tokens when asked for."""
        image_rgb = image_bgr[:, :, ::-1]
        caption = f"{len(kept)} detections >= {self.confidence_threshold:g}"
        if self.show_salience:
            heatmaps = salience_heatmaps(
                prediction.salience, prediction.input_size, prediction.padded_size, image_rgb.shape[:2]
            )
            panels = salience_panels(image_rgb, drawn_rgb, heatmaps, caption, self.salience_layout)
        else:
            panels = [label_panel(drawn_rgb, caption)]
        if self.show_queries:
            index_sets = [*prediction.selected_indices, prediction.query_index]
            captions = [f"encoder layer {layer}" for layer in range(len(index_sets) - 1)] + ["selected queries"]
            panels += token_panels(
                image_rgb,
                index_sets,
                prediction.spatial_shapes,
                level_start_index(prediction.spatial_shapes),
                prediction.input_size,
                prediction.padded_size,
                captions,
            )
        return panels

    def _compose(self, image_bgr: np.ndarray, prediction: Prediction, kept: Instances, drawn_rgb: np.ndarray):
        """The picture to save or show, BGR ``uint8`` (OpenCV's order)."""
        panels = self._panels(image_bgr, prediction, kept, drawn_rgb)
        return np.ascontiguousarray(tile_panels(panels)[:, :, ::-1])

    def run_on_image(self, image_bgr: np.ndarray) -> tuple[Prediction, Instances, np.ndarray]:
        """Prediction, the drawn detections (above the threshold) and the picture as BGR ``uint8``."""
        return self.run_on_images([image_bgr])[0]

    def run_on_images(
        self, images_bgr: Sequence[np.ndarray], draw: bool = True, batch_size: int | None = None
    ) -> list[tuple[Prediction, Instances, np.ndarray | None]]:
        """``run_on_image`` for several images, predicted in batches of at most ``batch_size`` images of one input
        size (see ``SaliencePredictor``); with ``draw=False`` no picture is made (None), for detections only."""
        results = []
        for image_bgr, prediction in zip(images_bgr, self.predictor(list(images_bgr), batch_size)):
            kept = above_threshold(prediction.instances, self.confidence_threshold)
            results.append((prediction, kept, self._draw(image_bgr, prediction, kept) if draw else None))
        return results

    def _draw(self, image_bgr: np.ndarray, prediction: Prediction, kept: Instances) -> np.ndarray:
        visualizer = Visualizer(convert_image_to_rgb(image_bgr, "BGR"), self.metadata, instance_mode=ColorMode.IMAGE)
        detections_rgb = visualizer.draw_instance_predictions(kept).get_image()
        return self._compose(image_bgr, prediction, kept, detections_rgb)

    def run_on_frames(
        self, frames: Iterator[np.ndarray], draw: bool = True
    ) -> Iterator[tuple[Instances, np.ndarray | None]]:
        """For each BGR frame: detections above the threshold and the picture (colours stable across frames;
        None with ``draw=False``)."""
        video_visualizer = VideoVisualizer(self.metadata, ColorMode.IMAGE)
        for frame in frames:
            prediction = self.predictor(frame)
            kept = above_threshold(prediction.instances, self.confidence_threshold)
            if not draw:
                yield kept, None
                continue
            detections_rgb = video_visualizer.draw_instance_predictions(frame[:, :, ::-1], kept).get_image()
            yield kept, self._compose(frame, prediction, kept, detections_rgb)
