"""Export a Salience DETR config to ONNX and check the file with onnxruntime against PyTorch.

    python -m salience_detr.tools.export_onnx --config-file configs/salience_detr/salience_detr_r50_4scale_12ep.py \
        --output model.onnx [--image photo.jpg] [--height H --width W] [--opts train.init_checkpoint=model.pth]

The exported graph takes one normalized image, ``image`` (1, 3, H, W) float32 = (RGB pixels - pixel_mean) /
pixel_std of the model, resized (e.g. with the config's test resize) to the export size, and returns ``boxes`` (K,
4) XYXY in that image's pixels (clipped to it), ``scores`` (K,) and ``labels`` (K,) (contiguous class ids): the
model's top-K without a threshold, exactly as its detectron2 eval path returns them. Deformable attention goes
through the pure-PyTorch path (``grid_sample``), which every ONNX runtime has. The token budgets of the salience
filter depend on the map sizes and are fixed when the graph is traced, so the image size is fixed too: export once
per size you deploy.

After export the tool runs the file in onnxruntime and the wrapper in PyTorch on a real image (``--image``,
or the first image of the config's test dataset) and matches the two sets of detections (same label, box and
score within ``--tolerance``, in any order: near-equal scores may swap slots). It prints the largest differences,
and on a mismatch says what differs and keeps the file.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog
from torch import Tensor, nn
from torch.onnx import symbolic_helper

import salience_detr  # noqa: F401  (makes detectron2 importable and registers the model and datasets)
from salience_detr.config import load_config
from salience_detr.data.image_io import read_image
from salience_detr.layers import MultiScaleDeformableAttention
from salience_detr.modeling.fuse import fuse_conv_bn
from salience_detr.tools.onnx_check import (
    Detections,
    check_output_path,
    describe_differences,
    label_mismatches,
    match_detections,
)
from salience_detr.tools.user_errors import exit_on_user_error
from salience_detr.utils.inference import (
    DetectionsAsTensors,
    load_model_for_inference,
    resize_for_model,
    test_augmentations,
)

logger = logging.getLogger(__name__)

INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
DEFAULT_OPSET = 17  # grid_sample is in the default ONNX domain from opset 16
ONNX_INT64, ONNX_INT32 = 7, 6  # onnx.TensorProto data types


class ExportableDetector(nn.Module):
    """Normalized image (1, 3, H, W) -> (boxes XYXY in pixels, scores, labels) through the model's own eval path
    (padding mask, RoI head and detectron2's box clipping included). The wrapper works on a copy of the model
    whose normalization is the identity, because the graph's input is already normalized."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in ("pixel_mean", "pixel_std"):
            if not isinstance(getattr(model, name, None), Tensor):
                raise TypeError(f"{type(model).__name__} has no '{name}' buffer: export supports SalienceDETR configs")
        identity = copy.deepcopy(model)
        identity.pixel_mean.zero_()
        identity.pixel_std.fill_(1.0)
        self.detector = DetectionsAsTensors(identity)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f"expected one normalized image (1, 3, H, W), got {tuple(image.shape)}")
        return self.detector(image[0])


def searchsorted_symbolic(g, sorted_sequence, values, out_int32=False, right=False, side=None, sorter=None):
    """ONNX has no searchsorted; for a 1-D sorted sequence it is a count of entries below each value (the
    model uses it to find the level of a flattened token index)."""
    if symbolic_helper._maybe_get_const(sorter, "v") is not None and not symbolic_helper._is_none(sorter):
        raise RuntimeError("ONNX export of searchsorted with a sorter is not supported")
    if symbolic_helper._get_tensor_rank(sorted_sequence) not in (None, 1):
        raise RuntimeError("ONNX export of searchsorted supports a 1-D sorted sequence only")
    use_right = bool(symbolic_helper._maybe_get_const(right, "b")) or (
        not symbolic_helper._is_none(side) and symbolic_helper._maybe_get_const(side, "s") == "right"
    )
    expanded = symbolic_helper._unsqueeze_helper(g, values, [-1])
    below = g.op("LessOrEqual" if use_right else "Less", sorted_sequence, expanded)
    counts = g.op(
        "ReduceSum", g.op("Cast", below, to_i=ONNX_INT64), g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=0
    )
    return g.op("Cast", counts, to_i=ONNX_INT32) if symbolic_helper._maybe_get_const(out_int32, "b") else counts


def use_pytorch_attention(model: nn.Module) -> int:
    """Switch every deformable attention module to the pure-PyTorch path; returns how many were switched."""
    modules = [module for module in model.modules() if isinstance(module, MultiScaleDeformableAttention)]
    for module in modules:
        module.backend = "pytorch"
    return len(modules)


def first_test_image(cfg: Any) -> str:
    """File name of the first image of the config's first test dataset (a real image to check against)."""
    names = cfg.get("dataloader", {}).get("test", {}).get("dataset", {}).get("names")
    if not names:
        raise ValueError("the config has no dataloader.test.dataset.names; pass --image to check the export")
    records = DatasetCatalog.get(names if isinstance(names, str) else names[0])
    if not records:
        raise ValueError(f"test dataset {names!r} is empty; pass --image to check the export")
    return records[0]["file_name"]


def normalized_input(model: nn.Module, image_bgr: np.ndarray, cfg: Any, size: tuple[int, int] | None) -> Tensor:
    """The config's test resize (or exactly ``size``) in the model's channel order, normalized, (1, 3, H, W)."""
    augmentations, input_format = test_augmentations(cfg)
    resized = resize_for_model(image_bgr, augmentations, input_format)
    if size is not None:
        resized = cv2.resize(resized, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float().to(model.device)
    return ((tensor - model.pixel_mean) / model.pixel_std)[None]


def export(detector: ExportableDetector, image: Tensor, output: str, opset: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::searchsorted", searchsorted_symbolic, opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            detector,
            (image,),
            output,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=opset,
            dynamo=False,
        )


def compare_with_onnxruntime(
    detector: ExportableDetector, image: Tensor, onnx_file: str, tolerance: float = 1e-3
) -> dict[str, Any]:
    """PyTorch against onnxruntime on one input, detections matched as sets (``onnx_check``): the largest box and
    score differences of matched pairs, what is left unmatched, and ``differences`` in words when they disagree."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    onnx = Detections(*session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: image.cpu().numpy()}))
    with torch.no_grad():
        reference = Detections(*(tensor.cpu().numpy() for tensor in detector(image)))
    match = match_detections(reference, onnx, box_tolerance=tolerance, score_tolerance=tolerance)
    return {
        "max_abs_diff_boxes": match.max_box_diff,
        "max_abs_diff_scores": match.max_score_diff,
        "label_mismatches": label_mismatches(match, reference, onnx),
        "matched": len(match.pairs),
        "unmatched_pytorch": len(match.unmatched_reference),
        "unmatched_onnxruntime": len(match.unmatched_other),
        "swapped_at_cutoff": match.at_cutoff,
        "num_detections": int(len(reference.scores)),
        "differences": None if match.ok else describe_differences(match, reference, onnx, ("PyTorch", "onnxruntime")),
    }


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig .py file")
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--image", help="real image to check the export on (default: first test-set image)")
    parser.add_argument("--height", type=int, help="export height (default: the image's test-resized height)")
    parser.add_argument("--width", type=int, help="export width (default: the image's test-resized width)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (16 or newer for grid_sample)")
    parser.add_argument(
        "--fuse-bn", action="store_true", help="fold batch norms into the preceding convolutions before export"
    )
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest box/score difference accepted")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_parser().parse_args(argv)
    if (args.height is None) != (args.width is None):
        raise SystemExit("give both --height and --width, or neither (then the test resize of --image decides)")
    if args.opset < 16:
        raise SystemExit(f"--opset {args.opset} has no grid_sample; use 16 or newer")
    if not os.path.isfile(args.config_file):
        raise SystemExit(f"config file {args.config_file!r} does not exist; pass a LazyConfig .py file")
    try:
        check_output_path(args.output)  # before the minutes of building, tracing and checking
    except ValueError as error:
        raise SystemExit(str(error)) from error
    cfg = load_config(args.config_file, args.opts, inference=True)
    model = load_model_for_inference(cfg, "cpu", cpu_speedups=False)  # the plain model: --fuse-bn is its own option
    switched = use_pytorch_attention(model)
    logger.info("Deformable attention: %d modules switched to the pure-PyTorch path", switched)
    if args.fuse_bn:
        logger.info("Folded %d batch norms into convolutions", fuse_conv_bn(model.eval()))
    image_file = args.image or first_test_image(cfg)
    try:
        image_bgr = read_image(image_file, format="BGR")
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot read image {image_file!r} ({error}); pass another --image") from error
    size = (args.height, args.width) if args.height is not None else None
    image = normalized_input(model, image_bgr, cfg, size)
    detector = ExportableDetector(model).eval()
    export(detector, image, args.output, args.opset)
    check = compare_with_onnxruntime(detector, image, args.output, args.tolerance)
    report = {"onnx_file": args.output, "image": image_file, "input_shape": list(image.shape), **check}
    print(
        f"Exported {args.output} for input (1, 3, {image.shape[2]}, {image.shape[3]}); onnxruntime vs PyTorch on "
        f"{image_file}: {check['matched']} of {check['num_detections']} "
        f"detections matched as sets, largest difference boxes {check['max_abs_diff_boxes']:.3g} px, "
        f"scores {check['max_abs_diff_scores']:.3g}"
    )
    if check["differences"]:
        raise SystemExit(
            f"onnxruntime and PyTorch disagree beyond --tolerance {args.tolerance} (same label, box and score, in any "
            f"order):\n{check['differences']}\n{args.output} is kept for inspection; pass a larger --tolerance if "
            "these differences are acceptable."
        )
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    with exit_on_user_error("export_onnx"):
        main()
