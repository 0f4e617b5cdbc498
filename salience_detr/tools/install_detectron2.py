"""Install detectron2 0.6 as pure Python, since PyPI has no usable detectron2 release.

The only detectron2 on PyPI is ``pb1-detectron2==0.6``, a source release of upstream v0.6 that lacks its C++
sources, so its own ``setup.py`` cannot build. This script downloads that release with pip, and installs its
Python package (and the model-zoo configs) with a minimal build script of our own. ``salience_detr.compat``
then covers what current numpy / Pillow / setuptools removed. Users with internet access should prefer
upstream detectron2 built from source; this script leaves any installed detectron2 alone.

Run: ``python -m salience_detr.tools.install_detectron2 [--force]`` (needs torch installed first).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SOURCE_RELEASE = "pb1-detectron2==0.6"

_BUILD_SCRIPT = """\
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6",
    description="detectron2 0.6 (pure Python, installed by salience_detr.tools.install_detectron2)",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.7",
)
"""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def install(force: bool = False) -> None:
    if importlib.util.find_spec("detectron2") is not None and not force:
        print("detectron2 is already installed; nothing to do (use --force to reinstall 0.6).")
        return
    if importlib.util.find_spec("torch") is None:
        sys.exit("install_detectron2: install torch first (pip install -r requirements.txt).")
    with tempfile.TemporaryDirectory(prefix="d2-src-") as tmp:
        tmp_path = Path(tmp)
        _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", tmp, SOURCE_RELEASE)
        archives = sorted(tmp_path.glob("*.tar.gz"))
        if not archives:
            sys.exit(f"install_detectron2: pip downloaded no source archive for {SOURCE_RELEASE}.")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(tmp_path, filter="data")
        source = next(tmp_path.glob("*/detectron2/__init__.py")).parent.parent
        (source / "setup.py").write_text(_BUILD_SCRIPT)
        for stale in ("setup.cfg", "pyproject.toml"):
            (source / stale).unlink(missing_ok=True)
        _pip("install", "-q", "--no-deps", "--no-build-isolation", str(source))
    print("detectron2 0.6 installed (pure Python).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if a detectron2 is importable")
    install(parser.parse_args().force)


if __name__ == "__main__":
    main()
