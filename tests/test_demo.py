"""demo/demo.py and the salience / kept-token drawings, on the tiny synthetic config with random weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from demo_loading import load_demo_cli
from detectron2.config import LazyConfig

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.utils.visualization import (
    label_panel,
    level_start_index,
    salience_heatmaps,
    salience_panels,
    tile_panels,
    token_centers,
    token_panels,
)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
IMAGE_SIZE = (96, 128)  # height, width of the generated pictures
# keep them at that size (the config's test resize would triple it): fast, and still four feature levels
SMALL_INPUT = ["dataloader.test.mapper.test_min_size=96", "dataloader.test.mapper.test_max_size=128"]


demo_cli = load_demo_cli("salience_detr_demo_cli")
from predictor import VisualizationDemo  # noqa: E402  (demo.py put demo/ on sys.path)


def _picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = (rng.random((*IMAGE_SIZE, 3)) * 60).astype(np.uint8)
    cv2.rectangle(image, (20, 15), (70, 60), (40, 40, 230), thickness=-1)
    cv2.circle(image, (100, 70), 18, (230, 200, 30), thickness=-1)
    return image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for index in range(2):
        cv2.imwrite(str(folder / f"picture_{index}.png"), _picture(index))
    (folder / "notes.txt").write_text("not an image; the folder expansion must skip it")
    return folder


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, IMAGE_SIZE[::-1])
    assert writer.isOpened(), "the test needs OpenCV's MJPG writer"
    for index in range(3):
        writer.write(_picture(index))
    writer.release()
    return path


@pytest.fixture(scope="module")
def tiny_cfg():
    return LazyConfig.apply_overrides(LazyConfig.load(TINY_CONFIG), SMALL_INPUT)


def _frame_count(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def run_demo(*args: str) -> int:
    return demo_cli.main(["--config-file", TINY_CONFIG, *args, "--opts", *SMALL_INPUT])


# --- drawing helpers ---------------------------------------------------------------------------------


def test_salience_heatmap_drops_padding_and_matches_original_size():
    # a 4x4 map over a 64x64 padded input whose image is the top-left 32x64; only the padding rows are salient
    logits = torch.full((1, 4, 4), -8.0)
    logits[0, 2:] = 8.0
    (heatmap,) = salience_heatmaps([logits], input_size=(32, 64), padded_size=(64, 64), output_size=(50, 100))
    assert heatmap.shape == (50, 100) and heatmap.dtype == np.float32
    assert heatmap[:20].max() < 0.01  # rows well inside the image stay cold
    with pytest.raises(ValueError, match="must fit inside padded_size"):
        salience_heatmaps([logits], input_size=(70, 64), padded_size=(64, 64), output_size=(50, 100))


def test_token_centers_map_flat_indices_to_levels_and_pixels():
    spatial_shapes = torch.tensor([[4, 6], [2, 3]])
    starts = level_start_index(spatial_shapes)
    assert starts.tolist() == [0, 24]
    levels, xs, ys = token_centers(torch.tensor([0, 7, 24, 29]), spatial_shapes, starts, padded_size=(32, 48))
    assert levels.tolist() == [0, 0, 1, 1]
    assert xs.tolist() == [4.0, 12.0, 8.0, 40.0]  # cell width 8 on level 0, 16 on level 1
    assert ys.tolist() == [4.0, 12.0, 8.0, 24.0]
    with pytest.raises(ValueError, match="token indices must lie in"):
        token_centers(torch.tensor([30]), spatial_shapes, starts, padded_size=(32, 48))


def test_panels_share_caption_height_and_tile_row_by_row():
    image = np.full((40, 60, 3), 100, np.uint8)
    heatmaps = [np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)] * 3
    beside = salience_panels(image, image, heatmaps, "detections", "beside")
    assert len(beside) == 4 and len({panel.shape for panel in beside}) == 1
    over = salience_panels(image, image, heatmaps, "detections", "over")
    assert len(over) == 1 and over[0].shape == beside[0].shape
    assert not np.array_equal(over[0][-40:], image)  # the heat-map is blended in
    tokens = token_panels(
        image, [torch.tensor([0, 5])], torch.tensor([[4, 6]]), torch.tensor([0]), (40, 60), (40, 60), ["layer 0"]
    )
    assert tokens[0].shape == beside[0].shape
    grid = tile_panels(beside + tokens, max_columns=4)
    height, width = beside[0].shape[:2]
    assert grid.shape == (2 * height, 4 * width, 3)
    assert label_panel(image, "a much longer caption than the panel is wide").shape == beside[0].shape
    with pytest.raises(ValueError, match="same shape"):
        tile_panels([image, image[:20]])


# --- the demo on images --------------------------------------------------------------------------------


def test_confidence_threshold_decides_what_is_drawn(tiny_cfg):
    image = _picture(0)
    nothing = VisualizationDemo(tiny_cfg, confidence_threshold=1.0)
    _, kept, picture = nothing.run_on_image(image)
    assert len(kept) == 0
    band = picture.shape[0] - image.shape[0]
    assert np.abs(picture[band:].astype(int) - image.astype(int)).max() <= 1  # the photo, untouched

    everything = VisualizationDemo(tiny_cfg, confidence_threshold=0.0)
    prediction, kept, picture = everything.run_on_image(image)
    assert len(kept) == len(prediction.instances) > 0
    assert np.abs(picture[band:].astype(int) - image.astype(int)).max() > 50  # boxes drawn

    frames = iter([image, _picture(1)])
    assert [len(kept) for kept, _ in nothing.run_on_frames(frames)] == [0, 0]


def test_demo_on_a_folder_writes_one_picture_per_image(image_folder, tmp_path):
    output = tmp_path / "out"
    code = run_demo("--input", str(image_folder), "--output", str(output) + os.sep, "--confidence-threshold", "0.2")
    assert code == 0
    written = sorted(path.name for path in output.iterdir())
    assert written == ["picture_0.png", "picture_1.png"]
    picture = cv2.imread(str(output / "picture_0.png"))
    assert picture.shape[1] == IMAGE_SIZE[1] and picture.shape[0] > IMAGE_SIZE[0]  # caption band + image


def test_show_salience_and_queries_compose_every_panel(tiny_cfg, image_folder, tmp_path):
    demo = VisualizationDemo(tiny_cfg, show_salience=True, show_queries=True)
    prediction, _, picture = demo.run_on_image(_picture(0))
    assert len(prediction.salience) == len(prediction.spatial_shapes) >= 2
    assert len(prediction.selected_indices) >= 1
    assert 0 < prediction.query_index.numel() <= tiny_cfg.model.transformer.num_queries
    tokens = int((prediction.spatial_shapes[:, 0] * prediction.spatial_shapes[:, 1]).sum())
    assert 0 <= int(prediction.query_index.min()) and int(prediction.query_index.max()) < tokens
    panels = 1 + len(prediction.salience) + len(prediction.selected_indices) + 1  # + the selected queries
    columns = min(4, panels)
    rows = -(-panels // columns)
    assert picture.shape[1] == columns * IMAGE_SIZE[1]
    assert picture.shape[0] % rows == 0 and picture.shape[0] // rows > IMAGE_SIZE[0]

    output = tmp_path / "salience.png"
    code = run_demo(
        "--input", str(image_folder / "picture_0.png"), "--output", str(output), "--show-salience", "--show-queries"
    )
    assert code == 0 and cv2.imread(str(output)).shape == picture.shape


def test_glob_input_and_clear_errors(image_folder, tmp_path, caplog):
    output = tmp_path / "globbed"
    assert run_demo("--input", str(image_folder / "*.png"), "--output", str(output)) == 0
    assert len(list(output.iterdir())) == 2
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.ERROR):
        assert run_demo("--input", str(broken), "--output", str(tmp_path / "x.png")) == 2
        assert run_demo("--input", str(tmp_path / "missing*.png"), "--output", str(tmp_path)) == 2
    assert "cannot read image" in caplog.text and "matches no image file" in caplog.text


def test_a_typo_in_opts_is_one_message_and_status_2(image_folder, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        arguments = ["--input", str(image_folder / "*.png"), "--output", str(tmp_path), "--opts", *SMALL_INPUT]
        status = demo_cli.main(["--config-file", TINY_CONFIG, *arguments, "train.init_checkpint=x"])
    assert status == 2 and not list(tmp_path.iterdir())
    assert "ConfigOverrideError" in caplog.text and "Did you mean train.init_checkpoint" in caplog.text


# --- video and webcam --------------------------------------------------------------------------------------


def test_demo_on_a_video_never_overwrites_silently(video_file, tmp_path, caplog):
    output = tmp_path / "clip_out.avi"
    assert run_demo("--video-input", str(video_file), "--output", str(output), "--confidence-threshold", "0.3") == 0
    assert _frame_count(output) == 3
    before = output.stat().st_mtime_ns
    with caplog.at_level(logging.ERROR):
        assert run_demo("--video-input", str(video_file), "--output", str(output)) == 2
    assert "already exists" in caplog.text and output.stat().st_mtime_ns == before
    assert run_demo("--video-input", str(video_file), "--output", str(output), "--overwrite", "--max-frames", "2") == 0
    assert _frame_count(output) == 2
    with caplog.at_level(logging.ERROR):
        assert run_demo("--video-input", str(tmp_path / "missing.avi"), "--output", str(tmp_path / "o.avi")) == 2
    assert "cannot open video file" in caplog.text


class FakeCamera:
    """Stands in for cv2.VideoCapture(0): a few frames, then the stream ends."""

    def __init__(self, source, frames: int = 3, opened: bool = True) -> None:
        self.source = source
        self.remaining = frames
        self.opened = opened

    def isOpened(self) -> bool:  # noqa: N802  (OpenCV's name)
        return self.opened

    def read(self):
        if self.remaining == 0:
            return False, None
        self.remaining -= 1
        return True, _picture(self.remaining)

    def get(self, prop: int) -> float:
        return 0.0  # cameras often report no FPS and no frame count

    def release(self) -> None:
        self.remaining = 0


def test_webcam_with_a_fake_camera(monkeypatch, tmp_path, caplog):
    real_capture = cv2.VideoCapture
    sources = []
    monkeypatch.setattr(cv2, "VideoCapture", lambda source: sources.append(source) or FakeCamera(source))
    output = tmp_path / "webcam.avi"
    assert run_demo("--webcam", "--camera", "1", "--output", str(output), "--confidence-threshold", "0.9") == 0
    assert sources == [1]
    monkeypatch.setattr(cv2, "VideoCapture", real_capture)
    assert _frame_count(output) == 3

    monkeypatch.setattr(cv2, "VideoCapture", lambda source: FakeCamera(source, opened=False))
    with caplog.at_level(logging.ERROR):
        assert run_demo("--webcam", "--output", str(tmp_path / "none.avi")) == 2
    assert "cannot open camera 0" in caplog.text


def test_video_codec_falls_back_when_the_preferred_one_is_missing(monkeypatch, tmp_path, caplog):
    real_writer = cv2.VideoWriter
    tried = []

    def writer_without_avc1(path, fourcc, fps, size, is_color):
        tried.append(fourcc)
        if fourcc == cv2.VideoWriter_fourcc(*"XVID"):
            return real_writer()  # an unopened writer: this codec "is missing"
        return real_writer(path, fourcc, fps, size, is_color)

    monkeypatch.setattr(cv2, "VideoWriter", writer_without_avc1)
    path = str(tmp_path / "fallback.avi")
    with caplog.at_level(logging.WARNING):
        writer = demo_cli.open_video_writer(path, 5.0, (32, 24), preferred="XVID")
    writer.write(np.zeros((24, 32, 3), np.uint8))
    writer.release()
    assert tried[:2] == [cv2.VideoWriter_fourcc(*"XVID"), cv2.VideoWriter_fourcc(*"MJPG")]
    assert "XVID is not available" in caplog.text and os.path.getsize(path) > 0
    with pytest.raises(demo_cli.DemoError, match="must end in one of"):
        demo_cli.open_video_writer(str(tmp_path / "clip.gif"), 5.0, (32, 24), preferred=None)


def test_output_without_extension_is_a_folder_and_a_bad_extension_is_refused(tmp_path):
    files = [str(tmp_path / "a.jpg")]
    assert demo_cli.image_output_paths(files, str(tmp_path / "out")) == [str(tmp_path / "out" / "a.jpg")]
    assert demo_cli.image_output_paths(files, str(tmp_path / "b.png")) == [str(tmp_path / "b.png")]
    with pytest.raises(demo_cli.DemoError, match="image extension"):
        demo_cli.image_output_paths(files, str(tmp_path / "b.txt"))
