"""Salience DETR (CVPR 2024) as a Detectron2 project.

Importing the package changes no other library. When detectron2 is installed it checks that detectron2 is usable
(``compat``; the project's own install is ``salience_detr/tools/install_detectron2.py``) and registers the
``SalienceDETR`` meta-architecture and the built-in datasets. ``salience_detr.layers``
needs torch alone, so the operator imports and tests on machines without detectron2.
"""

import importlib.util

from . import compat

__version__ = "0.1.0"

if importlib.util.find_spec("detectron2") is not None:
    compat.check_detectron2()
    with compat.silence_jit_deprecation():
        from . import data, modeling  # noqa: F401  (registers datasets and the meta-architecture)
