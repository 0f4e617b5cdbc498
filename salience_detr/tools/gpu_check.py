"""Check every CUDA claim of the project in one prepared run on a bare GPU machine, and record what it found.

    python -m salience_detr.tools.gpu_check [--dry-run] [--report-dir DIR] [--steps NAME,...] [--budget-s 420]

Run from the checkout. The steps, each a subprocess under its own time limit, all run even when one fails:

  machine         GPU, driver, torch, CUDA, nvcc, Python
  build           ``python setup.py build_ext --inplace`` for the device's architecture, against the torch there
  op_tests        the compiled ops' tests (test_ms_deform_attn*.py, test_grid_nms_cuda.py): none may fail or skip
  benchmark_ops   ``benchmark_ops --device cuda``: fp32/fp16/bf16, encoder and decoder shapes, vs the reference
  bundle          detectron2 and the wheels it needs, installed offline from .gpu_bundle (``make gpu-bundle``)
  cuda_tests      the other test files with CUDA cases (found by their skip mark): no CUDA case may skip
  train_*         the tiny synthetic config for 50 iterations in fp32, AMP fp16 and AMP bf16, then evaluated
  r50_latency     R50 eval forward at 800x1333, fp32 and bf16 autocast: latency, images/s, peak memory

The report is gpu_check.md, gpu_check.json and gpu_check.log in ``--report-dir`` ($OUT when set, else
output/gpu_check), rewritten after every step; the exit code is 1 when any step failed. ``--dry-run`` is for a
CPU machine: it runs what needs no GPU (the machine survey, the op test files parsed, the bundle's manifest, the
training overrides checked against the config, the latency worker on the tiny config) and marks the GPU steps
"skipped: no GPU" with the commands they would run. Rerunning some steps (``--steps``) on the same machine reuses
the work folder (the installed bundle); a fresh machine needs ``build`` again, and ``bundle`` for the training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from salience_detr.tools._cli import BUNDLE_DIR, MANIFEST

TINY_CONFIG = "configs/salience_detr/salience_detr_tiny_synthetic.py"
R50_CONFIG = "configs/salience_detr/salience_detr_r50_4scale_12ep.py"
OP_TESTS = ("tests/test_ms_deform_attn.py", "tests/test_ms_deform_attn_cuda.py", "tests/test_grid_nms_cuda.py")
REPORT_NAME = "gpu_check"
DEFAULT_BUDGET_S = 420.0
TRAIN_ITERS = 50
R50_SIZE = (800, 1333)
R50_ITERS, R50_WARMUP = 20, 5
LOG_TAIL_LINES = 40
# Imports the training and evaluation steps need, beyond torch: what the bundle must make importable.
TRAIN_IMPORTS = ("detectron2", "fvcore", "iopath", "omegaconf", "hydra", "pycocotools", "yacs", "termcolor", "scipy")


class StepFailed(Exception):
    """The step ran and did not pass; the message says what was wrong."""


class StepSkipped(Exception):
    """The step did not run here (no GPU in a dry run, not selected, nothing to check)."""


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    check: bool = True  # a non-zero exit fails the step at once; False leaves the verdict to the step's evaluation

    def shell(self) -> str:
        settings = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.env.items())
        return f"{settings} {shlex.join(self.argv)}".strip()


@dataclass
class StepResult:
    name: str
    title: str
    status: str = "passed"  # passed | failed | skipped
    reason: str = ""
    seconds: float = 0.0
    limit_s: float = 0.0
    commands: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""


@dataclass
class Context:
    root: Path
    work_dir: Path
    report_dir: Path
    bundle_dir: Path
    dry_run: bool
    deadline: float
    log: TextIO
    python: str = sys.executable
    step_deadline: float = 0.0

    @property
    def site_dir(self) -> Path:
        return self.work_dir / "site"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def child_env(self, extra: dict[str, str]) -> dict[str, str]:
        """The environment of every step's commands: unbuffered, no JIT rebuild, the bundle's packages first."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", SALIENCE_DETR_NO_JIT="1", **extra)
        if self.site_dir.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site_dir), os.environ.get("PYTHONPATH")]))
        return env


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    limit_s: float
    plan: Callable[[Context], list[Command]]
    evaluate: Callable[[Context, list[str]], dict[str, Any]]
    needs_gpu: bool = True
    dry: Callable[[Context], dict[str, Any]] | None = None  # the CPU counterpart a dry run runs instead


def run_command(ctx: Context, command: Command) -> tuple[int, str]:
    """Run one command in its own process group (killed whole at the step's deadline), its output streamed into
    the log as it comes (a run cut short keeps it); returns the exit code and that output."""
    timeout = ctx.step_deadline - time.monotonic()
    if timeout <= 0:
        raise StepFailed(f"no time left for: {command.shell()}")
    ctx.log.write(f"\n$ {command.shell()}\n")
    ctx.log.flush()
    start = ctx.log.tell()
    process = subprocess.Popen(
        command.argv,
        cwd=ctx.root,
        env=ctx.child_env(command.env),
        stdin=subprocess.DEVNULL,
        stdout=ctx.log.fileno(),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    ctx.log.seek(0, os.SEEK_END)
    with open(ctx.log.name, errors="replace") as log:
        log.seek(start)
        output = log.read()
    if process.returncode == -signal.SIGKILL and time.monotonic() >= ctx.step_deadline:
        raise StepFailed(f"timed out after {timeout:.0f} s: {command.shell()}\n{tail(output)}")
    return process.returncode, output


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def execute(step: Step, ctx: Context, result: StepResult) -> dict[str, Any]:
    """The step's numbers: its dry counterpart in a dry run, else its commands then its evaluation."""
    if ctx.dry_run and step.needs_gpu:
        numbers = step.dry(ctx) if step.dry else {}
        result.commands = [command.shell() for command in step.plan(ctx)]
        raise StepSkipped("no GPU (dry run)" + ("; its CPU counterpart passed" if step.dry else ""), numbers)
    outputs = []
    for command in step.plan(ctx):
        result.commands.append(command.shell())
        code, output = run_command(ctx, command)
        if code != 0 and command.check:
            raise StepFailed(f"exit code {code}: {command.shell()}\n{tail(output)}")
        outputs.append(output)
    return step.evaluate(ctx, outputs)


def run_step(step: Step, ctx: Context) -> StepResult:
    """Run one step to a verdict; any error becomes a failed step, so the steps after it still run."""
    limit = max(0.0, min(step.limit_s, ctx.remaining()))
    result = StepResult(step.name, step.title, limit_s=round(limit, 1))
    ctx.step_deadline = time.monotonic() + limit
    ctx.log.write(f"\n===== {step.name}: {step.title} (limit {limit:.0f} s)\n")
    print(f"[gpu_check] {step.name} ...", flush=True)
    start = time.monotonic()
    try:
        if limit <= 0 and not ctx.dry_run:
            raise StepFailed("not started: the run's time budget (--budget-s) is spent")
        result.numbers = execute(step, ctx, result)
    except StepSkipped as skipped:
        result.status, result.reason = "skipped", str(skipped.args[0])
        result.numbers = skipped.args[1] if len(skipped.args) > 1 else {}
    except StepFailed as failed:
        message = str(failed)
        result.status, result.reason = "failed", message.splitlines()[0]
        result.log_tail = "\n".join(message.splitlines()[1:])
    except Exception as error:  # a bug in one step's checking must not hide the other steps
        result.status, result.reason = "failed", f"{type(error).__name__}: {error}"
        result.log_tail = tail(traceback.format_exc())
    result.seconds = round(time.monotonic() - start, 1)
    ctx.log.write(f"----- {step.name}: {result.status} {result.reason}\n")
    ctx.log.flush()
    print(f"[gpu_check] {step.name}: {result.status} {result.reason} ({result.seconds} s)", flush=True)
    return result


# ---- machine


def _first_line(argv: list[str]) -> str | None:
    """First output line of a small probe command, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    lines = completed.stdout.strip().splitlines()
    return lines[0].strip() if completed.returncode == 0 and lines else None


def nvcc_path() -> Path | None:
    """nvcc of CUDA_HOME, else of /usr/local/cuda, else on PATH: the toolkit torch's extension builder should use."""
    home = os.environ.get("CUDA_HOME")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    on_path = shutil.which("nvcc")
    candidates += [Path(on_path)] if on_path else []
    return next((path.resolve() for path in candidates if path.is_file()), None)


def csrc_digest(root: Path) -> str:
    """SHA-256 over csrc/ (names and contents): which kernels a report speaks for, also where there is no git."""
    digest = hashlib.sha256()
    for path in sorted((root / "csrc").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def machine_numbers(ctx: Context) -> dict[str, Any]:
    """The machine and software a report speaks for."""
    nvcc = nvcc_path()
    release = None
    if nvcc:
        lines = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
        release = next((line.strip() for line in lines.splitlines() if "release" in line), None)
    numbers: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": str(nvcc) if nvcc else None,
        "nvcc_release": release,
        "git_commit": _first_line(["git", "-C", str(ctx.root), "rev-parse", "HEAD"]),
        "csrc_sha256": csrc_digest(ctx.root),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        numbers.update(
            gpu=properties.name,
            gpu_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
            driver=_first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    numbers["summary"] = numbers.get("gpu", "no GPU") + f", torch {torch.__version__}, CUDA {torch.version.cuda}"
    return numbers


# ---- build


def device_arch() -> str:
    """TORCH_CUDA_ARCH_LIST for the visible GPU ("9.0" for an H100/H200); in a dry run, setup.py's default."""
    if torch.cuda.is_available():
        return ".".join(map(str, torch.cuda.get_device_capability(0)))
    return "9.0"


def plan_build(ctx: Context) -> list[Command]:
    nvcc = nvcc_path()
    if nvcc is None and not ctx.dry_run:
        raise StepFailed("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): set CUDA_HOME to the CUDA toolkit")
    env = {
        "FORCE_CUDA": "1",
        "TORCH_CUDA_ARCH_LIST": device_arch(),
        "MAX_JOBS": str(os.cpu_count() or 1),
        "CUDA_HOME": str(nvcc.parent.parent) if nvcc else "NOT-FOUND",
    }
    probe = (
        "import json; from salience_detr.layers.ms_deform_attn import extension_build_info; "
        "print(json.dumps(extension_build_info()))"
    )
    return [
        Command([ctx.python, "setup.py", "build_ext", "--inplace"], env),
        Command([ctx.python, "-c", probe]),
    ]


def evaluate_build(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    """The freshly built extension must load, carry CUDA kernels, and have machine code for this GPU."""
    lines = outputs[-1].strip().splitlines()
    info = json.loads(lines[-1]) if lines else None
    if not info:
        raise StepFailed("salience_detr._C did not load after the build (see the log)")
    major, minor = device_arch().split(".")
    arch = str(int(major) * 100 + int(minor) * 10)  # nvcc's __CUDA_ARCH_LIST__ spelling: 9.0 -> 900
    archs = str(info.get("cuda_archs"))
    if not info.get("with_cuda") or arch not in archs.replace(",", " ").split():
        raise StepFailed(f"the build has no {arch} kernels: with_cuda={info.get('with_cuda')}, archs={archs}")
    built = sorted((ctx.root / "salience_detr").glob("_C*.so"), key=lambda path: path.stat().st_mtime)
    return {
        **info,
        "library_mib": round(built[-1].stat().st_size / 2**20, 1) if built else None,
        "summary": f"CUDA {info.get('cuda_version')}, archs {archs}",
    }


def dry_build(ctx: Context) -> dict[str, Any]:
    nvcc = nvcc_path()
    return {
        "nvcc": str(nvcc) if nvcc else None,
        "arch_assumed": device_arch(),
        "setup_py": (ctx.root / "setup.py").is_file(),
    }


# ---- tests on CUDA


CUDA_SKIP = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")


def other_cuda_test_files(root: Path) -> list[str]:
    """Test files beyond the op tests that hold CUDA cases (skipped without a GPU), found so new ones join in."""
    files = (path for path in sorted((root / "tests").glob("test_*.py")) if CUDA_SKIP.search(path.read_text()))
    return [name for name in (str(path.relative_to(root)) for path in files) if name not in OP_TESTS]


def plan_tests(report_name: str, files: Callable[[Context], Sequence[str]]) -> Callable[[Context], list[Command]]:
    def plan(ctx: Context) -> list[Command]:
        report = ctx.work_dir / f"{report_name}.xml"
        report.unlink(missing_ok=True)
        chosen = list(files(ctx))
        if not chosen:
            raise StepSkipped("no test file beyond the op tests has CUDA cases")
        argv = [ctx.python, "-m", "pytest", *chosen, "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}"]
        return [Command(argv, check=False)]

    return plan


def junit_counts(report: Path) -> dict[str, Any]:
    """Counts of a pytest junit XML report, and the tests that did not pass (skips with their reasons)."""
    root = ElementTree.parse(report).getroot()
    cases = list(root.iter("testcase"))
    not_passed: dict[str, list[str]] = {"failed": [], "errors": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag, kind in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                not_passed[kind].append(f"{name}: {found.get('message')}" if kind == "skipped" else name)
    counts = {kind: len(names) for kind, names in not_passed.items()}
    counts["passed"] = len(cases) - sum(counts.values())
    counts["tests"] = len(cases)
    return {**counts, "not_passed": {kind: names for kind, names in not_passed.items() if names}}


def evaluate_tests(report_name: str, any_skip_fails: bool) -> Callable[[Context, list[str]], dict[str, Any]]:
    """No failure or error; no skip at all (the op tests) or no skip that names CUDA or a GPU (the others)."""

    def evaluate(ctx: Context, outputs: list[str]) -> dict[str, Any]:
        report = ctx.work_dir / f"{report_name}.xml"
        if not report.is_file():
            raise StepFailed(f"pytest wrote no report ({report})\n{tail(outputs[0])}")
        counts = junit_counts(report)
        counts["summary"] = ", ".join(f"{counts[kind]} {kind}" for kind in ("passed", "failed", "errors", "skipped"))
        skips = counts["not_passed"].get("skipped", [])
        gpu_skips = [skip for skip in skips if any_skip_fails or "cuda" in skip.lower() or "gpu" in skip.lower()]
        if counts["failed"] or counts["errors"] or gpu_skips or not counts["tests"]:
            rule = "none may skip" if any_skip_fails else "no CUDA case may skip"
            raise StepFailed(f"{report_name}: {counts['summary']} (on a GPU {rule})\n{tail(outputs[0])}")
        return counts

    return evaluate


def dry_op_tests(ctx: Context) -> dict[str, Any]:
    """The test files parse and hold tests (CI's own collection imports them; no second pytest start here)."""
    import ast

    counts = {}
    for path in OP_TESTS:
        try:
            tree = ast.parse((ctx.root / path).read_text(), filename=path)
        except (OSError, SyntaxError) as error:
            raise StepFailed(f"cannot read the op tests {path}: {error}") from error
        counts[path] = sum(isinstance(node, ast.FunctionDef) and node.name.startswith("test_") for node in tree.body)
    if not all(counts.values()):
        raise StepFailed(f"an op test file holds no tests: {counts}")
    return {"test_functions": counts}


# ---- operator benchmark

BENCHMARK_COLUMNS = ("case", "dtype", "pass", "compiled_ms", "reference_ms", "speedup")


def plan_benchmark(ctx: Context) -> list[Command]:
    return [Command([ctx.python, "-m", "salience_detr.tools.benchmark_ops", "--device", "cuda", "--repeat", "10"])]


def benchmark_rows(output: str) -> list[dict[str, Any]]:
    """The rows of benchmark_ops' Markdown table (header and separator left out), numbers as floats."""
    rows = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != len(BENCHMARK_COLUMNS) or cells[0] == "case":
            continue
        if set(cells[3]) <= set("-:"):
            continue
        row: dict[str, Any] = dict(zip(BENCHMARK_COLUMNS[:3], cells[:3]))
        row.update({key: float(value) for key, value in zip(BENCHMARK_COLUMNS[3:], cells[3:])})
        rows.append(row)
    return rows


def evaluate_benchmark(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    rows = benchmark_rows(outputs[0])
    dtypes = {row["dtype"] for row in rows}
    if len(rows) != 12 or dtypes != {"float32", "float16", "bfloat16"}:
        raise StepFailed(
            f"expected 12 rows (3 dtypes x 2 cases x 2 passes), got {len(rows)} over {sorted(dtypes)}\n"
            + tail(outputs[0])
        )
    bad = [row for row in rows if not all(math.isfinite(row[key]) and row[key] > 0 for key in BENCHMARK_COLUMNS[3:])]
    if bad:
        raise StepFailed(f"non-positive or non-finite timings: {bad}")
    slowest = min(rows, key=lambda row: row["speedup"])
    return {"rows": rows, "summary": f"12 rows; lowest reference/compiled ratio {slowest['speedup']:.2f}"}


def dry_benchmark(ctx: Context) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("salience_detr.tools.benchmark_ops") is None:
        raise StepFailed("salience_detr.tools.benchmark_ops is missing")
    return {"module": "salience_detr.tools.benchmark_ops"}


# ---- offline bundle (prepared by python -m salience_detr.tools.prepare_gpu_bundle)


def bundle_wheels(bundle_dir: Path) -> list[Path]:
    """The bundle's wheels, each checked against the manifest's SHA-256."""
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.is_file():
        raise StepFailed(
            f"no bundle at {bundle_dir} ({MANIFEST} missing): run `make gpu-bundle` on a machine with PyPI "
            f"and carry {BUNDLE_DIR} to this one"
        )
    manifest = json.loads(manifest_path.read_text())
    wheels = []
    for entry in manifest["wheels"]:
        path = bundle_dir / entry["file"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise StepFailed(f"{path} is missing or differs from {MANIFEST}: prepare the bundle again")
        wheels.append(path)
    return wheels


def import_probe(ctx: Context) -> Command:
    code = "import salience_detr, " + ", ".join(TRAIN_IMPORTS) + "; import salience_detr.modeling; print('ok')"
    return Command([ctx.python, "-c", code])


def plan_bundle(ctx: Context) -> list[Command]:
    """Install the bundle into the work folder (first on every later step's PYTHONPATH), then import from it."""
    import importlib.util

    if not (ctx.bundle_dir / MANIFEST).is_file() and importlib.util.find_spec("detectron2") is not None:
        return [import_probe(ctx)]  # a machine that has detectron2 already needs no bundle
    wheels = bundle_wheels(ctx.bundle_dir)
    options = ["--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check", "-q", "--upgrade"]
    install = [ctx.python, "-m", "pip", "install", *options, "--target", str(ctx.site_dir), *map(str, wheels)]
    return [Command(install), import_probe(ctx)]


def evaluate_bundle(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    if not (ctx.bundle_dir / MANIFEST).is_file():
        return {"summary": "no bundle needed: detectron2 was importable already"}
    wheels = sorted(path.name for path in bundle_wheels(ctx.bundle_dir))
    return {"wheels": wheels, "site": str(ctx.site_dir), "summary": f"{len(wheels)} wheels installed, imports work"}


def dry_bundle(ctx: Context) -> dict[str, Any]:
    if not (ctx.bundle_dir / MANIFEST).is_file():
        raise StepSkipped(f"no bundle at {ctx.bundle_dir} (`make gpu-bundle` prepares it)", {})
    wheels = bundle_wheels(ctx.bundle_dir)
    size = sum(path.stat().st_size for path in wheels)
    return {"wheels": sorted(path.name for path in wheels), "bundle_mib": round(size / 2**20, 2)}


# ---- training the tiny config

TRAIN_RUNS = {"train_fp32": None, "train_amp_fp16": "float16", "train_amp_bf16": "bfloat16"}


def train_overrides(ctx: Context, name: str) -> list[str]:
    amp = TRAIN_RUNS[name]
    overrides = [
        "train.device=cuda",
        f"train.max_iter={TRAIN_ITERS}",
        f"train.eval_period={TRAIN_ITERS}",
        "train.log_period=5",
        f"train.checkpointer.period={TRAIN_ITERS}",
        "train.seed=0",
        f"train.output_dir={ctx.work_dir / name}",
        f"train.amp.enabled={amp is not None}",
    ]
    return overrides + ([f"train.amp.dtype={amp}"] if amp else [])


def plan_train(name: str) -> Callable[[Context], list[Command]]:
    def plan(ctx: Context) -> list[Command]:
        shutil.rmtree(ctx.work_dir / name, ignore_errors=True)  # detectron2 appends to an old metrics.json
        argv = [ctx.python, "train_net.py", "--config-file", TINY_CONFIG, *train_overrides(ctx, name)]
        return [Command(argv, {"SALIENCE_DETR_CACHE": str(ctx.work_dir / "cache")})]

    return plan


def training_metrics(metrics_file: Path) -> dict[str, Any]:
    """Loss curve, seconds per iteration and the final bbox metrics from detectron2's metrics.json."""
    if not metrics_file.is_file():
        raise StepFailed(f"training wrote no {metrics_file}")
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    losses = [(record["iteration"], record["total_loss"]) for record in records if "total_loss" in record]
    seconds = sorted(record["time"] for record in records if "time" in record)
    bbox = next((record for record in reversed(records) if "bbox/AP" in record), {})
    return {
        "loss_curve": [{"iteration": iteration, "total_loss": loss} for iteration, loss in losses],
        "seconds_per_iter": seconds[len(seconds) // 2] if seconds else None,
        "bbox": {key.split("/", 1)[1]: value for key, value in bbox.items() if key.startswith("bbox/")},
    }


def evaluate_train(name: str) -> Callable[[Context, list[str]], dict[str, Any]]:
    def evaluate(ctx: Context, outputs: list[str]) -> dict[str, Any]:
        numbers = training_metrics(ctx.work_dir / name / "metrics.json")
        check_training(numbers)
        curve = numbers["loss_curve"]
        numbers["summary"] = (
            f"loss {curve[0]['total_loss']:.3f} -> {curve[-1]['total_loss']:.3f}, AP {numbers['bbox']['AP']:.2f}, "
            f"{numbers['seconds_per_iter'] * 1e3:.0f} ms/iter"
        )
        return numbers

    return evaluate


def check_training(numbers: dict[str, Any]) -> None:
    """Losses logged, finite and lower at the end than at the start; an AP that is a number."""
    losses = [point["total_loss"] for point in numbers["loss_curve"]]
    if len(losses) < 2:
        raise StepFailed(f"fewer than two logged losses: {losses}")
    if not all(math.isfinite(loss) for loss in losses):
        raise StepFailed(f"non-finite loss: {losses}")
    if losses[-1] >= losses[0]:
        raise StepFailed(f"the loss did not fall over {TRAIN_ITERS} iterations: {losses}")
    ap = numbers["bbox"].get("AP")
    if ap is None or not math.isfinite(ap) or numbers["seconds_per_iter"] is None:
        raise StepFailed(f"no finite bbox AP or iteration time after training: bbox={numbers['bbox']}")


def dry_train(name: str) -> Callable[[Context], dict[str, Any]]:
    """Load the tiny config with the step's overrides as train_net will (``load_config``: every overridden key must
    exist, with a value of its type; the datasets registered and checked)."""

    def dry(ctx: Context) -> dict[str, Any]:
        import importlib.util

        if importlib.util.find_spec("detectron2") is None:
            raise StepSkipped("no GPU (dry run); detectron2 is not installed here, so its config was not checked", {})
        from salience_detr.config import ConfigOverrideError, load_config

        overrides = train_overrides(ctx, name)
        try:
            load_config(str(ctx.root / TINY_CONFIG), overrides)
        except ConfigOverrideError as error:
            raise StepFailed(f"{TINY_CONFIG}: {error}; update the overrides of {name}") from error
        return {"config": TINY_CONFIG, "overrides": overrides}

    return dry


# ---- model latency (the worker runs in its own process: python -m salience_detr.tools.gpu_check --time-model)

LATENCY_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def time_model(config_file: str, height: int, width: int, device: str, num_iter: int, warmup: int) -> dict:
    """Eval-mode forward of one random image in fp32 and under bf16 autocast: latency, images/s, peak memory."""
    from detectron2.config import instantiate

    from salience_detr.config import load_config
    from salience_detr.tools._timing import peak_memory_mb, random_image, time_forward, timing_numbers

    target = torch.device(device)
    # inference=True: the GPU machine has no COCO, so the class count comes from the config (checkpoint="": no
    # ImageNet download from train.init_checkpoint, the timing uses random weights)
    cfg = load_config(config_file, inference=True, checkpoint="")
    model = instantiate(cfg.model).to(target).eval()
    inputs = [{"image": random_image(height, width, target)}]
    results = {}
    last: dict[str, Any] = {}  # the latest forward's outputs
    for name, dtype in LATENCY_PRECISIONS.items():
        if target.type == "cuda":
            torch.cuda.reset_peak_memory_stats(target)
        with torch.no_grad(), torch.autocast(target.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            seconds = time_forward(lambda: last.update(outputs=model(inputs)), target, warmup, num_iter)
        instances = last["outputs"][0]["instances"]
        finite = bool(torch.isfinite(instances.scores).all() and torch.isfinite(instances.pred_boxes.tensor).all())
        timing = timing_numbers(seconds, len(inputs))
        results[name] = {
            **{key: round(timing[key], 2) for key in ("latency_ms_median", "latency_ms_min", "images_per_s")},
            "peak_memory_mb": round(peak_memory_mb(target)[0]),
            "detections": len(instances),
            "finite": finite,
        }
    return {
        "config": config_file,
        "size": [height, width],
        "device": device,
        "num_iter": num_iter,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,  # whether the fp32 timing used TF32 matmuls
        "precisions": results,
    }


def latency_command(ctx: Context, config: str, size: tuple[int, int], device: str, iters: int, warmup: int) -> Command:
    output = ctx.work_dir / f"latency_{device}.json"
    argv = [ctx.python, "-m", "salience_detr.tools.gpu_check", "--time-model", config, "--time-output", str(output)]
    argv += ["--time-size", f"{size[0]}x{size[1]}", "--time-device", device, "--time-iters", f"{iters},{warmup}"]
    return Command(argv)


def check_latency(numbers: dict[str, Any]) -> dict[str, Any]:
    for name in LATENCY_PRECISIONS:
        result = numbers["precisions"].get(name, {})
        if not result.get("finite") or not result.get("detections"):
            raise StepFailed(f"{name} forward gave no detections or non-finite ones: {result}")
    fp32, bf16 = (numbers["precisions"][name] for name in LATENCY_PRECISIONS)
    numbers["summary"] = (
        f"fp32 {fp32['latency_ms_median']} ms ({fp32['peak_memory_mb']} MB), "
        f"bf16 {bf16['latency_ms_median']} ms ({bf16['peak_memory_mb']} MB)"
    )
    return numbers


def plan_r50(ctx: Context) -> list[Command]:
    return [latency_command(ctx, R50_CONFIG, R50_SIZE, "cuda", R50_ITERS, R50_WARMUP)]


def evaluate_r50(ctx: Context, outputs: list[str]) -> dict[str, Any]:
    return check_latency(json.loads((ctx.work_dir / "latency_cuda.json").read_text()))


def dry_r50(ctx: Context) -> dict[str, Any]:
    """The worker's code on CPU, in this process, on the tiny config and a small image: its path, not timings."""
    worker_args = get_parser().parse_args(plan_r50(ctx)[0].argv[3:])
    if not worker_args.time_model or not worker_args.time_output:
        raise StepFailed(f"the latency worker's command lost its options: {plan_r50(ctx)[0].shell()}")
    return check_latency(time_model(str(ctx.root / TINY_CONFIG), 64, 96, "cpu", 1, 0))


STEPS = (
    Step("machine", "GPU, driver, torch, CUDA", 60, lambda ctx: [], lambda ctx, _: machine_numbers(ctx), False),
    Step("build", "build salience_detr._C for this GPU", 300, plan_build, evaluate_build, dry=dry_build),
    Step(
        "op_tests",
        "operator tests on CUDA",
        240,
        plan_tests("op_tests", lambda ctx: OP_TESTS),
        evaluate_tests("op_tests", any_skip_fails=True),
        dry=dry_op_tests,
    ),
    Step("benchmark_ops", "operator vs reference timings", 120, plan_benchmark, evaluate_benchmark, dry=dry_benchmark),
    Step("bundle", "detectron2 and its wheels, offline", 90, plan_bundle, evaluate_bundle, dry=dry_bundle),
    Step(
        "cuda_tests",
        "the other tests with CUDA cases",
        120,
        plan_tests("cuda_tests", lambda ctx: other_cuda_test_files(ctx.root)),
        evaluate_tests("cuda_tests", any_skip_fails=False),
        dry=lambda ctx: {"files": other_cuda_test_files(ctx.root)},
    ),
    *(
        Step(
            name,
            f"tiny config, {TRAIN_ITERS} iterations, {amp or 'fp32'}, then COCO eval",
            150,
            plan_train(name),
            evaluate_train(name),
            dry=dry_train(name),
        )
        for name, amp in TRAIN_RUNS.items()
    ),
    Step("r50_latency", "R50 eval forward at 800x1333, fp32 and bf16", 180, plan_r50, evaluate_r50, dry=dry_r50),
)


# ---- report


def exit_code(results: Sequence[StepResult]) -> int:
    return 1 if any(result.status == "failed" for result in results) else 0


def report_dict(results: Sequence[StepResult], dry_run: bool, started: float, budget_s: float) -> dict[str, Any]:
    machine = next((result.numbers for result in results if result.name == "machine"), {})
    counts = {status: sum(r.status == status for r in results) for status in ("passed", "failed", "skipped")}
    return {
        "tool": "salience_detr.tools.gpu_check",
        "dry_run": dry_run,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "budget_s": budget_s,
        "machine": machine,
        "summary": counts,
        "exit_code": exit_code(results),
        "steps": [asdict(result) for result in results],
    }


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(row.get(column, "")) for column in columns) + " |" for row in rows]


def _step_details(step: dict[str, Any]) -> list[str]:
    """A step's section: its reason, its numbers (lists of records as tables), commands and log tail."""
    lines = [f"### {step['name']}: {step['status']}", ""]
    if step["reason"]:
        lines += [step["reason"], ""]
    for key, value in step["numbers"].items():
        if key == "summary":
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines += [f"{key}:", "", *_markdown_table(value), ""]
        elif isinstance(value, dict) and value and all(isinstance(item, dict) for item in value.values()):
            lines += [f"{key}:", "", *_markdown_table([{"": name, **item} for name, item in value.items()]), ""]
        else:
            lines.append(f"- {key}: {json.dumps(value)}")
    if step["commands"]:
        lines += ["", "```", *step["commands"], "```"]
    if step["log_tail"]:
        lines += ["", "```", step["log_tail"], "```"]
    return lines + [""]


def report_markdown(report: dict[str, Any]) -> str:
    verdict = "FAILED" if report["exit_code"] else "PASSED"
    mode = " (dry run, no GPU)" if report["dry_run"] else ""
    machine = report["machine"]
    lines = [
        f"# GPU check: {verdict}{mode}",
        "",
        f"{report['started_utc']}, {report['seconds']} s of a {report['budget_s']:.0f} s budget; "
        f"{machine.get('summary', 'machine unknown')}. Steps: {report['summary']}.",
        "",
        "| step | status | seconds (limit) | result |",
        "|---|---|---:|---|",
    ]
    for step in report["steps"]:
        result = step["reason"] if step["status"] == "skipped" else step["numbers"].get("summary", step["reason"])
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']} ({step['limit_s']}) | {result} |")
    failed = [step["name"] for step in report["steps"] if step["status"] == "failed"]
    if failed:
        lines += ["", f"Rerun the failed steps: `python3 -m salience_detr.tools.gpu_check --steps {','.join(failed)}`"]
    lines += ["", "## Details", ""]
    for step in report["steps"]:
        lines += _step_details(step)
    return "\n".join(lines)


def write_report(report_dir: Path, report: dict[str, Any]) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (report_dir / f"{REPORT_NAME}.md").write_text(report_markdown(report))


# ---- command line


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU machine: run what needs no GPU, skip the rest")
    parser.add_argument("--report-dir", help="where the report goes (default: $OUT when set, else output/gpu_check)")
    parser.add_argument("--work-dir", help="training runs, installed wheels (default: $TMPDIR/salience_detr_gpu_check)")
    parser.add_argument("--bundle-dir", default=BUNDLE_DIR, help="the offline bundle (make gpu-bundle)")
    parser.add_argument("--steps", help="comma-separated steps to run, e.g. to rerun failed ones (default: all)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all steps together")
    hidden = argparse.SUPPRESS  # the latency worker's options, used by the r50_latency step
    parser.add_argument("--time-model", help=hidden)
    parser.add_argument("--time-output", help=hidden)
    parser.add_argument("--time-size", default="800x1333", help=hidden)
    parser.add_argument("--time-device", default="cuda", help=hidden)
    parser.add_argument("--time-iters", default=f"{R50_ITERS},{R50_WARMUP}", help=hidden)
    return parser


def checked_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Bad flags, a wrong folder or a missing GPU stop the run before any work."""
    args = parser.parse_args(argv)
    names = [step.name for step in STEPS]
    chosen = args.steps.split(",") if args.steps else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--steps: unknown {unknown}; choose from {names}")
    args.steps = chosen
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    missing = [path for path in ("setup.py", "train_net.py", *OP_TESTS) if not Path(path).is_file()]
    if missing:
        parser.error(f"run it from the salience-detr checkout ({missing} not found in {Path.cwd()})")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("PyTorch sees no CUDA GPU here; on a CPU machine use --dry-run")
    return args


def run_time_model(args: argparse.Namespace) -> None:
    height, width = (int(size) for size in args.time_size.split("x"))
    num_iter, warmup = (int(count) for count in args.time_iters.split(","))
    numbers = time_model(args.time_model, height, width, args.time_device, num_iter, warmup)
    Path(args.time_output).write_text(json.dumps(numbers, indent=2))


def run_all(args: argparse.Namespace) -> int:
    started = time.time()
    report_dir = Path(args.report_dir or os.environ.get("OUT") or "output/gpu_check").resolve()
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "salience_detr_gpu_check").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    results: list[StepResult] = []
    with open(report_dir / f"{REPORT_NAME}.log", "w") as log:
        ctx = Context(
            Path.cwd().resolve(),
            work_dir,
            report_dir,
            Path(args.bundle_dir).resolve(),
            args.dry_run,
            time.monotonic() + args.budget_s,
            log,
        )
        for step in STEPS:
            if step.name in args.steps:
                results.append(run_step(step, ctx))
            else:
                results.append(StepResult(step.name, step.title, "skipped", "not selected (--steps)"))
            write_report(report_dir, report_dict(results, args.dry_run, started, args.budget_s))
    code = exit_code(results)
    markdown = (report_dir / f"{REPORT_NAME}.md").read_text()
    print(markdown.split("\n## Details")[0], flush=True)  # the step table also reaches whoever sees only stdout
    print(f"[gpu_check] {'FAILED' if code else 'PASSED'}: report in {report_dir / REPORT_NAME}.md", flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.time_model:
        run_time_model(args)
        return 0
    return run_all(checked_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
