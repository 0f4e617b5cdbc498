"""The offline bundle's manifest, requirement closure and size accounting (no download: miniature wheels)."""

from __future__ import annotations

import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from salience_detr.tools import gpu_check
from salience_detr.tools import prepare_gpu_bundle as bundle


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    metadata = "".join(f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", f"Name: {name}\n{metadata}")
        archive.writestr(f"{name.replace('-', '_')}/__init__.py", "")
    return path


def test_requirements_follow_markers_and_leave_out_extras(tmp_path):
    wheel = make_wheel(
        tmp_path,
        "fvcore",
        "0.1.5",
        ["numpy", "PyYAML>=5.1", 'importlib-metadata; python_version < "3.8"', 'shapely; extra == "all"', "Pillow"],
    )
    assert bundle.requirements(wheel) == {"numpy", "pyyaml", "pillow"}


def test_a_requirement_neither_bundled_nor_on_the_device_stops_it(tmp_path):
    wheels = [make_wheel(tmp_path, "fvcore", "0.1.5", ["yacs", "numpy"]), make_wheel(tmp_path, "yacs", "0.1.8", [])]
    bundle.check_closed(wheels)
    wheels.append(make_wheel(tmp_path, "omegaconf", "2.3", ["antlr4-python3-runtime==4.9.*"]))
    with pytest.raises(SystemExit, match="antlr4-python3-runtime"):
        bundle.check_closed(wheels)


def test_gpu_check_installs_exactly_the_manifest(tmp_path):
    wheels = [make_wheel(tmp_path / "wheels", name, "1.0", []) for name in ("yacs", "termcolor")]
    manifest = bundle.write_manifest(tmp_path, wheels)
    assert manifest["bytes"] == sum(wheel.stat().st_size for wheel in wheels)
    assert gpu_check.bundle_wheels(tmp_path) == sorted(wheels)
    ctx = gpu_check.Context(Path.cwd(), tmp_path / "work", tmp_path, tmp_path, False, time.monotonic() + 9, None)
    install = gpu_check.plan_bundle(ctx)[0].argv
    assert {"--no-index", "--no-deps", "--target", str(ctx.site_dir), *map(str, sorted(wheels))} <= set(install)
    wheels[0].write_bytes(wheels[0].read_bytes() + b"\0")
    with pytest.raises(gpu_check.StepFailed, match="differs"):
        gpu_check.bundle_wheels(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(gpu_check.StepFailed, match="make gpu-bundle"):
        gpu_check.bundle_wheels(tmp_path)


def test_bundled_packages_are_pinned_to_the_versions_here():
    for name in bundle.BUNDLED:
        requirement = bundle.pinned(name)
        assert requirement.startswith(f"{name}==") and len(requirement) > len(name) + 2
    assert not {bundle.normalized(name) for name in bundle.BUNDLED} & bundle.ON_DEVICE
    assert "torch" not in {bundle.normalized(name) for name in bundle.BUNDLED}


def test_the_working_tree_fits_what_the_device_tool_carries():
    tree_mib = bundle.carried_tree_bytes(Path.cwd()) / 2**20
    assert 0.1 < tree_mib < bundle.CARRY_LIMIT_MIB - 8, "keep room for the bundle (a few MiB)"


def test_the_bundle_is_git_ignored():
    check = subprocess.run(["git", "check-ignore", "-q", f"{gpu_check.BUNDLE_DIR}/{gpu_check.MANIFEST}"])
    assert check.returncode == 0, f"add /{gpu_check.BUNDLE_DIR}/ to .gitignore"


def fake_pip(produced: dict[str, str | None]):
    """A stand-in for pip: each verb ('download', 'wheel') writes the named wheel file, or fails when None."""

    def pip(*args: str) -> subprocess.CompletedProcess:
        verb, folder = args[0], Path(args[args.index("-d" if "-d" in args else "-w") + 1])
        name = produced.get(verb)
        if name is None:
            return subprocess.CompletedProcess(args, 1, "", f"no {verb} for this")
        (folder / name).write_bytes(b"wheel")
        return subprocess.CompletedProcess(args, 0, "", "")

    return pip


def test_a_wheel_is_downloaded_for_python_312_or_built_here_only_if_pure(tmp_path, monkeypatch):
    binary = "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl"
    monkeypatch.setattr(bundle, "_pip", fake_pip({"download": binary}))
    assert bundle.fetch_wheel("pycocotools==2.0.11", tmp_path).name == binary
    monkeypatch.setattr(bundle, "_pip", fake_pip({"download": None, "wheel": "fvcore-0.1.5-py3-none-any.whl"}))
    assert bundle.fetch_wheel("fvcore==0.1.5", tmp_path).name == "fvcore-0.1.5-py3-none-any.whl"
    monkeypatch.setattr(bundle, "_pip", fake_pip({"download": None, "wheel": "fast-1.0-cp311-cp311-linux_x86_64.whl"}))
    with pytest.raises(SystemExit, match="not pure Python"):
        bundle.fetch_wheel("fast==1.0", tmp_path)
    monkeypatch.setattr(bundle, "_pip", fake_pip({"download": None, "wheel": None}))
    with pytest.raises(SystemExit, match="no wheel for gone==1.0"):
        bundle.fetch_wheel("gone==1.0", tmp_path)
