"""Salience DETR (CVPR 2024) as a Detectron2 project.

Importing the package makes detectron2 0.6 usable on current libraries (``compat``) and, when detectron2 is
installed, registers the ``SalienceDETR`` meta-architecture and the built-in datasets. ``salience_detr.layers``
needs torch alone, so the operator imports and tests on machines without detectron2.
"""

import importlib.util

from . import compat

__version__ = "0.1.0"

compat.apply()

if importlib.util.find_spec("detectron2") is not None:
    from . import data, modeling  # noqa: F401  (registers datasets and the meta-architecture)
