"""The configs shipped with the package, by name, as detectron2's ``model_zoo.get_config`` gives its own.

``configs/`` installs as the package ``salience_detr.configs`` (copied into wheels, the checkout's folder in
editable installs), so code outside the checkout loads a config by its path relative to ``configs/``::

    from salience_detr.config import get_config
    cfg = get_config("salience_detr/salience_detr_r50_4scale_12ep.py", ["train.max_iter=100"])

The result is the plain LazyConfig; ``load_config(get_config_file(name))`` also registers its datasets for
training, as ``train_net.py`` does.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salience_detr.config.loading import load_raw_config

CONFIG_PACKAGE = "salience_detr.configs"

__all__ = ["config_root", "get_config", "get_config_file", "list_configs"]


def config_root() -> Path:
    """The folder of the installed ``salience_detr.configs`` package."""
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{CONFIG_PACKAGE} is not installed, so the packaged configs cannot be found; "
            "reinstall the project (pip install -e . --no-build-isolation, or pip install .)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def list_configs(folder: str = "") -> list[str]:
    """Names (paths relative to ``configs/``) of the config files under ``folder``, e.g. ``"salience_detr"``."""
    root = config_root()
    return sorted(
        path.relative_to(root).as_posix()
        for path in (root / folder).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    )


def get_config_file(name: str) -> str:
    """Absolute path of the packaged config ``name`` (relative to ``configs/``; ``.py`` may be left out)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(
            f"config name {name!r} must be a path relative to configs/, e.g. 'models/salience_detr_r50.py'"
        )
    if not name.endswith(".py"):
        name += ".py"
    path = config_root() / name
    if not path.is_file():
        close = difflib.get_close_matches(name, list_configs(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "list_configs() gives the names"
        raise FileNotFoundError(f"no packaged config {name!r} under {config_root()}; {hint}")
    return str(path)


def get_config(name: str, overrides: Sequence[str] = ()) -> Any:
    """The packaged LazyConfig ``name`` with ``key=value`` overrides applied as everywhere else: strictly, so a
    mistyped key is an error (``salience_detr.config.overrides``)."""
    return load_raw_config(get_config_file(name), overrides)
