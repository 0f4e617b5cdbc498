"""Prepare, on a machine with PyPI, the offline bundle the GPU check installs on a GPU machine without internet.

    python -m salience_detr.tools.prepare_gpu_bundle [--bundle-dir .gpu_bundle]     (or: make gpu-bundle)

The GPU machine has Python 3.12 and torch but no detectron2 and no registry. The bundle holds the patched
detectron2 0.6 wheel (built from its source release by ``install_detectron2``) and wheels for Python 3.12 /
manylinux x86_64 of what the tiny training and COCO evaluation import there and the machine lacks, at the
versions installed here, plus ``manifest.json`` (file, size, SHA-256) that ``gpu_check`` verifies. torch is
never bundled. Fails when a bundled wheel needs a package neither bundled nor on the GPU image, or when the
bundle and the working tree together exceed what the device tool carries (64 MiB).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from salience_detr.tools import install_detectron2
from salience_detr.tools._cli import BUNDLE_DIR, MANIFEST

# Imported by the tiny training + COCOEvaluator path (measured: the distributions in sys.modules after a
# fast_dev_run of train_net.py) and missing from the GPU machine's image.
BUNDLED = (
    "antlr4-python3-runtime",
    "fvcore",
    "hydra-core",
    "iopath",
    "omegaconf",
    "pycocotools",
    "pydot",
    "termcolor",
    "yacs",
)
# Already on the GPU machine's image (its published package list): bundled wheels may require these.
ON_DEVICE = frozenset(
    "cloudpickle matplotlib numpy opencv-python-headless packaging pillow portalocker protobuf pyparsing pyyaml "
    "scipy setuptools tabulate tensorboard torch torchvision tqdm typing-extensions".split()
)
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
CARRY_LIMIT_MIB = 64
PURE_TAG = re.compile(r"-(py3|py2\.py3)-none-any\.whl$")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(name: str) -> str:
    """``name==version`` as installed here (the versions the project's tests ran with)."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"prepare_gpu_bundle: {name} is not installed here; run `make setup` first, then this again.")


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch_wheel(requirement: str, wheel_dir: Path) -> Path:
    """The requirement's wheel for the GPU machine: a binary one from PyPI, else one built here if pure Python."""
    before = set(wheel_dir.glob("*.whl"))
    target = ["--python-version", TARGET_PYTHON, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS)]
    download = _pip("download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(wheel_dir), requirement)
    if download.returncode != 0:
        built = _pip("wheel", "-q", "--no-deps", "-w", str(wheel_dir), requirement)
        if built.returncode != 0:
            sys.exit(f"prepare_gpu_bundle: no wheel for {requirement}:\n{download.stderr}\n{built.stderr}")
    (wheel,) = set(wheel_dir.glob("*.whl")) - before
    if download.returncode != 0 and not PURE_TAG.search(wheel.name):
        sys.exit(f"prepare_gpu_bundle: {requirement} has no Python {TARGET_PYTHON} wheel and is not pure Python.")
    return wheel


def requirements(wheel: Path) -> set[str]:
    """Names the wheel requires on Python 3.12 without extras (its METADATA's Requires-Dist lines)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    needed = set()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(
                {"python_version": TARGET_PYTHON, "extra": ""}
            ):
                needed.add(normalized(requirement.name))
    return needed


def check_closed(wheels: list[Path]) -> None:
    """Every requirement of a bundled wheel is bundled too or already on the GPU machine."""
    bundled = {normalized(wheel.name.split("-")[0]) for wheel in wheels}
    for wheel in wheels:
        missing = requirements(wheel) - bundled - ON_DEVICE
        if missing:
            sys.exit(f"prepare_gpu_bundle: {wheel.name} needs {sorted(missing)}: add them to BUNDLED or ON_DEVICE.")


def write_manifest(bundle_dir: Path, wheels: list[Path]) -> dict:
    entries = [
        {
            "file": str(w.relative_to(bundle_dir)),
            "bytes": w.stat().st_size,
            "sha256": hashlib.sha256(w.read_bytes()).hexdigest(),
        }
        for w in sorted(wheels)
    ]
    manifest = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": TARGET_PYTHON,
        "platforms": list(PLATFORMS),
        "bytes": sum(entry["bytes"] for entry in entries),
        "wheels": entries,
    }
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def carried_tree_bytes(root: Path) -> int:
    """Bytes of what the device tool sends: tracked and untracked, not ignored files of the checkout."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    files = [root / name for name in listed.decode().split("\0") if name]
    return sum(path.stat().st_size for path in files if path.is_file())


def prepare(bundle_dir: Path) -> dict:
    """Fill ``bundle_dir`` afresh (wheels/ and the manifest) and return the manifest."""
    wheel_dir = bundle_dir / "wheels"
    shutil.rmtree(wheel_dir, ignore_errors=True)
    wheel_dir.mkdir(parents=True)
    wheels = [fetch_wheel(pinned(name), wheel_dir) for name in BUNDLED]
    with tempfile.TemporaryDirectory(prefix="d2-bundle-") as tmp:
        built = install_detectron2.build_wheel(Path(tmp))
        wheels.append(Path(shutil.copy2(built, wheel_dir)))
    check_closed(wheels)
    return write_manifest(bundle_dir, wheels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle-dir", default=BUNDLE_DIR, help="where the bundle goes (git-ignored)")
    args = parser.parse_args(argv)
    bundle_dir = Path(args.bundle_dir).resolve()
    manifest = prepare(bundle_dir)
    bundle_mib = manifest["bytes"] / 2**20
    tree_mib = carried_tree_bytes(Path.cwd()) / 2**20
    for entry in manifest["wheels"]:
        print(f"{entry['bytes'] / 2**20:8.2f} MiB  {entry['file']}")
    print(
        f"bundle {bundle_mib:.1f} MiB + working tree {tree_mib:.1f} MiB = {bundle_mib + tree_mib:.1f} MiB "
        f"(the device tool carries at most {CARRY_LIMIT_MIB} MiB)"
    )
    if bundle_mib + tree_mib > CARRY_LIMIT_MIB:
        print("prepare_gpu_bundle: too large to carry; leave out what the GPU path does not import.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
