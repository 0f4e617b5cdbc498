"""salience_detr.tools.benchmark on the tiny synthetic config (random weights, small input, few iterations)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPEC
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
    "aten_calls": int,
    "host_syncs": int,
    "host_syncs_by_kind": dict,
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
    assert result["aten_calls"] > 1000 and 0 < result["host_syncs"] == sum(result["host_syncs_by_kind"].values())
    table = capsys.readouterr().out
    assert name in table and "GFLOPs" in table and "images/s" in table and "host syncs" in table


def tiny_data_overrides(cache_dir) -> list[str]:
    """The session's tiny generated dataset, two small images per batch, no loader workers."""
    spec = [f"datasets.synthetic.{key}={value}" for key, value in TINY_SPEC.items()]
    return spec + [
        f"datasets.synthetic.cache_dir={cache_dir}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.train.mapper.min_sizes=[64,80]",
        "dataloader.train.mapper.max_size=96",
        "dataloader.train.mapper.crop_pre_sizes=[64]",
        "dataloader.train.mapper.crop_size=[48,64]",
    ]


@pytest.mark.parametrize("train_data", ["random", "loader"])
def test_train_task_times_training_steps_and_counts_one(train_data, tiny_synthetic_cache, tmp_path, capsys):
    argv = ["--config-file", TINY_CONFIG, "--task", "train", "--train-data", train_data, "--device", "cpu"]
    argv += ["--height", "64", "--width", "96", "--batch-size", "2", "--num-iter", "2", "--warmup", "0"]
    argv += ["--output", str(tmp_path / "train.json"), "--opts", *tiny_data_overrides(tiny_synthetic_cache)]
    report = benchmark.main(argv)
    assert report["task"] == "train" and train_data[:4] in report["train_data"]
    (result,) = report["results"].values()
    assert result["images_per_step"] == 2 and result["images_per_s"] > 0
    assert result["latency_ms_min"] <= result["latency_ms_median"] <= result["latency_ms_max"]
    # a training step does far more than an eval forward: backward, matching, the optimizer
    assert result["aten_calls"] > 3000 and result["host_syncs"] > 0
    assert set(result["host_syncs_by_kind"]) and "ATen calls" in capsys.readouterr().out
    assert 0 < result["optimizer_aten_calls"] < result["aten_calls"]
    assert result["optimizer_host_syncs"] <= result["host_syncs"] >= sum(result["host_sync_sites"].values()) > 0
    # beyond the optimizer's CPU step counters only the trainer's one transfer of the losses: the model reads nothing
    assert result["host_syncs"] - result["optimizer_host_syncs"] == 1
    assert any("engine/trainer.py" in site for site in result["host_sync_sites"])  # the sites are named


def test_train_task_trains_only_train_trainable(tiny_synthetic_cache, tmp_path):
    """The benchmark times the step train_net runs: with train.trainable the rest of the model is frozen."""
    argv = ["--config-file", TINY_CONFIG, "--task", "train", "--train-data", "random", "--device", "cpu"]
    argv += ["--height", "64", "--width", "96", "--batch-size", "2", "--num-iter", "1", "--warmup", "0"]
    argv += ["--output", str(tmp_path / "train.json"), "--opts", "train.trainable=[transformer.decoder]"]
    (result,) = benchmark.main(argv)["results"].values()
    assert 0 < result["trainable_params_m"] < result["params_m"]


def test_data_task_times_the_train_loader_alone(tiny_synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "instantiate", _no_model(benchmark.instantiate))
    argv = ["--config-file", TINY_CONFIG, "--task", "data", "--num-iter", "3", "--warmup", "1", "--device", "cpu"]
    report = benchmark.main(
        [*argv, "--output", str(tmp_path / "d.json"), "--opts", *tiny_data_overrides(tiny_synthetic_cache)]
    )
    result = report["results"]["dataloader.train"]
    assert (report["task"], report["num_workers"], result["batches"], result["images"]) == ("data", 0, 3, 6)
    assert result["images_per_s"] > 0 and result["batch_ms_median"] <= result["batch_ms_max"]


def _no_model(instantiate):
    """``instantiate`` that fails the test when asked for the model: the data task must not build one."""

    def guarded(cfg, *args, **kwargs):
        if "backbone" in cfg:
            pytest.fail("--task data built the model")
        return instantiate(cfg, *args, **kwargs)

    return guarded


def test_unknown_task_is_an_argparse_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--config-file", TINY_CONFIG, "--task", "trian"])
    assert exit_info.value.code == 2
    assert "argument --task: invalid choice: 'trian' (choose from 'eval', 'train', 'data')" in capsys.readouterr().err


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
    with pytest.raises(SystemExit, match="--fuse-bn folds batch norms for inference; it applies to --task eval"):
        benchmark.main(["--config-file", TINY_CONFIG, "--task", "train", "--fuse-bn"])
