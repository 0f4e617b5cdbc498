"""Checks on the detectron2 this project runs on; nothing here changes another library.

The project installs detectron2 0.6 with ``salience_detr/tools/install_detectron2.py``, which fixes at install time
what current numpy, Pillow and setuptools removed and ships a placeholder ``detectron2/_C.py`` for the compiled
ops that a pure-Python install lacks. A detectron2 built from source has the real ``_C`` extension. What remains
for a detectron2 the project did not install (or an earlier, unpatched install of it) is one case known to fail:
a pure-Python 0.6 with no ``detectron2._C`` at all, which dies deep inside detectron2 on ``Image.LINEAR`` or
``from detectron2 import _C``. ``check_detectron2`` turns that into an error that names the fix.
``silence_jit_deprecation`` hides, only while the package imports detectron2, the warning torch >= 2.9 prints
because detectron2 and fvcore call ``torch.jit.script`` at import.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

INSTALLER = Path(__file__).resolve().parent / "tools" / "install_detectron2.py"


def _c_spec():
    if importlib.util.find_spec("detectron2") is None:
        return None
    return importlib.util.find_spec("detectron2._C")


def detectron2_has_compiled_ops() -> bool:
    """True when detectron2._C is the compiled extension (then e.g. the fast COCO evaluation is usable)."""
    spec = _c_spec()
    return spec is not None and str(spec.origin).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def check_detectron2() -> None:
    """Fail early, naming the fix, when detectron2 is a pure-Python 0.6 without the install-time fixes."""
    if importlib.util.find_spec("detectron2") is None or _c_spec() is not None:
        return
    import detectron2

    raise ImportError(
        f"detectron2 at {Path(detectron2.__file__).parent} has no detectron2._C: it is a pure-Python detectron2 "
        "without the fixes for current numpy / Pillow / setuptools (e.g. installed by an earlier version of this "
        f"project). Reinstall it with: {sys.executable} {INSTALLER} --force "
        "(or build detectron2 from source)."
    )


@contextlib.contextmanager
def silence_jit_deprecation() -> Iterator[None]:
    """Hide torch's ``jit.script`` deprecation warning while detectron2 and fvcore script functions at import.

    The filter lives only inside this block (``warnings.catch_warnings``), so callers' warning settings stay as
    they were.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield
