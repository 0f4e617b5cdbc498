"""Every config under configs/ loads, instantiates what it defines, and survives LazyConfig.save + load;
the common optimizer groups, schedule and the custom-dataset config behave as documented."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_SPEC
from detectron2.config import LazyConfig, instantiate

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.data import DatasetPathError, SyntheticSpec
from salience_detr.engine import detr_param_groups

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(str(p.relative_to(CONFIG_ROOT)) for p in CONFIG_ROOT.rglob("*.py") if p.name != "__init__.py")


def _load(relative: str):
    return LazyConfig.load(str(CONFIG_ROOT / relative))


MODEL_CONFIGS = [relative for relative in ALL_CONFIGS if "model" in LazyConfig.load(str(CONFIG_ROOT / relative))]


def _save_and_reload(cfg, folder):
    """Save, reload and save again: the two YAML files must match and no pickle fallback may be written."""
    LazyConfig.save(cfg, str(folder / "saved.yaml"))
    reloaded = LazyConfig.load(str(folder / "saved.yaml"))
    LazyConfig.save(reloaded, str(folder / "resaved.yaml"))
    assert (folder / "saved.yaml").read_text() == (folder / "resaved.yaml").read_text()
    assert not list(folder.glob("*.pkl")), "LazyConfig.save fell back to pickle: the config is not serializable"
    return reloaded


@pytest.mark.parametrize("relative", ALL_CONFIGS)
def test_config_round_trips_and_instantiates(relative, tmp_path):
    """Everything but the model is built from the reloaded copy (models: the slow test below)."""
    original = _load(relative)
    assert len(original) > 0, f"{relative} defines nothing"
    cfg = _save_and_reload(original, tmp_path)
    if "optimizer" in cfg:
        cfg.optimizer.params.model = torch.nn.Linear(2, 2)
        assert isinstance(instantiate(cfg.optimizer), torch.optim.Optimizer)
    for name, node in cfg.items():
        if name.startswith("lr_multiplier"):
            assert instantiate(node)(0.5) > 0
    if "dataloader" in cfg:
        for split in ("train", "test"):
            assert callable(instantiate(cfg.dataloader[split].mapper))


@pytest.mark.slow
@pytest.mark.parametrize("relative", MODEL_CONFIGS)
def test_model_config_instantiates_with_its_optimizer(relative, tmp_path):
    cfg = _save_and_reload(_load(relative), tmp_path)
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    if "optimizer" in cfg:
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        grouped = sum(len(g["params"]) for g in optimizer.param_groups)
        assert grouped == len({id(p) for p in model.parameters() if p.requires_grad})


def test_config_discovery_finds_the_common_files():
    assert {"common/train.py", "common/optim.py", "common/schedule.py", "common/data/synthetic.py"} <= set(ALL_CONFIGS)


class _NamedParts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
        self.sampling_offsets = torch.nn.Linear(4, 4)
        self.norm1 = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 2)
        self.tied = self.head  # tied parameters are listed once


def test_optimizer_groups_follow_the_name_rules():
    cfg = _load("common/optim.py")
    model = _NamedParts()
    cfg.AdamW.params.model = model
    optimizer = instantiate(cfg.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert groups == {
        # a norm layer whose name lacks "norm" keeps weight decay, as in the official recipe (docs/model.md#optimizer)
        (1e-5, 1e-4): ["backbone.0.weight", "backbone.1.weight", "sampling_offsets.weight"],
        (1e-5, 0.0): ["backbone.0.bias", "backbone.1.bias", "sampling_offsets.bias"],
        (1e-4, 0.0): ["head.bias", "norm1.bias", "norm1.weight"],
        (1e-4, 1e-4): ["head.weight"],
    }
    frozen = _NamedParts().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        detr_param_groups(frozen, 1e-4, 1e-4)


def test_schedule_warms_up_then_drops_after_epoch_ten():
    cfg = _load("common/schedule.py")
    multiplier = instantiate(cfg.lr_multiplier_12ep)
    total = cfg.lr_multiplier_12ep.scheduler.num_updates
    per_epoch = total // 12
    assert per_epoch == 7330 and cfg.lr_multiplier_12ep.scheduler.milestones == [10 * per_epoch]
    assert multiplier(0.0) == pytest.approx(0.001)
    assert multiplier(1000 / total) == pytest.approx(1.0)
    assert multiplier((10 * per_epoch - 1) / total) == pytest.approx(1.0)
    assert multiplier((10 * per_epoch + 1) / total) == pytest.approx(0.1)
    assert _load("common/schedule.py").lr_multiplier_24ep.scheduler.milestones == [20 * per_epoch]


def _custom_config(tiny_synthetic_cache, split_paths=True):
    cfg = _load("common/data/custom.py")
    folder = tiny_synthetic_cache / SyntheticSpec(**TINY_SPEC).folder_name()
    if split_paths:
        for key, split in (("train", "train"), ("val", "val")):
            cfg.datasets[key].json_file = str(folder / f"{split}.json")
            cfg.datasets[key].image_root = str(folder / split)
    return cfg


def test_custom_dataset_config_trains_from_paths(tiny_synthetic_cache):
    from salience_detr.config import loading

    cfg = _custom_config(tiny_synthetic_cache)
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.train.mapper.update(min_sizes=[64], max_size=100, crop_pre_sizes=[64], crop_size=[40, 60])
    loading.register_config_datasets(cfg)
    cfg.model = {"num_classes": None}
    loading.resolve_num_classes(cfg)
    assert cfg.model.num_classes == 5
    batch = next(iter(instantiate(cfg.dataloader.train)))
    assert len(batch) == 2 and all(max(x["image"].shape[1:]) <= 100 for x in batch)


def test_custom_dataset_config_without_paths_names_the_key(tiny_synthetic_cache):
    from salience_detr.config import loading

    cfg = _custom_config(tiny_synthetic_cache, split_paths=False)
    with pytest.raises(DatasetPathError, match="no json_file given"):
        loading.register_config_datasets(cfg)
    cfg = _custom_config(tiny_synthetic_cache)
    cfg.datasets.val.image_root = "/no/such/folder"
    with pytest.raises(DatasetPathError, match="/no/such/folder"):
        loading.register_config_datasets(cfg)
