"""The compatibility layer keeps detectron2 0.6 usable on current libraries."""

import numpy as np
import pytest
from PIL import Image

import salience_detr
from salience_detr import compat

detectron2 = pytest.importorskip("detectron2")


def test_removed_library_names_are_restored():
    assert np.int is int and np.float is float and np.object is object
    assert Image.LINEAR == Image.Resampling.BILINEAR
    assert Image.ANTIALIAS == Image.Resampling.LANCZOS


def test_apply_is_idempotent():
    compat.apply()
    compat.apply()
    assert np.str is str


def test_detectron2_modules_that_import_c_load():
    import detectron2.engine  # noqa: F401
    import detectron2.evaluation  # noqa: F401
    import detectron2.layers  # noqa: F401
    import detectron2.modeling  # noqa: F401


@pytest.mark.skipif(compat.detectron2_has_compiled_ops(), reason="a compiled detectron2 is installed")
def test_missing_compiled_op_names_itself_and_the_fix():
    from detectron2 import _C

    with pytest.raises(compat.MissingDetectron2Op, match="nms_rotated.*build detectron2 from source"):
        _C.nms_rotated
    assert not hasattr(_C, "__path__")
    assert "pure-Python" in _C.get_compiler_version()


def test_model_zoo_configs_resolve():
    from detectron2 import model_zoo

    cfg = model_zoo.get_config("common/train.py")
    assert "max_iter" in cfg.train


def test_package_version():
    assert salience_detr.__version__


def test_detectron2_import_prints_no_jit_deprecation_warning():
    import subprocess
    import sys

    code = "import salience_detr, detectron2.modeling.box_regression"
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
