"""detectron2 works by itself, and importing salience_detr leaves other libraries as they were."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

import salience_detr
from salience_detr import compat

detectron2 = pytest.importorskip("detectron2")
pure_python_d2 = pytest.mark.skipif(compat.detectron2_has_compiled_ops(), reason="a compiled detectron2 is installed")


def run_python(code, cwd, env=None):
    """Run code in a fresh interpreter of this environment, outside the checkout (no salience_detr on the path)."""
    done = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    return done


def test_detectron2_imports_first_without_salience_detr(tmp_path):
    code = """
        import warnings
        warnings.filterwarnings("ignore", message=r"`torch\\.jit\\.script` is deprecated", category=FutureWarning)
        import sys
        from detectron2.config import LazyConfig
        from detectron2.engine import DefaultTrainer
        import detectron2.evaluation, detectron2.export, detectron2.utils.analysis
        from detectron2.data.transforms import ExtentTransform
        assert "salience_detr" not in sys.modules
        assert ExtentTransform((0, 0, 1, 1), (2, 2)).interp is not None
    """
    done = run_python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_import_leaves_numpy_pil_warnings_and_modules_alone(tmp_path):
    code = """
        import builtins, sys, warnings
        import numpy, PIL.Image, torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import detectron2.engine, detectron2.evaluation, detectron2.modeling, timm
        filters, modules = list(warnings.filters), set(sys.modules)
        import salience_detr
        aliases = ("int", "float", "bool", "object", "str", "complex")
        assert all(vars(numpy).get(n) is not getattr(builtins, n) for n in aliases), "numpy"
        assert not any(hasattr(PIL.Image, n) for n in ("LINEAR", "ANTIALIAS", "CUBIC")), "PIL"
        assert warnings.filters == filters, "warning filters"
        assert "pkg_resources" not in sys.modules
        c_ops = sys.modules.get("detectron2._C")
        assert c_ops is None or c_ops.__file__.startswith(detectron2.__path__[0]), "detectron2._C"
        def made_up(name):  # a module object with no file behind it (extensions' own submodules excepted)
            parent = sys.modules.get(name.rpartition(".")[0])
            return sys.modules[name].__spec__ is None and not getattr(parent, "__file__", "").endswith(".so")
        assert not [n for n in set(sys.modules) - modules if made_up(n)]
    """
    done = run_python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_salience_detr_import_prints_no_jit_deprecation_warning(tmp_path):
    done = run_python("import salience_detr, detectron2.modeling.box_regression", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", ["train_net.py", "demo/demo.py"])
def test_entry_scripts_print_no_jit_deprecation_warning(script):
    """The scripts import salience_detr before detectron2 (an import block of its own, which the import sorter keeps),
    so a user's every command starts without torch's jit.script warnings."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", os.path.join(root, script), "--help"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


@pure_python_d2
def test_missing_compiled_op_names_itself_and_the_fix():
    from detectron2 import _C

    with pytest.raises(_C.MissingCompiledOp, match="nms_rotated.*build detectron2 from source"):
        _ = _C.nms_rotated
    with pytest.raises(AttributeError) as dunder:
        _ = _C.__wrapped__
    assert not isinstance(dunder.value, _C.MissingCompiledOp)
    assert not hasattr(_C, "__path__")
    assert "pure-Python" in _C.get_compiler_version()
    assert not compat.detectron2_has_compiled_ops()


def test_model_zoo_configs_resolve_without_pkg_resources():
    from detectron2 import model_zoo

    assert "max_iter" in model_zoo.get_config("common/train.py").train
    assert model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml").endswith(".yaml")


def test_unpatched_pure_python_detectron2_gets_an_error_naming_the_fix(tmp_path):
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "__init__.py").write_text("__version__ = '0.6'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = run_python("import salience_detr", cwd=tmp_path, env=env)
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "has no detectron2._C" in done.stderr
    assert f"{compat.INSTALLER} --force" in done.stderr and compat.INSTALLER.is_file()


def test_installed_version_matches_the_package():
    assert importlib.metadata.version("salience-detr") == salience_detr.__version__
