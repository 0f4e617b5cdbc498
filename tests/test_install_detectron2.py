"""The installer's source fixes and its install-state check (no download: a miniature release tree)."""

import pytest

from salience_detr.tools import install_detectron2 as installer

RELEASE_SNIPPETS = {
    "data/transforms/transform.py": "from PIL import Image\n\ndef f(interp=Image.LINEAR):\n    return interp\n",
    "model_zoo/model_zoo.py": (
        "import os\nimport pkg_resources\n\n\ndef get_config_file(config_path):\n"
        '    cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", '
        "config_path)\n    )\n    return cfg_file\n"
    ),
    "structures/masks.py": "import numpy as np\nm = np.zeros(2).astype(np.bool)\nk = np.int32(np.int(1.0))\n",
    "export/__init__.py": "from .api import *\n",
}


def make_release(root):
    package = root / "detectron2"
    for relative, text in RELEASE_SNIPPETS.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    return package


def test_patch_sources_fixes_removed_names(tmp_path):
    package = make_release(tmp_path)
    installer.patch_sources(package)
    assert "Image.BILINEAR" in (package / "data/transforms/transform.py").read_text()
    zoo = (package / "model_zoo/model_zoo.py").read_text()
    assert "pkg_resources" not in zoo and 'importlib.resources.files("detectron2.model_zoo")' in zoo
    masks = (package / "structures/masks.py").read_text()
    assert ".astype(bool)" in masks and "np.int32(int(1.0))" in masks
    assert "caffe2" in (package / "export/__init__.py").read_text()
    placeholder = (package / "_C.py").read_text()
    compile(placeholder, "_C.py", "exec")
    assert "class MissingCompiledOp(AttributeError)" in placeholder


def test_patch_sources_refuses_a_different_release(tmp_path):
    package = make_release(tmp_path)
    (package / "data/transforms/transform.py").write_text("def f(interp=2):\n    return interp\n")
    with pytest.raises(SystemExit, match="transform.py does not match pb1-detectron2==0.6"):
        installer.patch_sources(package)


def test_this_environment_has_the_current_install_or_another_detectron2():
    pytest.importorskip("detectron2")
    assert installer.installed_state() in ("current", "other")
    assert installer.VERSION.endswith(f"+salience.{installer.PATCH_LEVEL}")


class FakeDistribution:
    def __init__(self, version, summary):
        self.version, self.metadata = version, {"Summary": summary}


OLD_SUMMARY = "detectron2 0.6 (pure Python, installed by salience_detr.tools.install_detectron2)"


@pytest.mark.parametrize(
    ("version", "summary", "state"),
    [
        (installer.VERSION, f"patched ({installer.MARK})", "current"),
        ("0.6", OLD_SUMMARY, "outdated"),  # the unpatched install of earlier versions of this project
        ("0.6+salience.0", f"patched ({installer.MARK})", "outdated"),
        ("0.6", "Detectron2 is FAIR's next-generation research platform", "other"),  # built from source
    ],
)
def test_installed_state_reads_the_version_mark(monkeypatch, version, summary, state):
    monkeypatch.setattr(installer.importlib.metadata, "distribution", lambda name: FakeDistribution(version, summary))
    assert installer.installed_state() == state


@pytest.mark.parametrize(
    ("state", "builds"), [("current", False), ("other", False), ("outdated", True), ("absent", True)]
)
def test_install_upgrades_only_its_own_older_install(monkeypatch, tmp_path, state, builds):
    calls = []
    monkeypatch.setattr(installer, "installed_state", lambda: state)
    monkeypatch.setattr(installer, "build_wheel", lambda wheel_dir: calls.append("build") or tmp_path / "d2.whl")
    monkeypatch.setattr(installer, "_pip", lambda *args: calls.append(args[0]))
    installer.install()
    assert calls == (["build", "install"] if builds else [])
