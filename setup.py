"""Build and install salience-detr with its compiled operator ``salience_detr._C`` (sources in csrc/).

    pip install -e . --no-build-isolation

CPU kernels are always built; CUDA kernels when a GPU is visible or ``FORCE_CUDA=1``. Environment:
``TORCH_CUDA_ARCH_LIST`` (default "9.0" when forcing CUDA without a GPU), ``NVCC_FLAGS`` (extra nvcc flags),
``CUDA_HOME`` (default /usr/local/cuda when it exists), ``MAX_JOBS`` (parallel compile jobs, read by ninja).
Object files are kept in build/ so a re-run only recompiles what changed.
"""

from __future__ import annotations

import os
import shlex
import sys
import sysconfig
from pathlib import Path

from setuptools import find_namespace_packages, find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")
DEFAULT_ARCH_LIST = "9.0"

# torch.utils.cpp_extension reads CUDA_HOME when it is imported; without it torch guesses from nvcc's wrapper.
if "CUDA_HOME" not in os.environ and DEFAULT_CUDA_HOME.is_dir():
    os.environ["CUDA_HOME"] = str(DEFAULT_CUDA_HOME)

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _with_cuda() -> bool:
    if torch.cuda.is_available():
        return True
    if os.environ.get("FORCE_CUDA", "0") != "1":
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        print(
            f"setup.py: FORCE_CUDA=1 without a visible GPU; building for TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST} "
            "(set TORCH_CUDA_ARCH_LIST to target other GPUs)"
        )
    return True


def _cuda_include_dirs() -> list[str]:
    """nvidia/cu13 headers from site-packages: the system toolkit here lacks cuBLAS/cuSPARSE headers."""
    include = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "include"
    return [str(include)] if include.is_dir() else []


WITH_CUDA = _with_cuda()
# at::parallel_for is inline: with torch's OpenMP backend it runs on one thread unless the extension is itself
# compiled with OpenMP (its libgomp is then the one torch already loaded).
OPENMP_FLAGS = ["-fopenmp"] if torch._C.has_openmp and sys.platform != "darwin" else []


def _extension():
    sources = [str(path.relative_to(ROOT)) for path in sorted(CSRC.glob("**/*.cpp"))]
    cxx_flags = ["-O3", "-g0", *OPENMP_FLAGS]  # -g0 overrides Python's default -g: debug info doubles compile time
    if not WITH_CUDA:
        return CppExtension(
            "salience_detr._C",
            sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=OPENMP_FLAGS,
        )
    sources += [str(path.relative_to(ROOT)) for path in sorted(CSRC.glob("**/*.cu"))]
    nvcc_flags = ["-O3", "-DWITH_CUDA", *shlex.split(os.environ.get("NVCC_FLAGS", ""))]
    return CUDAExtension(
        "salience_detr._C",
        sources,
        include_dirs=[str(CSRC), *_cuda_include_dirs()],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=OPENMP_FLAGS,
    )


class PersistentBuildExtension(BuildExtension):
    """Keeps ninja's objects in build/ (pip uses a fresh temporary folder each time) for quick rebuilds."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / ("temp-cuda" if WITH_CUDA else "temp-cpu"))


def _config_packages() -> list[str]:
    """configs/ ships inside the package as salience_detr.configs, so installed copies find their configs."""
    return ["salience_detr.configs", *(f"salience_detr.configs.{name}" for name in find_namespace_packages("configs"))]


setup(
    name="salience-detr",
    version="0.1.0",
    description="Salience DETR (CVPR 2024) as a Detectron2 project, with a compiled deformable-attention operator",
    python_requires=">=3.10",
    packages=find_packages(include=["salience_detr*"]) + _config_packages(),
    package_dir={"salience_detr.configs": "configs"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": PersistentBuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
