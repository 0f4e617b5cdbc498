"""The built extension describes itself, and collect_env reports it."""

from __future__ import annotations

import torch

from salience_detr.layers import ms_deform_attn as msda
from salience_detr.tools import collect_env


def test_build_info_is_consistent():
    info = msda.extension_build_info()
    assert info is not None, msda.extension_status()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["compiler"] != "unknown"
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_archs"] and not info["cuda_archs"].startswith("unknown")
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] is None


def test_collect_env_reports_the_operator(monkeypatch):
    monkeypatch.setenv(msda.BACKEND_ENV, "pytorch")
    rows = dict(collect_env.operator_rows())
    assert rows["salience_detr._C"] == "loaded"
    assert rows[msda.BACKEND_ENV] == "pytorch"
    assert rows["deformable attention backend (cpu, float32)"].startswith("pytorch")
