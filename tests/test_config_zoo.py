"""Packaged configs by name (salience_detr.config.get_config), from any working directory."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from salience_detr.config import get_config, get_config_file, list_configs  # noqa: E402
from salience_detr.config.zoo import config_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_config_root_is_the_installed_configs_folder():
    root = config_root()
    assert (root / "common" / "train.py").is_file()
    assert "salience_detr/salience_detr_tiny_synthetic.py" in list_configs()
    assert all(name.startswith("salience_detr/") for name in list_configs("salience_detr"))
    assert not any(name.endswith("__init__.py") for name in list_configs())


def test_every_experiment_resolves_by_name():
    names = list_configs("salience_detr")
    assert len(names) == len(list((REPO / "configs" / "salience_detr").glob("*.py")))
    for name in names:
        assert Path(get_config_file(name)).samefile(REPO / "configs" / name)
    assert get_config_file("models/salience_detr_r50") == get_config_file("models/salience_detr_r50.py")


def test_get_config_applies_overrides_outside_the_checkout(tmp_path):
    code = (
        "from salience_detr.config import get_config\n"
        "cfg = get_config('salience_detr/salience_detr_tiny_synthetic.py', ['train.max_iter=7'])\n"
        "print(cfg.train.max_iter, cfg.model.num_classes is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["7", "True"]


def test_get_config_overrides_are_strict_and_touch_no_dataset():
    """A mistyped key stops, as in train_net; a dataset path that does not exist is not looked at (raw config)."""
    from salience_detr.config.overrides import ConfigOverrideError

    with pytest.raises(ConfigOverrideError, match="Did you mean train.max_iter"):
        get_config("salience_detr/salience_detr_tiny_synthetic.py", ["train.max_itr=2"])
    cfg = get_config("salience_detr/salience_detr_r50_4scale_12ep.py", ["train.device=cpu"])
    assert cfg.train.device == "cpu"


def test_wrong_names_say_what_exists():
    with pytest.raises(FileNotFoundError, match="did you mean salience_detr/salience_detr_r50_4scale_12ep.py"):
        get_config_file("salience_detr/salience_detr_r50_4scale_12p.py")
    with pytest.raises(ValueError, match="relative to configs/"):
        get_config_file("../setup.py")
    with pytest.raises(ValueError, match="relative to configs/"):
        get_config(str(REPO / "configs" / "models" / "salience_detr_r50.py"))
