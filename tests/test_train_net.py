"""train_net.py and the training-loop pieces: CPU runs with evaluation, SIGKILL + resume, two GLOO processes,
accumulation, clipping, atomic checkpoints, and the errors for bad set-ups.

The subprocess runs use a tiny stand-in detector (defined here) on a tiny generated shapes dataset, so they
exercise the training machinery in seconds; the real model's run is covered by the tiny synthetic config test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_SPEC
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances
from torch import nn

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.engine import AtomicDetectionCheckpointer, DetrTrainer, ModelEMA, NonFiniteLossError, resolve_amp

REPO = Path(__file__).resolve().parents[1]


class StandInDetector(nn.Module):
    """A few-parameter detector with the SalienceDETR interface: one box and class per image."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.norm = nn.LayerNorm(8)
        self.box_head = nn.Linear(8, 4)
        self.class_head = nn.Linear(8, num_classes)

    @property
    def device(self) -> torch.device:
        return self.box_head.weight.device

    def forward(self, batched_inputs):
        images = [x["image"].to(self.device).float()[None] / 255.0 for x in batched_inputs]
        features = self.norm(torch.cat([self.backbone(image) for image in images]))
        boxes = self.box_head(features).sigmoid()  # normalized cx, cy, w, h
        logits = self.class_head(features)
        if self.training:
            has_boxes = torch.tensor([len(x["instances"]) > 0 for x in batched_inputs])
            if not has_boxes.any():  # a crop can remove every box
                return {"loss_box": boxes.sum() * 0.0, "loss_class": logits.sum() * 0.0}
            targets, labels = [], []
            for x in (x for x, keep in zip(batched_inputs, has_boxes) if keep):
                h, w = x["image"].shape[-2:]
                gt = x["instances"].gt_boxes.tensor[:1] / torch.tensor([w, h, w, h])
                targets.append(torch.cat([(gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]], 1))
                labels.append(x["instances"].gt_classes[:1])
            keep = has_boxes.to(self.device)
            return {
                "loss_box": nn.functional.l1_loss(boxes[keep], torch.cat(targets).to(self.device)),
                "loss_class": nn.functional.cross_entropy(logits[keep], torch.cat(labels).to(self.device)),
            }
        results = []
        for x, box, logit in zip(batched_inputs, boxes, logits):
            h, w = x["height"], x["width"]
            xyxy = torch.cat([box[:2] - box[2:] / 2, box[:2] + box[2:] / 2]).clamp(0, 1) * torch.tensor([w, h, w, h])
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(xyxy[None])
            score, label = logit.softmax(-1).max(-1)
            instances.scores, instances.pred_classes = score[None], label[None]
            results.append({"instances": instances})
        return results


STANDIN_CONFIG = """
from detectron2.config import LazyCall as L, LazyConfig
from test_train_net import StandInDetector

_common = "{repo}/configs/common/"
_data = LazyConfig.load(_common + "data/synthetic.py")
dataloader, datasets = _data.dataloader, _data.datasets
optimizer = LazyConfig.load(_common + "optim.py").AdamW
train = LazyConfig.load(_common + "train.py").train
lr_multiplier = LazyConfig.load(_common + "schedule.py").lr_multiplier_12ep
model = L(StandInDetector)(num_classes=5)
"""


def standin_overrides(cache_dir, output_dir, max_iter):
    spec = [f"datasets.synthetic.{key}={value}" for key, value in TINY_SPEC.items()]
    return spec + [
        f"datasets.synthetic.cache_dir={cache_dir}",
        f"train.output_dir={output_dir}",
        f"train.max_iter={max_iter}",
        f"lr_multiplier.scheduler.num_updates={max_iter}",
        f"lr_multiplier.scheduler.milestones=[{max_iter * 3 // 4}]",
        "lr_multiplier.warmup_length=0.5",
        "train.device=cpu",
        "train.log_period=1",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.mapper.min_sizes=[64,80,96]",
        "dataloader.train.mapper.max_size=128",
        "dataloader.train.mapper.crop_pre_sizes=[64,80]",
        "dataloader.train.mapper.crop_size=[48,64]",
        "dataloader.test.mapper.test_min_size=96",
        "dataloader.test.mapper.test_max_size=128",
    ]


@pytest.fixture
def standin_config(tmp_path):
    path = tmp_path / "standin_config.py"
    path.write_text(STANDIN_CONFIG.format(repo=REPO))
    return path


def train_net_command(config, overrides, *flags):
    return [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config), *flags, *overrides]


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def run_train_net(config, overrides, *flags, timeout=240):
    result = subprocess.run(
        train_net_command(config, overrides, *flags),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.json").read_text().splitlines()]


@pytest.mark.slow
def test_cpu_run_trains_checkpoints_and_evaluates(standin_config, tiny_synthetic_cache, tmp_path):
    out = tmp_path / "run"
    overrides = standin_overrides(tiny_synthetic_cache, out, max_iter=4) + [
        "train.eval_period=4",
        "train.ema.enabled=True",
    ]
    log = run_train_net(standin_config, overrides)
    assert (out / "model_final.pth").is_file()
    assert "ema" in torch.load(out / "model_final.pth", weights_only=False)
    predictions = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert len(predictions) == TINY_SPEC["num_val"]
    assert "Evaluation results for bbox" in log
    iterations = [m["iteration"] for m in read_metrics(out) if "total_loss" in m]
    assert iterations == [0, 1, 2, 3]

    eval_out = tmp_path / "eval"
    eval_overrides = standin_overrides(tiny_synthetic_cache, eval_out, max_iter=4) + [
        f"train.init_checkpoint={out / 'model_final.pth'}",
        "train.ema.enabled=True",
    ]
    log = run_train_net(standin_config, eval_overrides, "--eval-only")
    assert "Evaluation results for bbox" in log and "holds no EMA weights" not in log
    # on a CPU --eval-only runs the inference levers (oneDNN convolutions and linears): the same detections to rounding
    evaluated = json.loads((eval_out / "inference" / "coco_instances_results.json").read_text())
    for key, atol in (("image_id", 0), ("category_id", 0), ("score", 1e-5), ("bbox", 1e-3)):
        got, want = (torch.tensor([p[key] for p in run], dtype=torch.float64) for run in (evaluated, predictions))
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda message, key=key: f"{key}: {message}")


def test_trainable_trains_only_the_named_modules(standin_config, tiny_synthetic_cache, tmp_path):
    out = tmp_path / "run"
    overrides = standin_overrides(tiny_synthetic_cache, out, max_iter=3) + [
        "train.trainable=[box_head]",
        "train.checkpointer.period=1",
        "train.eval_period=0",
    ]
    log = run_train_net(standin_config, overrides)
    assert "Training only ['box_head']: 36 of" in log
    first, last = (torch.load(out / f, weights_only=False)["model"] for f in ("model_0000000.pth", "model_final.pth"))
    assert not torch.equal(first["box_head.weight"], last["box_head.weight"])
    assert all(torch.equal(first[k], last[k]) for k in first if not k.startswith("box_head."))


def run_until_killed(command, log_path, done, timeout=180):
    """Start ``command``, SIGKILL it as soon as ``done()`` holds, and return whether it held."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=subprocess_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while not done() and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        reached = done()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run ended by itself: {Path(log_path).read_text()[-3000:]}"
    return reached


def logged_iterations(output_dir):
    path = Path(output_dir) / "metrics.json"
    return [m["iteration"] for m in read_metrics(output_dir) if "lr" in m] if path.exists() else []


@pytest.mark.slow
def test_resume_after_sigkill_continues_at_next_iteration_with_same_lr(standin_config, tiny_synthetic_cache, tmp_path):
    out = tmp_path / "run"
    max_iter = 400
    overrides = standin_overrides(tiny_synthetic_cache, out, max_iter) + [
        "train.checkpointer.period=3",
        "train.eval_period=0",
    ]
    command = train_net_command(standin_config, overrides)
    assert run_until_killed(command, tmp_path / "first.log", lambda: (out / "model_0000008.pth").exists())
    for checkpoint in out.glob("model_*.pth"):
        torch.load(checkpoint, weights_only=False)  # complete files only, never a truncated one
    last = (out / "last_checkpoint").read_text()
    resumed_from = int(last[len("model_") : -len(".pth")])
    first_resumed = resumed_from + 1
    first_run_iterations = logged_iterations(out)

    resumed = lambda: max(logged_iterations(out), default=-1) > max(first_run_iterations) + 1  # noqa: E731
    resume_command = train_net_command(standin_config, overrides, "--resume")
    assert run_until_killed(resume_command, tmp_path / "resumed.log", resumed)
    assert f"Starting training from iteration {first_resumed}" in (tmp_path / "resumed.log").read_text()
    resumed_metrics = [m for m in read_metrics(out) if m["iteration"] >= first_resumed]
    iterations = logged_iterations(out)
    assert iterations == sorted(set(iterations)), "the resume dropped the rows it repeats (no duplicates)"
    resumed_lrs = [(m["iteration"], m["lr"]) for m in resumed_metrics if "lr" in m]
    assert resumed_lrs[0][0] == first_resumed

    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(standin_config)), overrides)
    multiplier = instantiate(cfg.lr_multiplier)
    for iteration, lr in resumed_lrs:
        assert lr == pytest.approx(cfg.optimizer.lr * multiplier(iteration / max_iter), rel=1e-6)


@pytest.mark.slow
def test_two_cpu_processes_through_launch(standin_config, tiny_synthetic_cache, tmp_path):
    out = tmp_path / "run"
    overrides = standin_overrides(tiny_synthetic_cache, out, max_iter=2) + ["train.eval_period=2"]
    log = run_train_net(standin_config, overrides, "--num-gpus", "2")
    assert "world size 2" in log
    assert (out / "model_final.pth").is_file()
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [0, 1]


class _ListLoader:
    """An endless iterator over fixed batches, standing in for a detectron2 train loader."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


class _LinearLossModel(nn.Module):
    """loss = mean((w . x - y)^2) over the batch; batches are lists of (x, y) tensors."""

    def __init__(self, scale_loss: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.scale_loss = scale_loss

    def forward(self, batch):
        x = torch.stack([item[0] for item in batch])
        y = torch.stack([item[1] for item in batch])
        return {"loss_mse": ((x @ self.weight - y) ** 2).mean() * self.scale_loss}


def _batches():
    torch.manual_seed(0)
    return [[(torch.randn(2), torch.randn(())) for _ in range(2)] for _ in range(2)]


def _one_step(model, loader, **trainer_kwargs):
    from detectron2.utils.events import EventStorage

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = DetrTrainer(model, loader, optimizer, **trainer_kwargs)
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.run_step()
    return storage


def test_accumulation_matches_one_large_batch():
    batches = _batches()
    accumulated, full = _LinearLossModel(), _LinearLossModel()
    _one_step(accumulated, _ListLoader(batches), accumulate_steps=2)
    _one_step(full, _ListLoader([batches[0] + batches[1]]), accumulate_steps=1)
    torch.testing.assert_close(accumulated.weight, full.weight)


def test_gradient_clipping_bounds_the_update():
    model = _LinearLossModel(scale_loss=1000.0)
    before = model.weight.detach().clone()
    storage = _one_step(model, _ListLoader(_batches()), clip_grad_max_norm=0.1)
    assert storage.history("grad_norm").latest() > 0.1
    assert torch.linalg.vector_norm(model.weight.detach() - before) == pytest.approx(0.1 * 0.1, rel=1e-4)


class _BaseAndHeadModel(nn.Module):
    """Two independent linear losses, standing in for a model and an add-on head trained by its own loss."""

    def __init__(self, head_scale: float) -> None:
        super().__init__()
        self.base = _LinearLossModel(scale_loss=1000.0)
        self.head = _LinearLossModel(scale_loss=head_scale)

    def forward(self, batch):
        return {"loss_base": self.base(batch)["loss_mse"], "loss_head": self.head(batch)["loss_mse"]}


@pytest.mark.parametrize("separate", [(), ("head",)])
def test_separately_clipped_head_leaves_the_base_step_unchanged(separate):
    steps = []
    for head_scale in (1.0, 1000.0):
        model = _BaseAndHeadModel(head_scale)
        storage = _one_step(model, _ListLoader(_batches()), clip_grad_max_norm=0.1, clip_grad_separate=separate)
        steps.append(model.base.weight.detach().clone())
    assert torch.equal(steps[0], steps[1]) == bool(separate)
    assert ("grad_norm/head" in storage.histories()) == bool(separate)


def test_non_finite_loss_stops_with_iteration_and_terms():
    model = _LinearLossModel(scale_loss=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"iteration 0: \{'loss_mse': nan\}"):
        _one_step(model, _ListLoader(_batches()))


def test_accumulate_steps_must_be_positive():
    with pytest.raises(ValueError, match="accumulate_steps must be >= 1"):
        _one_step(_LinearLossModel(), _ListLoader(_batches()), accumulate_steps=0)


def test_amp_is_refused_on_cpu_and_checks_dtype():
    assert resolve_amp(False, "float16", "cpu") is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp(True, "float16", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_amp(True, "float8", "cuda")
    assert resolve_amp(True, "bfloat16", "cuda") == torch.bfloat16


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model = _LinearLossModel()
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def interrupted_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001")
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"

    monkeypatch.undo()
    (tmp_path / ".model_0000002.pth.abc123.tmp").write_bytes(b"left by a SIGKILL")
    checkpointer.save("model_0000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth"]


def test_ema_tracks_weights_and_resumes():
    model = _LinearLossModel()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11)
    expected = torch.tensor([1.0, -2.0]) * (2 / 11) + torch.tensor([2.0, -1.0]) * (9 / 11)
    torch.testing.assert_close(ema.model.weight.detach(), expected)
    restored = ModelEMA(_LinearLossModel(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.model.weight, ema.model.weight)
    assert restored.num_updates == 1


def test_dataset_with_more_classes_than_model_stops(standin_config, tiny_synthetic_cache):
    from salience_detr.config import loading

    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(str(standin_config)),
        [f"datasets.synthetic.cache_dir={tiny_synthetic_cache}", "model.num_classes=3"],
    )
    loading.register_config_datasets(cfg)
    with pytest.raises(ValueError, match=r"has 5 categories but model.num_classes=3"):
        loading.resolve_num_classes(cfg)
    cfg.model.num_classes = None
    loading.resolve_num_classes(cfg)
    assert cfg.model.num_classes == 5


@pytest.mark.slow
def test_tiny_synthetic_config_fast_dev_run(tiny_synthetic_cache, tmp_path):
    """The README's config with the real model: two iterations, a checkpoint, evaluation on two images."""
    out = tmp_path / "run"
    overrides = [f"datasets.synthetic.{key}={value}" for key, value in TINY_SPEC.items()] + [
        f"datasets.synthetic.cache_dir={tiny_synthetic_cache}",
        f"train.output_dir={out}",
        "train.fast_dev_run=True",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=2",
    ]
    config = REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py"
    log = run_train_net(config, overrides)
    assert (out / "model_final.pth").is_file()
    assert "Evaluation results for bbox" in log
    predictions = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert {p["image_id"] for p in predictions} <= {1, 2}
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [0, 1]


def test_a_wrong_input_ends_with_its_message_alone_and_status_2(standin_config, tmp_path):
    """What the command prints for a typo in an override: the message that names the fix, no traceback above it."""
    command = train_net_command(standin_config, [f"train.output_dir={tmp_path}", "train.max_itr=5"])
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train_net.py: ConfigOverrideError: Unknown config key 'train.max_itr'" in result.stderr
    assert "Did you mean train.max_iter?" in result.stderr and "Traceback" not in result.stderr


def test_missing_coco_files_stop_before_the_model(standin_config):
    """detectron2 registers COCO under $DETECTRON2_DATASETS (default ./datasets), which this checkout lacks."""
    from salience_detr.config import loading
    from salience_detr.data import DatasetPathError

    cfg = LazyConfig.load(str(standin_config))
    cfg.dataloader.train.dataset.names = "coco_2017_train"
    with pytest.raises(DatasetPathError, match="coco_2017_train"):
        loading.check_config_datasets(cfg)
