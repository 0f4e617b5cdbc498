"""salience_detr.tools.benchmark on the tiny synthetic config (random weights, small input, few iterations)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from omegaconf import OmegaConf

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.layers.ms_deform_attn import BACKEND_ENV
from salience_detr.tools import benchmark

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
HEIGHT, WIDTH = 96, 128
RESULT_FIELDS = {
    "params_m": float,
    "trainable_params_m": float,
    "gflops": float,
    "gflops_deformable_attention": float,
    "gflops_by_component": dict,
    "uncounted_ops": dict,
    "latency_ms_median": float,
    "latency_ms_min": float,
    "latency_ms_max": float,
    "images_per_s": float,
    "peak_memory_mb": float,
    "memory_kind": str,
}


def test_benchmark_reports_every_field(tmp_path, capsys):
    output = tmp_path / "bench" / "result.json"
    argv = ["--config-file", TINY_CONFIG, "--height", str(HEIGHT), "--width", str(WIDTH), "--device", "cpu"]
    report = benchmark.main([*argv, "--num-iter", "2", "--warmup", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert report["input_size"] == [HEIGHT, WIDTH] and report["num_iter"] == 2
    assert report["deformable_attention_backend"] in ("compiled", "pytorch")
    (name, result), *others = report["results"].items()
    assert not others or name == "roi_refine on"
    for field, kind in RESULT_FIELDS.items():
        assert isinstance(result[field], kind), field
    model = instantiate(LazyConfig.load(TINY_CONFIG).model)
    assert result["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert 0 < result["gflops_deformable_attention"] < result["gflops"]
    components = result["gflops_by_component"]
    assert {"backbone", "transformer", "transformer.encoder", "transformer.decoder"} <= set(components)
    assert components["transformer.encoder"] + components["transformer.decoder"] < components["transformer"]
    assert result["latency_ms_min"] <= result["latency_ms_median"] <= result["latency_ms_max"]
    assert result["images_per_s"] == pytest.approx(1000.0 / result["latency_ms_median"])
    assert result["peak_memory_mb"] > 0
    table = capsys.readouterr().out
    assert name in table and "GFLOPs" in table and "images/s" in table


def test_roi_config_is_traced_and_measured_with_the_head_on_and_off(tmp_path):
    roi_config = TINY_CONFIG.replace("tiny_synthetic.py", "tiny_synthetic_roi.py")
    argv = ["--config-file", roi_config, "--height", str(HEIGHT), "--width", str(WIDTH), "--device", "cpu"]
    results = benchmark.main([*argv, "--num-iter", "1", "--warmup", "0", "--output", str(tmp_path / "r.json")])[
        "results"
    ]
    on, off = results["roi_refine on"], results["roi_refine off"]
    assert on["params_m"] > off["params_m"] and on["gflops"] > off["gflops"]


def test_flop_count_is_the_same_on_both_attention_backends(monkeypatch):
    model = instantiate(LazyConfig.load(TINY_CONFIG).model).eval()
    image = benchmark.random_image(HEIGHT, WIDTH, torch.device("cpu"))
    counts = {}
    for backend in ("compiled", "pytorch"):
        if backend == "compiled" and not benchmark.resolve_backend(torch.device("cpu"), torch.float32) == "compiled":
            continue  # without the built extension only the reference path exists
        monkeypatch.setenv(BACKEND_ENV, backend)
        with torch.no_grad():
            counts[backend] = benchmark.count_flops(model, image)
    assert counts["pytorch"]["gflops_deformable_attention"] > 0
    assert "aten::grid_sampler" not in counts["pytorch"]["uncounted_ops"]
    if "compiled" in counts:
        assert counts["compiled"]["gflops"] == pytest.approx(counts["pytorch"]["gflops"])
        assert not any("ms_deform_attn" in op for op in counts["compiled"]["uncounted_ops"])


class FakeValue:
    """The slice of torch._C.Value that fvcore's get_shape reads."""

    def __init__(self, shape):
        self.shape = shape

    def isCompleteTensor(self) -> bool:  # noqa: N802  (torch's name)
        return True

    def type(self):
        return self

    def sizes(self):
        return self.shape


def test_flop_handles_count_one_bilinear_sample_and_weight_per_channel():
    batch, queries, heads, levels, points, head_dim = 2, 10, 4, 3, 4, 8
    compiled = benchmark.deformable_attention_flop_handle(
        [FakeValue([batch, 50, heads, head_dim]), None, None, FakeValue([batch, queries, heads, levels, points, 2])],
        [],
    )
    expected = batch * queries * heads * levels * points * head_dim * 5
    assert compiled == Counter({"deformable_attention": expected})
    per_level = benchmark.grid_sample_flop_handle(
        [FakeValue([batch * heads, head_dim, 7, 9]), FakeValue([batch * heads, queries, points, 2])], []
    )
    assert per_level["deformable_attention"] * levels == expected
    attention = benchmark.attention_flop_handle([FakeValue([2, 8, 30, 32]), None, FakeValue([2, 8, 30, 32])], [])
    assert attention == Counter({"attention": 2 * 8 * 30 * 30 * 64})


def test_roi_head_is_measured_on_and_off_when_the_config_has_one():
    cfg = OmegaConf.create({"model": {"backbone": "b"}})
    assert list(benchmark.roi_variants(cfg)) == ["model (no RoI head)"]
    cfg.model.roi_refine = {"num_layers": 2}
    variants = benchmark.roi_variants(cfg)
    assert list(variants) == ["roi_refine on", "roi_refine off"]
    assert variants["roi_refine on"].model.roi_refine.num_layers == 2
    assert variants["roi_refine off"].model.roi_refine is None
    cfg.model.roi_refine = None
    assert list(benchmark.roi_variants(cfg)) == ["roi_refine off"]


def test_bad_arguments_are_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="--num-iter must be a positive integer"):
        benchmark.main(["--config-file", TINY_CONFIG, "--num-iter", "0"])
    with pytest.raises(SystemExit, match="does not exist"):
        benchmark.main(["--config-file", str(tmp_path / "missing.py")])
