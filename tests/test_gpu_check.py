"""The GPU check's dry run (what CI can run of it) and its step and report logic."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from salience_detr.tools import benchmark_ops, gpu_check

GPU_STEPS = [
    "build",
    "op_tests",
    "benchmark_ops",
    "bundle",
    "cuda_tests",
    "train_fp32",
    "train_amp_fp16",
    "train_amp_bf16",
]
ALL_STEPS = ["machine", *GPU_STEPS, "r50_latency"]


def python(code: str) -> gpu_check.Command:
    return gpu_check.Command([sys.executable, "-c", code])


def make_context(tmp_path: Path, budget_s: float = 60.0, log=None) -> gpu_check.Context:
    log = log or open(tmp_path / "log.txt", "w")
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return gpu_check.Context(
        Path.cwd(), work, tmp_path / "report", tmp_path / "bundle", False, time.monotonic() + budget_s, log
    )


def fake_step(name: str, commands: list[gpu_check.Command], evaluate=None, limit_s: float = 30.0) -> gpu_check.Step:
    return gpu_check.Step(
        name,
        f"fake {name}",
        limit_s,
        lambda ctx: commands,
        evaluate or (lambda ctx, outputs: {"summary": outputs[-1].strip()}),
        needs_gpu=False,
    )


def test_dry_run_writes_the_whole_report(tmp_path):
    report_dir = tmp_path / "report"
    argv = ["--dry-run", "--report-dir", str(report_dir), "--work-dir", str(tmp_path / "work")]
    argv += ["--bundle-dir", str(tmp_path / "no_bundle")]
    assert gpu_check.main(argv) == 0
    report = json.loads((report_dir / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert [step["name"] for step in report["steps"]] == ALL_STEPS
    assert report["dry_run"] and report["exit_code"] == 0
    assert report["machine"]["torch"] == torch.__version__ and steps["machine"]["status"] == "passed"
    assert report["machine"]["csrc_sha256"] == gpu_check.csrc_digest(Path.cwd())
    assert len(report["machine"]["csrc_sha256"]) == 64
    for name in [*GPU_STEPS, "r50_latency"]:
        assert steps[name]["status"] == "skipped", steps[name]
    assert "no bundle" in steps["bundle"]["reason"]
    assert "build_ext --inplace" in steps["build"]["commands"][0]
    assert "TORCH_CUDA_ARCH_LIST=" in steps["build"]["commands"][0]
    assert all(count > 5 for count in steps["op_tests"]["numbers"]["test_functions"].values())
    assert "train.amp.dtype=bfloat16" in steps["train_amp_bf16"]["commands"][0]
    assert "train.amp.enabled=False" in steps["train_fp32"]["commands"][0]
    assert set(steps["r50_latency"]["numbers"]["precisions"]) == {"float32", "bfloat16"}
    assert "--time-device cuda" in steps["r50_latency"]["commands"][0]
    markdown = (report_dir / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check: PASSED (dry run, no GPU)")
    assert all(f"| {name} | " in markdown for name in ALL_STEPS)
    assert (report_dir / "gpu_check.log").is_file()


def test_a_failing_step_fails_the_run_but_not_the_steps_after_it(tmp_path, monkeypatch):
    steps = (
        fake_step("first", [python("print('one')")]),
        fake_step("broken", [python("import sys; print('bad'); sys.exit(3)"), python("print('never')")]),
        fake_step("last", [python("print('three')")]),
        fake_step("unselected", [python("print('four')")]),
    )
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    args = argparse.Namespace(
        report_dir=str(tmp_path / "report"),
        work_dir=str(tmp_path / "work"),
        bundle_dir=str(tmp_path / "bundle"),
        dry_run=False,
        steps=["first", "broken", "last"],
        budget_s=60.0,
    )
    assert gpu_check.run_all(args) == 1
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    statuses = {step["name"]: (step["status"], step["reason"]) for step in report["steps"]}
    assert statuses["first"] == ("passed", "")
    assert statuses["broken"][0] == "failed" and "exit code 3" in statuses["broken"][1]
    assert statuses["last"] == ("passed", "")
    assert statuses["unselected"] == ("skipped", "not selected (--steps)")
    broken = next(step for step in report["steps"] if step["name"] == "broken")
    assert "bad" in broken["log_tail"] and len(broken["commands"]) == 1
    assert report["exit_code"] == 1 and report["summary"] == {"passed": 2, "failed": 1, "skipped": 1}
    markdown = (tmp_path / "report" / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check: FAILED") and "gpu_check --steps broken`" in markdown
    assert "never" not in (tmp_path / "report" / "gpu_check.log").read_text()


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    ctx = make_context(tmp_path)
    spawn = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    step = fake_step("slow", [python(spawn + "print('started', flush=True); time.sleep(60)")], limit_s=2.0)
    start = time.monotonic()
    result = gpu_check.run_step(step, ctx)
    assert time.monotonic() - start < 20
    assert result.status == "failed" and result.reason.startswith("timed out after")
    assert "started" in result.log_tail


def test_an_error_in_a_step_check_is_a_failed_step(tmp_path):
    def evaluate(ctx, outputs):
        return {"value": {}["missing"]}

    result = gpu_check.run_step(fake_step("buggy", [python("print(1)")], evaluate), make_context(tmp_path))
    assert result.status == "failed" and result.reason.startswith("KeyError")
    assert "Traceback" in result.log_tail


def test_a_spent_budget_fails_the_step_without_running_it(tmp_path):
    ctx = make_context(tmp_path, budget_s=-1.0)
    marker = tmp_path / "ran"
    result = gpu_check.run_step(fake_step("late", [python(f"open({str(marker)!r}, 'w')")]), ctx)
    assert result.status == "failed" and "budget" in result.reason
    assert not marker.exists()


def test_exit_code():
    passed = gpu_check.StepResult("a", "a")
    skipped = gpu_check.StepResult("b", "b", status="skipped")
    failed = gpu_check.StepResult("c", "c", status="failed")
    assert gpu_check.exit_code([passed, skipped]) == 0
    assert gpu_check.exit_code([passed, failed, skipped]) == 1


def test_bad_arguments_stop_before_any_work(monkeypatch, capsys):
    parser = gpu_check.get_parser()
    with pytest.raises(SystemExit):
        gpu_check.checked_args(parser, ["--dry-run", "--steps", "build,warp_drive"])
    assert "warp_drive" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.checked_args(parser, [])
    assert "--dry-run" in capsys.readouterr().err
    assert gpu_check.checked_args(parser, ["--dry-run", "--steps", "build,machine"]).steps == ["build", "machine"]


def benchmark_output(monkeypatch, capsys, dtypes=("float32", "float16", "bfloat16")) -> str:
    """What benchmark_ops prints, with its measurements replaced by fixed numbers."""
    rows = [
        (case, dtype, pass_name, 0.002, 0.01)
        for dtype in dtypes
        for case in ("encoder (B=2, 9000 q)", "decoder (B=2, 900 q, 4-D refs)")
        for pass_name in ("forward", "fwd+bwd")
    ]
    monkeypatch.setattr(benchmark_ops, "benchmark", lambda device, repeat, cases, clock: rows)
    benchmark_ops.main(["--device", "cpu", "--repeat", "1"])
    return capsys.readouterr().out


def test_benchmark_table_is_read_from_the_tool_output(monkeypatch, capsys, tmp_path):
    numbers = gpu_check.evaluate_benchmark(make_context(tmp_path), [benchmark_output(monkeypatch, capsys)])
    assert len(numbers["rows"]) == 12
    assert numbers["rows"][0] == {
        "case": "encoder (B=2, 9000 q)",
        "dtype": "float32",
        "pass": "forward",
        "compiled_ms": 2.0,
        "reference_ms": 10.0,
        "speedup": 5.0,
    }
    with pytest.raises(gpu_check.StepFailed, match="12 rows"):
        gpu_check.evaluate_benchmark(make_context(tmp_path), [benchmark_output(monkeypatch, capsys, ("float32",))])


SAMPLE_TESTS = """import pytest

def test_a():
    pass

@pytest.mark.skip(reason="needs two machines")
def test_b():
    pass
"""


def run_sample_tests(tmp_path: Path, text: str, report: Path) -> None:
    (tmp_path / "test_sample.py").write_text(text)
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_sample.py"), "-q", "-p", "no:cacheprovider"]
    subprocess.run([*argv, f"--junitxml={report}", f"--rootdir={tmp_path}"], capture_output=True, timeout=120)


def test_tests_fail_on_a_failure_or_a_forbidden_skip(tmp_path):
    ctx = make_context(tmp_path)
    report = ctx.work_dir / "op_tests.xml"
    run_sample_tests(tmp_path, SAMPLE_TESTS, report)
    counts = gpu_check.junit_counts(report)
    assert (counts["tests"], counts["passed"], counts["skipped"], counts["failed"]) == (2, 1, 1, 0)
    assert counts["not_passed"] == {"skipped": ["test_sample::test_b: needs two machines"]}
    with pytest.raises(gpu_check.StepFailed, match="1 skipped .*none may skip"):
        gpu_check.evaluate_tests("op_tests", any_skip_fails=True)(ctx, ["output"])
    assert gpu_check.evaluate_tests("op_tests", any_skip_fails=False)(ctx, ["output"])["passed"] == 1
    run_sample_tests(tmp_path, SAMPLE_TESTS.replace("two machines", "a CUDA GPU"), report)
    with pytest.raises(gpu_check.StepFailed, match="no CUDA case may skip"):
        gpu_check.evaluate_tests("op_tests", any_skip_fails=False)(ctx, ["output"])
    report.unlink()
    with pytest.raises(gpu_check.StepFailed, match="no report"):
        gpu_check.evaluate_tests("op_tests", any_skip_fails=True)(ctx, ["output"])


def test_other_cuda_tests_are_found_by_their_skip_condition(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_plain.py").write_text("def test_x():\n    pass\n")
    cuda_mark = "CUDA = pytest.mark.skipif(not torch." + "cuda.is_available(), reason='x')\n"  # split: not this file
    (tmp_path / "tests" / "test_gpu_thing.py").write_text(cuda_mark)
    (tmp_path / "tests" / "test_other.py").write_text("SEEN = torch.cuda.is_available()\n")
    (tmp_path / "tests" / "test_ms_deform_attn.py").write_text(cuda_mark)
    assert gpu_check.other_cuda_test_files(tmp_path) == ["tests/test_gpu_thing.py"]
    ctx = make_context(tmp_path)
    ctx.root = tmp_path
    (tmp_path / "tests" / "test_gpu_thing.py").unlink()
    with pytest.raises(gpu_check.StepSkipped):
        gpu_check.plan_tests("cuda_tests", lambda ctx: gpu_check.other_cuda_test_files(ctx.root))(ctx)


def write_metrics(path: Path, losses: list[float], ap: float = 1.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"iteration": 5 * i + 4, "total_loss": loss, "time": 0.1} for i, loss in enumerate(losses)]
    records.append({"iteration": 49, "bbox/AP": ap, "bbox/AP50": 2 * ap})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_training_must_log_finite_falling_losses_and_an_ap(tmp_path):
    ctx = make_context(tmp_path)
    metrics = ctx.work_dir / "train_amp_bf16" / "metrics.json"
    evaluate = gpu_check.evaluate_train("train_amp_bf16")
    write_metrics(metrics, [30.0, 25.0, 21.5])
    numbers = evaluate(ctx, [""])
    assert numbers["bbox"] == {"AP": 1.5, "AP50": 3.0} and numbers["seconds_per_iter"] == 0.1
    assert [point["total_loss"] for point in numbers["loss_curve"]] == [30.0, 25.0, 21.5]
    for losses, ap, message in [
        ([30.0, 31.0], 1.0, "did not fall"),
        ([30.0, float("nan"), 20.0], 1.0, "non-finite"),
        ([30.0], 1.0, "fewer than two"),
        ([30.0, 20.0], float("nan"), "AP"),
    ]:
        write_metrics(metrics, losses, ap)
        with pytest.raises(gpu_check.StepFailed, match=message):
            evaluate(ctx, [""])


def test_train_steps_start_from_an_empty_output_folder(tmp_path):
    ctx = make_context(tmp_path)
    write_metrics(ctx.work_dir / "train_fp32" / "metrics.json", [3.0, 2.0])
    (command,) = gpu_check.plan_train("train_fp32")(ctx)
    assert not (ctx.work_dir / "train_fp32").exists()
    assert f"train.output_dir={ctx.work_dir / 'train_fp32'}" in command.argv


def test_dry_run_loads_the_training_overrides_as_train_net_does(tmp_path, monkeypatch):
    ctx = make_context(tmp_path)
    assert gpu_check.dry_train("train_amp_fp16")(ctx)["overrides"] == gpu_check.train_overrides(ctx, "train_amp_fp16")
    typo = [*gpu_check.train_overrides(ctx, "train_fp32"), "train.max_itr=2"]
    monkeypatch.setattr(gpu_check, "train_overrides", lambda ctx, name: typo)
    with pytest.raises(gpu_check.StepFailed, match=r"max_itr.*update the overrides of train_fp32"):
        gpu_check.dry_train("train_fp32")(ctx)


def test_latency_needs_finite_detections_in_both_precisions():
    good = {"latency_ms_median": 40.0, "peak_memory_mb": 900, "detections": 100, "finite": True}
    numbers = gpu_check.check_latency({"precisions": {"float32": good, "bfloat16": dict(good, latency_ms_median=25.0)}})
    assert numbers["summary"] == "fp32 40.0 ms (900 MB), bf16 25.0 ms (900 MB)"
    with pytest.raises(gpu_check.StepFailed, match="bfloat16"):
        gpu_check.check_latency({"precisions": {"float32": good, "bfloat16": dict(good, finite=False)}})


@pytest.mark.parametrize(
    "capability, archs, ok", [("9.0", "900", True), ("8.6", "800,860", True), ("9.0", "800", False)]
)
def test_the_build_must_hold_kernels_for_the_device(tmp_path, monkeypatch, capability, archs, ok):
    monkeypatch.setattr(gpu_check, "device_arch", lambda: capability)
    info = {"compiler": "gcc", "with_cuda": True, "cuda_version": "13.0", "cuda_archs": archs}
    outputs = ["build log", "a warning\n" + json.dumps(info) + "\n"]
    if ok:
        assert gpu_check.evaluate_build(make_context(tmp_path), outputs)["cuda_archs"] == archs
    else:
        with pytest.raises(gpu_check.StepFailed, match="no 900 kernels"):
            gpu_check.evaluate_build(make_context(tmp_path), outputs)
    with pytest.raises(gpu_check.StepFailed, match="with_cuda=False"):
        gpu_check.evaluate_build(make_context(tmp_path), ["", json.dumps(dict(info, with_cuda=False))])


def test_the_build_needs_nvcc_but_the_dry_run_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "nvcc_path", lambda: None)
    ctx = make_context(tmp_path)
    with pytest.raises(gpu_check.StepFailed, match="CUDA_HOME"):
        gpu_check.plan_build(ctx)
    ctx.dry_run = True
    build, probe = gpu_check.plan_build(ctx)
    assert build.argv[1:] == ["setup.py", "build_ext", "--inplace"] and build.env["FORCE_CUDA"] == "1"


def test_the_sources_digest_changes_with_any_kernel_file(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    kernel = tmp_path / "csrc" / "cuda" / "kernel.cu"
    kernel.write_text("__global__ void k() {}\n")
    before = gpu_check.csrc_digest(tmp_path)
    kernel.write_text("__global__ void k() { }\n")
    assert gpu_check.csrc_digest(tmp_path) != before
