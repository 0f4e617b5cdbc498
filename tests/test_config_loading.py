"""salience_detr.config.load_config: the one loader of train_net and every tool.

A config written outside configs/ with absolute imports loads as one inside does; training resolves
model.num_classes from the data; inference without the data takes the classes from the checkpoint, and a
checkpoint whose classes do not fit the config stops before any model is built.
"""

from pathlib import Path

import pytest
import torch
from detectron2.data import MetadataCatalog
from omegaconf import DictConfig
from own_dataset import THREE_CLASSES, dataset_overrides, write_three_class_split, write_user_config

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.config import ConfigOverrideError, load_config
from salience_detr.data import DatasetPathError, SyntheticSpec
from salience_detr.engine import CheckpointMismatchError
from salience_detr.engine.weights import checkpoint_metadata

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(num_train=4, num_val=2, image_size=64, max_objects=2, min_object_size=8, max_object_size=32)
ENTRY_POINTS = [
    "train_net.py",
    "demo/demo.py",
    "demo/predictor.py",
    "salience_detr/tools/export_onnx.py",
    "salience_detr/tools/benchmark.py",
    "salience_detr/tools/quickstart.py",
    "salience_detr/tools/roi_ablation.py",
    "salience_detr/tools/convert_official.py",
    "salience_detr/tools/_dataloader_view.py",
    "salience_detr/tools/check_dataset.py",
    "salience_detr/tools/gpu_check.py",
]


@pytest.fixture(scope="module")
def three_class_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("three_classes")
    for split in ("train", "val"):
        write_three_class_split(root, split, SPEC)
    return root


def _checkpoint_with_classes(path: Path, thing_classes, num_classes=None) -> str:
    metadata = checkpoint_metadata(list(thing_classes), num_classes or len(thing_classes), "x_train", "SalienceDETR")
    torch.save({"model": {}, "metadata": metadata}, path)
    return str(path)


def test_config_outside_configs_with_absolute_imports(tmp_path):
    """The imported dicts are DictConfigs (attribute access and assignment work), as with relative imports."""
    path = tmp_path / "mine.py"
    path.write_text(
        "from configs.salience_detr.salience_detr_tiny_synthetic import dataloader, datasets, model, train\n"
        "from configs.common.optim import AdamW as optimizer\n"
        "train.max_iter = 7\n"
        "optimizer.lr = 1e-5\n"
    )
    cfg = load_config(str(path), ["train.log_period=3"])
    assert isinstance(cfg.train, DictConfig) and isinstance(cfg.optimizer, DictConfig)
    assert (cfg.train.max_iter, cfg.train.log_period, cfg.train.device, cfg.optimizer.lr) == (7, 3, "cpu", 1e-5)
    assert cfg.model.num_classes == 5 and cfg.model.embed_dim == 128  # the tiny config's own assignments ran


def test_overrides_are_strict(tmp_path):
    with pytest.raises(ConfigOverrideError, match="max_iter"):
        load_config(str(REPO / "configs/salience_detr/salience_detr_tiny_synthetic.py"), ["train.max_itr=2"])


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(str(tmp_path / "nope.py"))


def test_training_resolves_num_classes_from_the_json(tmp_path, three_class_root):
    cfg = load_config(str(write_user_config(tmp_path)), dataset_overrides(three_class_root, "loadtrain"))
    assert cfg.model.num_classes == len(THREE_CLASSES)
    assert cfg.dataloader.train.dataset.names == "loadtrain_train"


def test_training_without_the_dataset_stops_naming_the_key(tmp_path):
    with pytest.raises(DatasetPathError, match="no json_file given"):
        load_config(str(write_user_config(tmp_path)), ["datasets.train.name=nopaths_train"])


def test_inference_without_the_dataset_takes_classes_from_the_checkpoint(tmp_path):
    checkpoint = _checkpoint_with_classes(tmp_path / "model.pth", THREE_CLASSES)
    overrides = ["datasets.val.name=noinfer_val", "datasets.train.name=noinfer_train"]
    overrides.append(f"train.init_checkpoint={checkpoint}")
    cfg = load_config(str(write_user_config(tmp_path)), overrides, inference=True)
    assert cfg.model.num_classes == 3
    assert MetadataCatalog.get("noinfer_val").thing_classes == list(THREE_CLASSES)


def test_inference_without_dataset_or_checkpoint_names_the_fixes(tmp_path):
    # names no other test registers (tests/test_configs.py registers the defaults custom_train/custom_val)
    overrides = ["datasets.train.name=nothing_train", "datasets.val.name=nothing_val"]
    with pytest.raises(ValueError, match=r"train.init_checkpoint=.*model.num_classes=N"):
        load_config(str(write_user_config(tmp_path)), overrides, inference=True)


def test_checkpoint_of_other_classes_stops_naming_both_numbers(tmp_path, three_class_root):
    checkpoint = _checkpoint_with_classes(tmp_path / "five.pth", ["a", "b", "c", "d", "e"])
    overrides = dataset_overrides(three_class_root, "loadmismatch") + [f"train.init_checkpoint={checkpoint}"]
    with pytest.raises(CheckpointMismatchError, match=r"trained on 5 classes .* model.num_classes=3"):
        load_config(str(write_user_config(tmp_path)), overrides, inference=True)


def test_inference_with_the_dataset_uses_its_classes(tmp_path, three_class_root):
    checkpoint = _checkpoint_with_classes(tmp_path / "model.pth", THREE_CLASSES)
    overrides = dataset_overrides(three_class_root, "loadinfer") + [f"train.init_checkpoint={checkpoint}"]
    cfg = load_config(str(write_user_config(tmp_path)), overrides, inference=True)
    assert cfg.model.num_classes == 3
    assert MetadataCatalog.get("loadinfer_val").thing_classes == list(THREE_CLASSES)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_entry_points_load_configs_through_load_config(entry_point):
    """No entry point keeps its own copy of loading, overriding or registering a config's datasets."""
    source = (REPO / entry_point).read_text()
    for copy in ("LazyConfig.load(", "LazyConfig.apply_overrides(", "instantiate(registration)"):
        assert copy not in source, f"{entry_point} loads configs itself ({copy}); use salience_detr.config.load_config"
    assert "load_config" in source or "load_model_for_inference" in source
