"""Print the environment for bug reports: detectron2's table plus the state of this project's operator.

python -m salience_detr.tools.collect_env
"""

from __future__ import annotations

import importlib.util
import os

import torch
from tabulate import tabulate

from salience_detr.layers import ms_deform_attn as msda


def operator_rows() -> list[tuple[str, str]]:
    """Whether salience_detr._C is loaded (and why not), how it was built, and the backend each device gets."""
    info = msda.extension_build_info()
    rows = [
        ("salience_detr._C", "loaded" if info else "NOT loaded"),
        ("salience_detr._C status", msda.extension_status()),
    ]
    if info:
        rows += [
            ("salience_detr._C compiler", str(info["compiler"])),
            ("salience_detr._C built with torch", str(info["torch_version"])),
            ("salience_detr._C CUDA kernels", "yes" if info["with_cuda"] else "no"),
            ("salience_detr._C CUDA version", str(info["cuda_version"])),
            ("salience_detr._C CUDA archs", str(info["cuda_archs"])),
        ]
    rows.append((msda.BACKEND_ENV, os.environ.get(msda.BACKEND_ENV, "<unset> (auto)")))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        backend = msda.resolve_backend(device, torch.float32)
        reason = msda.compiled_backend_available(device, torch.float32)[1]
        rows.append((f"deformable attention backend ({device.type}, float32)", f"{backend} ({reason})"))
    return rows


def collect_env_info() -> str:
    """detectron2's environment table when detectron2 is installed, then the operator's rows."""
    sections = []
    if importlib.util.find_spec("detectron2") is not None:
        from detectron2.utils.collect_env import collect_env_info as detectron2_env_info

        sections.append(detectron2_env_info())
    else:
        sections.append(f"detectron2: not installed\nPyTorch: {torch.__version__} (CUDA {torch.version.cuda})")
    sections.append(tabulate(operator_rows()))
    return "\n".join(sections)


def main() -> None:
    print(collect_env_info())


if __name__ == "__main__":
    main()
