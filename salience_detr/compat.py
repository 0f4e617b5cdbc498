"""Keep detectron2 0.6 importable on current numpy, Pillow and setuptools.

The only detectron2 on PyPI is the 0.6 source release without its C++ sources, installed as pure Python
(``python -m salience_detr.tools.install_detectron2``). It still uses names that newer libraries removed and
imports ``detectron2._C`` in four modules whose ops this project never calls (deformable convolution, rotated
boxes, rotated RoIAlign, the fast COCO evaluation). ``apply()`` restores each missing name and registers a
placeholder ``_C`` that fails with a clear message, only where the real thing is absent, so a detectron2
built from source is left untouched. It also silences the deprecation warning that torch >= 2.9 prints for each
``@torch.jit.script`` in detectron2's box regression module (twice per process, on every command). It runs once, from ``salience_detr/__init__.py``, before any detectron2
import.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
import types
import warnings

_NUMPY_ALIASES = {"int": int, "float": float, "str": str, "object": object, "complex": complex, "bool": bool}
_PIL_ALIASES = {"LINEAR": "BILINEAR", "ANTIALIAS": "LANCZOS", "CUBIC": "BICUBIC"}
_C_INFO = "none (pure-Python detectron2: its compiled ops were not built)"


class MissingDetectron2Op(AttributeError):
    """Raised when code reaches a compiled detectron2 op that this installation does not have."""


def _restore_numpy_aliases() -> None:
    import numpy as np

    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def _restore_pil_aliases() -> None:
    from PIL import Image

    for old, new in _PIL_ALIASES.items():
        if not hasattr(Image, old):
            setattr(Image, old, getattr(Image.Resampling, new))


def _resource_filename(package: str, resource: str) -> str:
    return str(importlib.resources.files(package).joinpath(resource))


def _install_pkg_resources_shim() -> None:
    """detectron2.model_zoo needs only ``pkg_resources.resource_filename``; setuptools 82 dropped the module."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    shim = types.ModuleType("pkg_resources")
    shim.__doc__ = "Minimal stand-in registered by salience_detr.compat (only resource_filename)."
    shim.resource_filename = _resource_filename
    sys.modules["pkg_resources"] = shim


def _missing_op(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise MissingDetectron2Op(
        f"detectron2._C.{name} is not available: this detectron2 was installed without its compiled ops. "
        "Salience DETR does not need them; if your code does, build detectron2 from source "
        "(pip install 'git+https://github.com/facebookresearch/detectron2.git')."
    )


def _install_detectron2_c_placeholder() -> None:
    if importlib.util.find_spec("detectron2") is None:
        return
    if "detectron2._C" in sys.modules or importlib.util.find_spec("detectron2._C") is not None:
        return
    placeholder = types.ModuleType("detectron2._C")
    placeholder.__doc__ = "Placeholder registered by salience_detr.compat: detectron2 has no compiled ops here."
    placeholder.__getattr__ = _missing_op
    placeholder.get_compiler_version = lambda: _C_INFO
    placeholder.get_cuda_version = lambda: _C_INFO
    placeholder.has_cuda = lambda: False
    placeholder.IS_PLACEHOLDER = True
    sys.modules["detectron2._C"] = placeholder


def detectron2_has_compiled_ops() -> bool:
    """True when detectron2._C is the real extension (then e.g. the fast COCO evaluation is usable)."""
    module = sys.modules.get("detectron2._C")
    if module is None:
        if importlib.util.find_spec("detectron2") is None:
            return False
        return importlib.util.find_spec("detectron2._C") is not None
    return not getattr(module, "IS_PLACEHOLDER", False)


def _silence_detectron2_jit_warning() -> None:
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning, module=r"torch\.jit\._script"
    )


def apply() -> None:
    """Restore what detectron2 0.6 needs; every step is a no-op where the name already exists."""
    _silence_detectron2_jit_warning()
    _restore_numpy_aliases()
    _restore_pil_aliases()
    _install_pkg_resources_shim()
    _install_detectron2_c_placeholder()
