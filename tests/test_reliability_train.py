"""Training-side reliability: each bad set-up stops early with the fix named, each fault leaves the run intact.

Covers a CUDA device on a CPU machine, ``--eval-only`` without weights, ``--resume`` past ``train.max_iter``, a
full disk while saving a checkpoint, the files' modes, ``metrics.json`` on resume and the log lines written
before the logger exists.
"""

import errno
import logging
import os
import subprocess

import pytest
import torch
from test_train_net import REPO, STANDIN_CONFIG, read_metrics, standin_overrides, subprocess_env, train_net_command

from salience_detr.engine import AtomicDetectionCheckpointer
from salience_detr.engine.preflight import PreflightError, check_device, eval_weights, resume_has_work
from salience_detr.utils.atomic import DiskFullError, atomic_write
from salience_detr.utils.held_logs import held_records, replay

TINY_CONFIG = "configs/salience_detr/salience_detr_tiny_synthetic.py"


class FullDisk:
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_cuda_device_without_cuda_names_the_cpu_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PreflightError, match=r"train.device=cuda but no CUDA device.*Add train.device=cpu"):
        check_device("cuda")
    with pytest.raises(PreflightError, match=r"'gpu' is not a device name; use train.device=cuda or cpu"):
        check_device("gpu")
    check_device("cpu")


def test_cuda_index_beyond_the_devices_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(PreflightError, match=r"train.device=cuda:5 but this machine has 2 CUDA device"):
        check_device("cuda:5")
    check_device("cuda:1")


def test_train_net_stops_on_cuda_before_building_the_model(monkeypatch, tiny_synthetic_cache, tmp_path):
    import train_net

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_net, "prepare_model", lambda cfg: pytest.fail("the model was built"))
    args = train_net.parse_args(["--config-file", TINY_CONFIG, *tiny_overrides(tiny_synthetic_cache, tmp_path)])
    with pytest.raises(PreflightError, match="train.device=cpu"):
        train_net.main(args)
    assert not (tmp_path / "run").exists()  # nothing written


def tiny_overrides(cache, tmp_path):
    return [f"datasets.synthetic.cache_dir={cache}", f"train.output_dir={tmp_path / 'run'}", "train.device=cuda"]


def test_eval_only_without_weights_is_an_error_and_random_is_an_opt_in(caplog):
    with pytest.raises(PreflightError, match=r"train.init_checkpoint is empty.*train.init_checkpoint=PATH.*=random"):
        eval_weights("")
    with caplog.at_level(logging.WARNING, logger="salience_detr.engine.preflight"):
        assert eval_weights("random") == ""
    assert "randomly initialised weights" in caplog.text
    assert eval_weights("out/model_final.pth") == "out/model_final.pth"


def test_train_net_eval_only_without_weights_stops_before_the_model(monkeypatch, tiny_synthetic_cache, tmp_path):
    import train_net

    monkeypatch.setattr(train_net, "prepare_model", lambda cfg: pytest.fail("the model was built"))
    overrides = [f"datasets.synthetic.cache_dir={tiny_synthetic_cache}", f"train.output_dir={tmp_path}/run"]
    args = train_net.parse_args(["--config-file", TINY_CONFIG, "--eval-only", *overrides, "train.device=cpu"])
    with pytest.raises(PreflightError, match="--eval-only needs weights"):
        train_net.main(args)


def test_resume_past_max_iter(caplog):
    assert resume_has_work(5, 10, "out/model_0000004.pth")
    with caplog.at_level(logging.INFO, logger="salience_detr.engine.preflight"):
        assert not resume_has_work(10, 10, "out/model_final.pth")
    assert "Nothing to do" in caplog.text and "Raise train.max_iter" in caplog.text
    with pytest.raises(PreflightError, match=r"at iteration 10, but train.max_iter=4\. Raise train.max_iter above 10"):
        resume_has_work(11, 4, "out/model_0000010.pth")


def test_disk_full_names_the_path_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pth"
    atomic_write(str(path), lambda f: torch.save({"w": torch.ones(3)}, f))
    with pytest.raises(DiskFullError, match=rf"No space left on the disk holding {path}.*previous file there is int"):
        atomic_write(str(path), lambda f: torch.save({"w": torch.zeros(100_000)}, FullDisk(f, 4096)))
    torch.testing.assert_close(torch.load(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]  # no temporary file left


def test_checkpointer_disk_full_names_the_intact_checkpoint_and_resume(tmp_path, monkeypatch):
    checkpointer = AtomicDetectionCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    checkpointer.save("model_0000001")
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda data, f: real_save(data, FullDisk(f, 64)))
    with pytest.raises(DiskFullError) as error:
        checkpointer.save("model_0000003")
    message = str(error.value)
    assert f"Disk full while saving checkpoint {tmp_path / 'model_0000003.pth'}" in message
    assert f"{tmp_path / 'model_0000001.pth'}, is intact" in message and "--resume" in message
    assert error.value.errno == errno.ENOSPC
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_other_write_errors_are_not_called_disk_full(tmp_path):
    def refuse(_file):
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(OSError) as error:
        atomic_write(str(tmp_path / "x"), refuse)
    assert not isinstance(error.value, DiskFullError)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write(str(tmp_path / "f"), lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode


def test_held_records_are_replayed_once_handlers_exist():
    target = logging.getLogger("salience_detr.test_held")
    with held_records("salience_detr.test_held") as records:
        logging.getLogger("salience_detr.test_held.child").info("model.num_classes = %d", 5)
    assert [r.getMessage() for r in records] == ["model.num_classes = 5"]
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        replay(records)
    finally:
        target.removeHandler(handler)
    assert seen == ["model.num_classes = 5"]


def test_held_warnings_still_show_when_the_block_fails(capsys):
    with pytest.raises(ValueError, match="bad config"):
        with held_records("salience_detr.test_held_failing"):
            logging.getLogger("salience_detr.test_held_failing").warning("dataset x is not available")
            logging.getLogger("salience_detr.test_held_failing").info("not shown")
            raise ValueError("bad config")
    assert capsys.readouterr().err.strip() == "dataset x is not available"


@pytest.fixture
def standin_config(tmp_path):
    path = tmp_path / "standin_config.py"
    path.write_text(STANDIN_CONFIG.format(repo=REPO))
    return path


def run(command):
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_resume_cases_end_to_end(standin_config, tiny_synthetic_cache, tmp_path):
    """One short run, then what users do with its directory: resume it, overrun it, lower max_iter, reuse it."""
    out = tmp_path / "run"
    overrides = standin_overrides(tiny_synthetic_cache, out, max_iter=4) + [
        "train.checkpointer.period=2",
        "train.eval_period=0",
        "model.num_classes=null",
    ]
    first = run(train_net_command(standin_config, overrides))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "model.num_classes = 5, from dataset" in (out / "log.txt").read_text()
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.glob("model_*.pth"))

    (out / "last_checkpoint").write_text("model_0000001.pth")  # as if killed after logging iterations 2 and 3
    resumed = run(train_net_command(standin_config, overrides, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [0, 1, 2, 3]

    finished = run(train_net_command(standin_config, overrides, "--resume"))
    assert finished.returncode == 0 and "Nothing to do" in finished.stdout + finished.stderr

    lowered = run(train_net_command(standin_config, [*overrides, "train.max_iter=2"], "--resume"))
    assert lowered.returncode != 0
    assert "PreflightError" in lowered.stderr and "Raise train.max_iter above 3" in lowered.stderr

    fresh = run(train_net_command(standin_config, overrides))
    assert fresh.returncode != 0 and "OutputDirError" in fresh.stderr and "train.overwrite=True" in fresh.stderr
    replaced = run(train_net_command(standin_config, [*overrides, "train.overwrite=True"]))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [0, 1, 2, 3]
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_eval_only_with_random_weights_on_purpose(standin_config, tiny_synthetic_cache, tmp_path):
    overrides = standin_overrides(tiny_synthetic_cache, tmp_path / "eval", max_iter=2) + [
        "train.init_checkpoint=random"
    ]
    result = run(train_net_command(standin_config, overrides, "--eval-only"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "train.init_checkpoint=random: evaluating randomly initialised weights" in log
    assert "Evaluation results for bbox" in log
