"""Install detectron2 0.6 as pure Python that works by itself on current numpy, Pillow and setuptools.

PyPI's only detectron2 is ``pb1-detectron2==0.6``: upstream v0.6 without its C++ sources, so its own build fails.
This script downloads that release, fixes in its sources the names newer libraries removed (``np.int``,
``Image.LINEAR``, ``pkg_resources``), makes ``detectron2.export`` import without caffe2, and adds a
``detectron2/_C.py`` whose ops fail with a clear message (this project never calls them). It then builds a wheel
and installs it in one step, so ``import detectron2`` keeps working during an upgrade. The result is marked with
the local version ``0.6+salience.N``: the script replaces an earlier install of its own (an older N, or the
unpatched ``0.6`` of earlier versions), does nothing for the current one and leaves any other detectron2 (e.g.
upstream built from source) alone unless given ``--force``.

Run: ``python salience_detr/tools/install_detectron2.py [--force]`` (needs torch; imports nothing from this
project, so it also repairs an environment where ``import salience_detr`` fails). The module form
``python -m salience_detr.tools.install_detectron2`` does the same once the package imports.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SOURCE_RELEASE = "pb1-detectron2==0.6"
PATCH_LEVEL = 1
VERSION = f"0.6+salience.{PATCH_LEVEL}"
MARK = "installed by salience_detr.tools.install_detectron2"

_BUILD_SCRIPT = f"""\
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{VERSION}",
    description="detectron2 0.6, pure Python, patched for current libraries ({MARK})",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.8",
)
"""

_PLACEHOLDER_C = f'''\
"""Stand-in for detectron2's compiled ops, which this pure-Python install does not have ({MARK}).

Importing it works, so the modules that import ``_C`` load; reaching an op raises ``MissingCompiledOp``.
"""

_INFO = "none (pure-Python detectron2: its compiled ops were not built)"


class MissingCompiledOp(AttributeError):
    """Raised when code reaches a compiled detectron2 op that this installation does not have."""


def get_compiler_version() -> str:
    return _INFO


def get_cuda_version() -> str:
    return _INFO


def has_cuda() -> bool:
    return False


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise MissingCompiledOp(
        f"detectron2._C.{{name}} is not available: this detectron2 was installed without its compiled ops. "
        "Salience DETR does not need them; if your code does, build detectron2 from source "
        "(pip install 'git+https://github.com/facebookresearch/detectron2.git')."
    )
'''

_EXPORT_INIT = '''\
# -*- coding: utf-8 -*-
"""Tracing and scripting helpers; the caffe2 export API only where caffe2 is installed (patched at install)."""

from .flatten import TracingAdapter
from .torchscript import dump_torchscript_IR, scripting_with_instances

try:
    import caffe2.proto.caffe2_pb2  # noqa: F401
except ImportError:
    pass
else:
    from .api import *  # noqa: F401,F403

__all__ = [k for k in globals().keys() if not k.startswith("_")]
'''

# (file under detectron2/, text in release 0.6, replacement, expected number of occurrences)
_EDITS = (
    ("data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR", 1),
    ("model_zoo/model_zoo.py", "import pkg_resources\n", "import importlib.resources\n", 1),
    (
        "model_zoo/model_zoo.py",
        'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'str(importlib.resources.files("detectron2.model_zoo").joinpath(os.path.join("configs", config_path)))',
        1,
    ),
)
_NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|bool|object|str|complex)\b")


def installed_state() -> str:
    """'absent', 'current', 'outdated' (an earlier install by this script) or 'other' (any other detectron2)."""
    try:
        dist = importlib.metadata.distribution("detectron2")
    except importlib.metadata.PackageNotFoundError:
        return "absent" if importlib.util.find_spec("detectron2") is None else "other"
    if MARK not in (dist.metadata["Summary"] or ""):
        return "other"
    return "current" if dist.version == VERSION else "outdated"


def patch_sources(package: Path) -> None:
    """Fix the release's sources in place (``package`` is its detectron2/ folder); fail if they differ from 0.6."""
    for relative, old, new, count in _EDITS:
        path = package / relative
        text = path.read_text()
        if text.count(old) != count:
            sys.exit(
                f"install_detectron2: {path} does not match {SOURCE_RELEASE} ({old!r} expected {count}x); "
                "install detectron2 from source instead."
            )
        path.write_text(text.replace(old, new))
    for path in package.rglob("*.py"):
        text = path.read_text()
        fixed = _NUMPY_ALIAS.sub(r"\1", text)
        if fixed != text:
            path.write_text(fixed)
    (package / "export" / "__init__.py").write_text(_EXPORT_INIT)
    (package / "_C.py").write_text(_PLACEHOLDER_C)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _download_source(workdir: Path) -> Path:
    """Download and unpack the release; returns the folder holding its detectron2/ package."""
    options = ("-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation")
    _pip("download", *options, "-d", str(workdir), SOURCE_RELEASE)
    archives = sorted(workdir.glob("*.tar.gz"))
    if not archives:
        sys.exit(f"install_detectron2: pip downloaded no source archive for {SOURCE_RELEASE}.")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(workdir, filter="data")
    return next(workdir.glob("*/detectron2/__init__.py")).parent.parent


def build_wheel(wheel_dir: Path) -> Path:
    """Download the release, patch it and build its pure-Python wheel into ``wheel_dir`` (also what the GPU
    check's offline bundle carries); returns the wheel's path."""
    with tempfile.TemporaryDirectory(prefix="d2-src-") as tmp:
        source = _download_source(Path(tmp))
        patch_sources(source / "detectron2")
        (source / "setup.py").write_text(_BUILD_SCRIPT)
        for stale in ("setup.cfg", "pyproject.toml"):
            (source / stale).unlink(missing_ok=True)
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(source))
    return next(wheel_dir.glob("detectron2-*.whl"))


def install(force: bool = False) -> None:
    """Install (or upgrade) the patched detectron2 unless a current or foreign one is present."""
    state = installed_state()
    if state == "current" and not force:
        print(f"detectron2 {VERSION} is installed; nothing to do.")
        return
    if state == "other" and not force:
        print("A detectron2 not installed by this script is present; left alone (use --force to replace it).")
        return
    if importlib.util.find_spec("torch") is None:
        sys.exit("install_detectron2: install torch first (pip install -r requirements.txt).")
    with tempfile.TemporaryDirectory(prefix="d2-wheel-") as tmp:
        _pip("install", "-q", "--no-deps", "--force-reinstall", str(build_wheel(Path(tmp))))
    print(f"detectron2 {VERSION} installed (pure Python, patched for current libraries).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--force", action="store_true", help="reinstall even over a detectron2 this script did not install"
    )
    install(parser.parse_args().force)


if __name__ == "__main__":
    main()
