"""check_images and ``python -m salience_detr.tools.check_dataset``: missing, corrupt, truncated, wrong-size and
EXIF-rotated files are each counted with examples and the fix, before any model work (train_net included); a
non-JSON annotation file is named with its path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
import train_net
from salience_detr.data import image_check, register_coco_dataset
from salience_detr.data.image_check import (
    ImageCheckError,
    PeerImageCheckError,
    check_images,
    check_images_option,
    check_record,
    checks_images_here,
    peer_failure,
)
from salience_detr.tools import check_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
WIDTH, HEIGHT = 160, 120
EXIF_ORIENTATION = 0x0112
GOOD = ("good_0.jpg", "good_1.png")
BAD = {
    "missing.jpg": "missing",
    "corrupt.jpg": "corrupt",
    "truncated.jpg": "truncated",
    "wrong_size.jpg": "wrong size",
    "rotated.jpg": "EXIF orientation",
}


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _write_images(folder: Path) -> None:
    folder.mkdir()
    _noise(0).save(folder / GOOD[0], quality=95)
    _noise(1).save(folder / GOOD[1])
    (folder / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    _noise(2).save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    _noise(3).save(folder / "wrong_size.jpg", quality=95)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # shown turned clockwise: HEIGHT x WIDTH
    _noise(4).save(folder / "rotated.jpg", quality=95, exif=exif)


def _write_coco(tmp_path: Path, files: list[str], name: str = "annotations.json") -> Path:
    images = []
    for index, file_name in enumerate(files):
        width = WIDTH + 10 if file_name == "wrong_size.jpg" else WIDTH  # the rotated one keeps its stored size
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": HEIGHT})
    annotations = [
        {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
        for i in range(len(files))
    ]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}))
    return path


@pytest.fixture
def broken_dataset(tmp_path) -> tuple[str, Path, Path]:
    """A registered COCO dataset with two good images and one of each problem; (name, json, image folder)."""
    _write_images(tmp_path / "images")
    json_file = _write_coco(tmp_path, [*GOOD, *BAD])
    name = f"check_{tmp_path.name}"
    register_coco_dataset(name, str(json_file), str(tmp_path / "images"))
    return name, json_file, tmp_path / "images"


def _config_file(tmp_path: Path) -> Path:
    """A minimal LazyConfig whose one dataset takes its paths from overrides, as configs/common/data/custom.py."""
    path = tmp_path / "check_config.py"
    path.write_text(
        "from detectron2.config import LazyCall as L\n"
        "from salience_detr.data import register_coco_dataset\n"
        f"datasets = dict(train=L(register_coco_dataset)(name='cfg_{tmp_path.name}', json_file=None, "
        "image_root=None))\n"
        f"dataloader = dict(train=dict(dataset=dict(names='cfg_{tmp_path.name}')))\n"
        "model = dict(num_classes=None)\n"
    )
    return path


def test_every_kind_of_problem_is_counted_with_examples_and_the_fix(broken_dataset):
    name, _, folder = broken_dataset
    with pytest.raises(ImageCheckError) as error:
        check_images(name)
    report = error.value.report
    assert report.checked == report.total == len(GOOD) + len(BAD)
    assert {kind: [Path(f).name for f, _ in found] for kind, found in report.problems.items()} == {
        kind: [file_name] for file_name, kind in BAD.items()
    }
    message = str(error.value)
    assert "5 with problems" in message
    assert "truncated: 1, e.g." in message and "copy them again" in message
    assert f"wrong size: 1, e.g. {folder / 'wrong_size.jpg'} (json 170x120, file 160x120)" in message
    assert "EXIF orientation: 1" in message and "exiftool -Orientation=" in message
    assert "train.check_images=0" in message


def test_exif_is_named_only_when_it_explains_the_size(tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    _noise(5).save(tmp_path / "r.jpg", exif=exif)
    record = {"file_name": str(tmp_path / "r.jpg"), "width": HEIGHT, "height": WIDTH}
    assert check_record(record) is None  # the json describes the upright picture: fine
    assert check_record({**record, "width": 99})[0] == "wrong size"


def test_large_datasets_are_sampled(broken_dataset):
    report = check_images(broken_dataset[0], max_images=3, raise_on_problems=False)
    assert (report.checked, report.total) == (3, 7)
    assert "a random sample of 3 of 7 images" in report.summary()
    again = check_images(broken_dataset[0], max_images=3, raise_on_problems=False)
    assert again.problems == report.problems  # seeded: the same sample every time


def test_cli_reports_and_exits_1_then_0_once_fixed(tmp_path, capsys):
    _write_images(tmp_path / "images")
    image_root = f"datasets.train.image_root={tmp_path / 'images'}"
    for files, expected, folder in (([*GOOD, *BAD], 1, "bad"), (list(GOOD), 0, "fixed")):
        (tmp_path / folder).mkdir()
        json_file = _write_coco(tmp_path / folder, files)
        argv = ["--config-file", str(_config_file(tmp_path / folder)), f"datasets.train.json_file={json_file}"]
        assert check_dataset.main([*argv, image_root]) == expected
    out = capsys.readouterr().out
    assert "corrupt: 1" in out and "Checked all 2 images" in out and "every file exists" in out


def test_train_net_stops_before_the_model_is_built(broken_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(train_net, "prepare_model", lambda cfg: pytest.fail("the model was built"))
    name = broken_dataset[0]
    args = train_net.parse_args(
        [
            "--config-file",
            TINY_CONFIG,
            f"dataloader.train.dataset.names={name}",
            f"dataloader.test.dataset.names={name}",
            f"train.output_dir={tmp_path / 'out'}",
            "train.device=cpu",
        ]
    )
    with pytest.raises(ImageCheckError, match="missing: 1"):
        train_net.main(args)


def test_eval_only_checks_the_test_images_alone(broken_dataset, tmp_path, monkeypatch):
    """Evaluation reads no training image, so broken training files do not stop it; the test set is still checked."""
    monkeypatch.setattr(train_net, "prepare_model", lambda cfg: pytest.fail("the model was built"))
    broken, base = broken_dataset[0], f"dataloader.train.dataset.names={broken_dataset[0]}"
    common = ["--config-file", TINY_CONFIG, "--eval-only", base, "train.init_checkpoint=random", "train.device=cpu"]
    checked = []
    monkeypatch.setattr(train_net, "check_images_on_each_machine", lambda limit, names: checked.extend(names))
    with pytest.raises(pytest.fail.Exception, match="the model was built"):
        train_net.main(train_net.parse_args([*common, f"train.output_dir={tmp_path / 'out'}"]))
    assert broken not in checked and checked


def test_check_images_option_is_validated_and_can_be_turned_off(broken_dataset):
    with pytest.raises(ValueError, match="train.check_images must be a number of images per dataset"):
        check_images_option("all", [broken_dataset[0]])
    assert check_images_option(0, [broken_dataset[0]]) is None
    with pytest.raises(ImageCheckError, match="a random sample of 2 of 7") as error:
        check_images_option(2, [broken_dataset[0], broken_dataset[0]])  # train and test: checked once
    assert error.value.report.datasets == [broken_dataset[0]]


def test_each_machine_checks_once_and_a_failure_stops_every_process(broken_dataset, monkeypatch):
    """Two machines of two processes: only local rank 0 checks; the others learn the failure and stop too."""
    assert [checks_images_here(rank) for rank in range(3)] == [True, False, False]
    failures = ["missing: 1", None, None, "corrupt: 2"]
    message = peer_failure(failures, processes_per_machine=2)
    assert message.startswith("The image check failed on machine 0 (rank 0): missing: 1")
    assert "machine 1 (rank 3): corrupt: 2" in message
    assert peer_failure([None, None], 1) is None
    for name, value in (("get_world_size", 4), ("get_local_size", 2)):
        monkeypatch.setattr(image_check.comm, name, lambda value=value: value)
    gathered = []
    monkeypatch.setattr(image_check.comm, "all_gather", lambda data: gathered.append(data) or [data, None, None, None])
    monkeypatch.setattr(image_check.comm, "get_local_rank", lambda: 0)
    with pytest.raises(ImageCheckError, match="missing: 1"):
        image_check.check_images_on_each_machine(10, [broken_dataset[0]])
    assert "missing: 1" in gathered[0]  # the failure reached the other processes before this one stopped
    monkeypatch.setattr(image_check.comm, "all_gather", lambda data: ["missing: 1", None, data, None])
    monkeypatch.setattr(image_check.comm, "get_local_rank", lambda: 1)
    monkeypatch.setattr(image_check, "check_images", lambda *a, **k: pytest.fail("only local rank 0 checks"))
    with pytest.raises(PeerImageCheckError, match=r"machine 0 \(rank 0\): missing: 1"):
        image_check.check_images_on_each_machine(10, [broken_dataset[0]])
    monkeypatch.setattr(image_check.comm, "all_gather", lambda data: [None, None, data, None])
    assert image_check.check_images_on_each_machine(10, [broken_dataset[0]]) is None


def test_non_json_annotation_file_names_the_path_and_the_fix(tmp_path):
    (tmp_path / "images").mkdir()
    not_json = tmp_path / "instances.json"
    not_json.write_bytes(b"\x89PNG not json at all")
    with pytest.raises(ValueError, match="is not valid JSON") as error:
        register_coco_dataset(f"notjson_{tmp_path.name}", str(not_json), str(tmp_path / "images"))
    assert str(not_json) in str(error.value) and "COCO-format json" in str(error.value)
    results_like = tmp_path / "results.json"
    results_like.write_text("[]")
    with pytest.raises(ValueError, match="holds a JSON list") as error:
        register_coco_dataset(f"list_{tmp_path.name}", str(results_like), str(tmp_path / "images"))
    assert "evaluate_json --json" in str(error.value)


def test_pixels_the_reader_refuses_are_reported(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((HEIGHT, WIDTH), dtype=np.float32)).save(path)
    kind, detail = check_record({"file_name": str(path), "width": WIDTH, "height": HEIGHT})
    assert kind == "unsupported pixels" and "floating-point" in detail
