"""The output-directory lock, the refusal to overwrite another run's checkpoints, and metrics.json on resume."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from salience_detr.engine.preflight import claim_output_dir
from salience_detr.engine.run_lock import LOCK_NAME, OutputDirError, RunLock, check_fresh_start, trim_metrics

HOLD_LOCK = """
import os, sys, time
from salience_detr.engine.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
if sys.argv[2] == "crash":
    os._exit(1)  # no release: what a SIGKILL or an OOM kill leaves behind
time.sleep(60)
"""


def hold_lock_in_subprocess(output_dir, mode):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(output_dir), mode], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_lock_records_pid_and_host_and_is_removed_on_release(tmp_path):
    with RunLock(str(tmp_path / "run")) as lock:
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert oct((tmp_path / "run" / LOCK_NAME).stat().st_mode & 0o777) != "0o600"
    assert not os.path.exists(lock.path)
    RunLock(str(tmp_path / "run")).acquire().release()  # free again


def test_second_run_stops_naming_the_path_and_the_other_pid(tmp_path):
    holder = hold_lock_in_subprocess(tmp_path, "hold")
    try:
        with pytest.raises(OutputDirError) as error:
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    message = str(error.value)
    assert str(tmp_path) in message and f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert "train.output_dir=" in message  # the fix


def test_lock_in_the_same_process_is_refused_too(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()


def test_stale_lock_of_a_crashed_run_is_taken_over(tmp_path, caplog):
    crashed = hold_lock_in_subprocess(tmp_path, "crash")
    crashed.wait()
    assert (tmp_path / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="salience_detr.engine.run_lock"):
        with RunLock(str(tmp_path)):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"from pid {crashed.pid}, which ended without releasing it" in caplog.text


def test_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 12345, "host": "other-node-7"}))
    with pytest.raises(OutputDirError, match=r"pid 12345 on host other-node-7.*another host.*delete .*run\.lock"):
        RunLock(str(tmp_path)).acquire()
    assert (tmp_path / LOCK_NAME).exists()  # left for its owner


def test_fresh_run_into_checkpoints_stops_unless_resume_or_overwrite(tmp_path, caplog):
    for name in ("model_0000009.pth", "last_checkpoint", "metrics.json", "log.txt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(OutputDirError) as error:
        check_fresh_start(str(tmp_path), resume=False, overwrite=False)
    message = str(error.value)
    assert "already holds checkpoints" in message and "model_0000009.pth" in message
    assert "--resume" in message and "train.overwrite=True" in message and "train.output_dir=" in message
    check_fresh_start(str(tmp_path), resume=True, overwrite=False)
    assert (tmp_path / "model_0000009.pth").exists()
    with caplog.at_level(logging.WARNING, logger="salience_detr.engine.run_lock"):
        check_fresh_start(str(tmp_path), resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]
    assert "deleting 3 files" in caplog.text


def test_empty_or_log_only_dir_is_a_fresh_start(tmp_path):
    (tmp_path / "log.txt").write_text("x")
    check_fresh_start(str(tmp_path), resume=False, overwrite=False)
    check_fresh_start(str(tmp_path / "missing"), resume=False, overwrite=False)


def test_trim_metrics_drops_repeated_rows_in_place(tmp_path):
    path = tmp_path / "metrics.json"
    rows = [{"iteration": i, "loss": 1.0 / (i + 1)} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 1')  # a row cut by a kill
    writer = open(path, "a")  # detectron2's JSONWriter holds the file open like this before the resume starts
    inode = path.stat().st_ino
    assert trim_metrics(str(tmp_path), start_iter=6) == 5
    writer.write(json.dumps({"iteration": 6, "loss": 0.5}) + "\n")
    writer.close()
    assert path.stat().st_ino == inode
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5, 6]
    assert trim_metrics(str(tmp_path / "none"), start_iter=3) == 0


def test_claim_output_dir_locks_only_in_the_main_process(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"train": {"output_dir": str(tmp_path / "run"), "overwrite": False}})
    assert claim_output_dir(cfg, resume=False, eval_only=False, is_main=False) is None
    assert not (tmp_path / "run").exists()
    lock = claim_output_dir(cfg, resume=False, eval_only=False, is_main=True)
    assert (tmp_path / "run" / LOCK_NAME).exists()
    lock.release()
    (tmp_path / "run" / "model_final.pth").write_text("x")
    with pytest.raises(OutputDirError, match="train.overwrite=True"):
        claim_output_dir(cfg, resume=False, eval_only=False, is_main=True)
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # a refused run leaves no lock behind
    claim_output_dir(cfg, resume=False, eval_only=True, is_main=True).release()  # evaluation writes no checkpoints


def test_other_processes_stop_with_the_main_process_refusal(tmp_path, monkeypatch):
    """Without this, the other machines would wait at their first collective until the 30-minute timeout."""
    from detectron2.utils import comm
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"train": {"output_dir": str(tmp_path), "overwrite": False}})
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", lambda mine: ["Output directory X already holds checkpoints", mine])
    with pytest.raises(OutputDirError, match=r"^The main process stopped the run: Output directory X already holds"):
        claim_output_dir(cfg, resume=False, eval_only=False, is_main=False)
    monkeypatch.setattr(comm, "all_gather", lambda mine: [mine, None])
    assert claim_output_dir(cfg, resume=False, eval_only=False, is_main=False) is None


def test_lock_file_of_a_live_pid_is_refused_even_without_flock(tmp_path):
    """On a file system where flock does nothing, the recorded pid still tells a live run from a crashed one."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(OutputDirError, match=rf"pid {sleeper.pid} on host .*If pid {sleeper.pid} is not that run"):
            RunLock(str(tmp_path)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    RunLock(str(tmp_path)).acquire().release()  # dead now: taken over
