"""One way to load a config for use: strict overrides, the config's datasets registered and checked, classes resolved.

Training and every tool that builds a model from a config call :func:`load_config`, so all of them see the config
as training does. Inference (``inference=True``) can also run where the datasets are not available: the class
names and count then come from the checkpoint's metadata, which training writes into every checkpoint.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.machinery
import importlib.util
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from detectron2.config import LazyConfig, instantiate
from detectron2.config.lazy import _CFG_PACKAGE_NAME
from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import DictConfig

from salience_detr.config.overrides import apply_overrides
from salience_detr.data import DatasetPathError, dataset_info
from salience_detr.data.datasets import check_registered_paths
from salience_detr.engine.checkpoint import read_checkpoint_metadata
from salience_detr.engine.weights import CheckpointMismatchError, checkpoint_metadata

logger = logging.getLogger(__name__)

# absolute imports of these packages inside a config are read as config files (see lazy_config_imports)
CONFIG_PACKAGES = ("configs", "salience_detr.configs")

__all__ = [
    "check_config_datasets",
    "config_dataset_names",
    "load_config",
    "load_raw_config",
    "prepare_for_inference",
    "register_config_datasets",
    "resolve_num_classes",
    "training_metadata",
]


def load_config(
    path: str, overrides: Sequence[str] = (), *, inference: bool = False, checkpoint: str | None = None
) -> Any:
    """The config at ``path`` with ``overrides`` applied, its datasets registered and ``model.num_classes`` set.

    Training (``inference=False``) needs the datasets. Inference falls back to the metadata of ``checkpoint``
    (default: ``train.init_checkpoint``) for datasets that are not available, and checks that the checkpoint's
    classes fit the config before any model is built.
    """
    cfg = load_raw_config(path, overrides)
    if not inference:
        register_config_datasets(cfg)
        check_config_datasets(cfg)
        resolve_num_classes(cfg)
        return cfg
    if checkpoint is None:
        checkpoint = cfg.get("train", {}).get("init_checkpoint", "")
    prepare_for_inference(cfg, read_checkpoint_metadata(checkpoint) if checkpoint else None, checkpoint)
    return cfg


def load_raw_config(path: str, overrides: Sequence[str] = ()) -> Any:
    """The config at ``path`` with ``overrides`` applied strictly, and nothing else: no dataset is registered or read
    (for a value wanted before the real load, such as ``train.device`` in the launching process)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist; pass the path of a LazyConfig .py file")
    with lazy_config_imports():
        cfg = LazyConfig.load(path)
    return apply_overrides(cfg, list(overrides))


def _config_file_of(name: str) -> str | None:
    """The .py file behind an absolute import of one of ``CONFIG_PACKAGES``, or None for any other import."""
    if not any(name == package or name.startswith(package + ".") for package in CONFIG_PACKAGES):
        return None
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


@contextlib.contextmanager
def lazy_config_imports() -> Iterator[None]:
    """Let a config outside ``configs/`` import the project's configs absolutely (``from configs.common.train
    import train``) and get what a relative import inside ``configs/`` gets: the file run as a config, its dicts
    as ``DictConfig``, so ``train.max_iter = 100`` works. A plain Python import would give a plain dict, and
    configs that set attributes on imported dicts would fail."""
    plain_import = builtins.__import__

    def config_import(name, globals=None, locals=None, fromlist=(), level=0):
        path = _config_file_of(name) if level == 0 and fromlist else None
        if path is None:
            return plain_import(name, globals, locals, fromlist, level)
        # a package name under detectron2's config prefix makes the file's own relative imports work as in configs/
        spec = importlib.machinery.ModuleSpec(f"{_CFG_PACKAGE_NAME}{uuid.uuid4().hex[:8]}.{name}", None, origin=path)
        module = importlib.util.module_from_spec(spec)
        module.__file__ = path
        with open(path) as file:
            exec(compile(file.read(), path, "exec"), module.__dict__)
        for key in fromlist:
            value = module.__dict__.get(key)
            if isinstance(value, dict):
                module.__dict__[key] = DictConfig(value, flags={"allow_objects": True})
        return module

    builtins.__import__ = config_import
    try:
        yield
    finally:
        builtins.__import__ = plain_import


def register_config_datasets(cfg: Any) -> None:
    """Register the datasets a config declares in its ``datasets`` block (before any model work)."""
    for registration in cfg.get("datasets", {}).values():
        instantiate(registration)


def config_dataset_names(cfg: Any, split: str) -> list[str]:
    """Dataset names of ``dataloader.<split>`` as a list (empty when the config has no such loader)."""
    names = cfg.get("dataloader", {}).get(split, {}).get("dataset", {}).get("names")
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def check_config_datasets(cfg: Any) -> None:
    """Fail on a missing annotation file or image folder now, not after the model is built."""
    check_registered_paths(config_dataset_names(cfg, "train") + config_dataset_names(cfg, "test"))


def resolve_num_classes(cfg: Any) -> None:
    """Fill ``model.num_classes`` from the training data when it is None; stop when the data has more classes."""
    names = config_dataset_names(cfg, "train")
    if not names:
        if cfg.model.get("num_classes") is None:
            raise ValueError("model.num_classes is None and the config has no training data; set model.num_classes=N")
        return
    first = names[0]
    dataset_classes = dataset_info(first)["num_classes"]
    if cfg.model.get("num_classes") is None:
        cfg.model.num_classes = dataset_classes
        logger.info("model.num_classes = %d, from dataset %s", dataset_classes, first)
    elif dataset_classes > cfg.model.num_classes:
        raise ValueError(
            f"Dataset {first!r} has {dataset_classes} categories but model.num_classes={cfg.model.num_classes}. "
            f"Set model.num_classes={dataset_classes} (or None to take it from the dataset)."
        )


def training_metadata(cfg: Any, config_file: str = "") -> dict[str, Any]:
    """What training's checkpoints record: the first training dataset's class names, its name, the model."""
    first = config_dataset_names(cfg, "train")[0]
    target = cfg.model.get("_target_")
    return checkpoint_metadata(
        dataset_info(first)["thing_classes"],
        cfg.model.num_classes,
        first,
        getattr(target, "__name__", str(target)),
        config_file,
    )


def _register_what_exists(cfg: Any) -> None:
    """Register each of the config's datasets whose files exist; the others are left out (inference only)."""
    for key, registration in cfg.get("datasets", {}).items():
        try:
            instantiate(registration)
        except DatasetPathError as error:
            logger.info("datasets.%s is not available (%s); class names come from the checkpoint", key, error)


def _available(name: str) -> bool:
    if name not in DatasetCatalog.list():
        return False
    try:
        check_registered_paths([name])
    except DatasetPathError:
        return False
    return True


def prepare_for_inference(cfg: Any, metadata: dict[str, Any] | None, checkpoint: str = "") -> None:
    """Resolve ``model.num_classes`` and the test dataset's class names from the data, else the checkpoint."""
    _register_what_exists(cfg)
    first_train = config_dataset_names(cfg, "train")[:1]
    if first_train and _available(first_train[0]):
        resolve_num_classes(cfg)
    elif cfg.model.get("num_classes") is None:
        if not metadata:
            raise ValueError(
                "model.num_classes is None and the config's training dataset is not available to count its classes. "
                "Pass the checkpoint written by train_net.py (train.init_checkpoint=..., it records its classes), "
                "the dataset paths (datasets.<split>.json_file=... datasets.<split>.image_root=...), "
                "or model.num_classes=N."
            )
        cfg.model.num_classes = metadata["num_classes"]
    if metadata and metadata["num_classes"] != cfg.model.num_classes:
        raise CheckpointMismatchError(
            f"{checkpoint} was trained on {metadata['num_classes']} classes ({metadata.get('dataset')}) but the "
            f"config has model.num_classes={cfg.model.num_classes}. Use the config it was trained with, or set "
            f"model.num_classes={metadata['num_classes']}."
        )
    for name in config_dataset_names(cfg, "test") if metadata else ():
        known = MetadataCatalog.get(name).get("thing_classes", None)
        if not known and not _available(name):
            MetadataCatalog.get(name).set(thing_classes=list(metadata["thing_classes"]))
        elif known and list(known) != list(metadata["thing_classes"]):
            logger.warning(
                "Dataset %s names its classes %s, the checkpoint %s; detections are labelled with the dataset's",
                name,
                list(known),
                list(metadata["thing_classes"]),
            )
