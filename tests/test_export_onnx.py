"""ONNX export of the tiny synthetic config through the PyTorch attention path, checked in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig
from torch import nn

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.layers import MultiScaleDeformableAttention
from salience_detr.tools import export_onnx
from salience_detr.utils.inference import load_model_for_inference

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
SMALL_INPUT = ["dataloader.test.mapper.test_min_size=96", "dataloader.test.mapper.test_max_size=128"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    image = (rng.random((90, 120, 3)) * 80).astype(np.uint8)
    cv2.rectangle(image, (10, 10), (60, 50), (30, 30, 220), thickness=-1)
    cv2.circle(image, (90, 60), 20, (220, 220, 40), thickness=-1)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    cv2.imwrite(str(path), image)
    return path


@pytest.mark.slow  # two exports and three tiny models: 20-90 s on a shared 2-core CPU
def test_export_matches_pytorch_in_onnxruntime(photo, tmp_path, capsys):
    output = tmp_path / "onnx" / "tiny.onnx"
    argv = ["--config-file", TINY_CONFIG, "--output", str(output), "--image", str(photo), "--opts", *SMALL_INPUT]
    report = export_onnx.main(argv)
    assert output.is_file()
    assert report["max_abs_diff_boxes"] < 1e-3 and report["max_abs_diff_scores"] < 1e-3
    assert report["label_mismatches"] == 0 and report["num_detections"] > 0
    assert "largest difference" in capsys.readouterr().out

    graph = onnx.load(str(output)).graph
    ops = {node.op_type for node in graph.node}
    assert "GridSample" in ops
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), "custom-op nodes would not run elsewhere"
    assert [value.name for value in graph.input] == ["image"]
    assert [value.name for value in graph.output] == ["boxes", "scores", "labels"]
    height, width = report["input_shape"][2:]
    assert (height, width) == (96, 128)  # the photo (90 x 120) through the config's test resize
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, height, width]

    # the graph and the detectron2 model agree (another export size: 64 x 96)
    cfg = LazyConfig.load(TINY_CONFIG)
    model = load_model_for_inference(cfg, "cpu", cpu_speedups=False)  # saved below: the norms must stay
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("random_weights")
    image = export_onnx.normalized_input(model, cv2.imread(str(photo)), cfg, (64, 96))
    fixed = tmp_path / "fixed.onnx"
    export_onnx.main(
        [
            "--config-file",
            TINY_CONFIG,
            "--output",
            str(fixed),
            "--image",
            str(photo),
            "--height",
            "64",
            "--width",
            "96",
            "--opts",
            f"train.init_checkpoint={tmp_path / 'random_weights.pth'}",
        ]
    )
    session = onnxruntime.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": image.numpy()})
    raw = (image[0] * model.pixel_std + model.pixel_mean).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        instances = model([{"image": raw}])[0]["instances"]
    assert len(scores) == len(instances)
    np.testing.assert_allclose(scores, instances.scores.numpy(), atol=1e-4)
    np.testing.assert_allclose(boxes, instances.pred_boxes.tensor.numpy(), atol=1e-2)
    np.testing.assert_array_equal(labels, instances.pred_classes.numpy())


def test_export_switches_attention_to_the_pytorch_path():
    attention = MultiScaleDeformableAttention(32, num_heads=4, num_levels=2, num_points=2, backend="compiled")
    model = nn.Sequential(attention, nn.Linear(2, 2))
    assert export_onnx.use_pytorch_attention(model) == 1
    assert model[0].backend == "pytorch"


class SearchSorted(nn.Module):
    def __init__(self, right: bool) -> None:
        super().__init__()
        self.right = right

    def forward(self, boundaries, values):
        return torch.searchsorted(boundaries, values, right=self.right)


@pytest.mark.parametrize("right", [False, True])
def test_searchsorted_symbolic_matches_torch(right, tmp_path):
    boundaries = torch.tensor([0, 24, 30, 36])
    values = torch.tensor([[0, 5, 24, 29], [30, 35, 36, 40]])
    path = str(tmp_path / "searchsorted.onnx")
    torch.onnx.register_custom_op_symbolic("aten::searchsorted", export_onnx.searchsorted_symbolic, 17)
    torch.onnx.export(
        SearchSorted(right),
        (boundaries, values),
        path,
        opset_version=17,
        dynamo=False,
        input_names=["boundaries", "values"],
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"boundaries": boundaries.numpy(), "values": values.numpy()})
    np.testing.assert_array_equal(result, torch.searchsorted(boundaries, values, right=right).numpy())


def test_bad_arguments_are_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="give both --height and --width"):
        export_onnx.main(["--config-file", TINY_CONFIG, "--output", str(tmp_path / "m.onnx"), "--height", "64"])
    with pytest.raises(SystemExit, match="has no grid_sample"):
        export_onnx.main(["--config-file", TINY_CONFIG, "--output", str(tmp_path / "m.onnx"), "--opset", "13"])
