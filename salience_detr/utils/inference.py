"""Running a config outside training: build its model with its weights and prepare images as its test mapper does.

Shared by the demo, the benchmark and the ONNX export, so all three see the model exactly as evaluation does. The
weights load strictly (``AtomicDetectionCheckpointer``): a checkpoint of other classes or another model is an error.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from detectron2.config import instantiate
from detectron2.data import transforms as T
from torch import Tensor, nn

from salience_detr.engine.checkpoint import AtomicDetectionCheckpointer
from salience_detr.modeling.cpu_inference import optimize_on_cpu

logger = logging.getLogger(__name__)

DEFAULT_TEST_RESIZE = (800, 1333)

__all__ = [
    "DEFAULT_TEST_RESIZE",
    "DetectionsAsTensors",
    "load_model_for_inference",
    "resize_for_model",
    "test_augmentations",
]


class DetectionsAsTensors(nn.Module):
    """Image tensor (3, H, W) in, (boxes XYXY, scores, classes) out, through the model's own eval path.

    Detectron2 models take a list of dicts and return ``Instances``; ``torch.jit.trace`` (and so fvcore's FLOP
    count and the ONNX exporter) needs tensors on both sides. Boxes are in the input image's pixels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        instances = self.model([{"image": image}])[0]["instances"]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def load_model_for_inference(
    cfg: Any, device: str | None = None, checkpoint: str | None = None, cpu_speedups: bool = True
) -> nn.Module:
    """``cfg.model`` in eval mode on ``device`` (default: ``train.device``, else CPU), with the weights of
    ``checkpoint`` (default: ``train.init_checkpoint``) loaded strictly; random weights when none, with a warning.

    On a CPU, ``cpu_speedups`` applies ``modeling.cpu_inference.optimize_for_cpu_inference`` (batch norms folded,
    channels-last convolutions, oneDNN kernels; same detections to 1e-4, see benchmarks/speed.md): the model is then
    for inference only. Pass ``cfg`` through ``salience_detr.config.load_config(..., inference=True)`` first."""
    model = instantiate(cfg.model)
    train_cfg = cfg.get("train", {})
    model.to(device or train_cfg.get("device", "cpu"))
    checkpoint = train_cfg.get("init_checkpoint", "") if checkpoint is None else checkpoint
    if checkpoint:
        AtomicDetectionCheckpointer(model).load(checkpoint)
    else:
        logger.warning("train.init_checkpoint is empty: random weights (pass --opts train.init_checkpoint=...)")
    model.eval()
    if cpu_speedups:
        optimize_on_cpu(model)
    return model


def test_augmentations(cfg: Any) -> tuple[list[T.Augmentation], str]:
    """Eval-time augmentations and image format of ``cfg.dataloader.test.mapper``.

    Works with any mapper that has ``augmentations`` (this project's ``DetrDatasetMapper``, detectron2's
    ``DatasetMapper``); a config without a test mapper gets the COCO default, ResizeShortestEdge(800, 1333).
    """
    mapper_cfg = cfg.get("dataloader", {}).get("test", {}).get("mapper")
    if mapper_cfg is None:
        logger.warning("No dataloader.test.mapper in the config: using ResizeShortestEdge%s", DEFAULT_TEST_RESIZE)
        return [T.ResizeShortestEdge(*DEFAULT_TEST_RESIZE)], "RGB"
    mapper = instantiate(mapper_cfg)
    augmentations = getattr(mapper, "augmentations", None)
    if augmentations is None:
        raise ValueError(
            f"The test mapper {type(mapper).__name__} has no 'augmentations'; "
            "use DetrDatasetMapper or detectron2's DatasetMapper in dataloader.test.mapper."
        )
    if isinstance(augmentations, T.AugmentationList):
        augmentations = list(augmentations.augs)
    return list(augmentations), getattr(mapper, "image_format", "RGB")


def resize_for_model(image_bgr: np.ndarray, augmentations: list[T.Augmentation], input_format: str) -> np.ndarray:
    """A BGR ``uint8`` (H, W, 3) image -> the test-resized image in the model's channel order, (H', W', 3)."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 image of shape (H, W, 3), got {image_bgr.dtype} {image_bgr.shape}")
    image = image_bgr[:, :, ::-1] if input_format == "RGB" else image_bgr
    aug_input = T.AugInput(np.ascontiguousarray(image))
    T.AugmentationList(augmentations)(aug_input)
    return aug_input.image
