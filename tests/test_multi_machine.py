"""Training as two machines of one process each, on localhost with GLOO: the flags the README gives for a cluster."""

import socket
import subprocess
import sys

import pytest
import torch
from test_train_net import REPO, STANDIN_CONFIG, read_metrics, standin_overrides, subprocess_env, train_net_command

import train_net
from salience_detr.engine.launch import process_group_backend


def test_the_backend_follows_the_configured_device_not_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [process_group_backend(device) for device in ("cpu", "cuda", "cuda:1", None)] == [
        "GLOO",
        "NCCL",
        "NCCL",
        "NCCL",
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_group_backend(None) == process_group_backend("cpu") == "GLOO"
    with pytest.raises(
        ValueError, match="train.device=cuda but PyTorch sees no CUDA device here; add train.device=cpu"
    ):
        process_group_backend("cuda")


def test_train_net_reads_the_device_before_starting_processes(monkeypatch):
    config = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
    args = train_net.parse_args(["--config-file", config, "train.device=cpu"])
    monkeypatch.setattr(train_net, "load_config", lambda *a: pytest.fail("one process loads its config once"))
    assert train_net.launch_device(args) is None
    monkeypatch.undo()
    args = train_net.parse_args(["--num-machines", "2", "--config-file", config, "train.device=meta"])
    assert train_net.launch_device(args) == "meta"  # the override, not the config's cpu


@pytest.fixture
def standin_config(tmp_path):
    path = tmp_path / "standin_config.py"
    path.write_text(STANDIN_CONFIG.format(repo=REPO))
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_machines_of_one_process_train_together(standin_config, tiny_synthetic_cache, tmp_path):
    out = tmp_path / "run"
    overrides = standin_overrides(tiny_synthetic_cache, out, max_iter=3) + ["train.eval_period=0"]
    dist_url = f"tcp://127.0.0.1:{free_port()}"
    machines = []
    for rank in (0, 1):
        flags = ["--num-machines", "2", "--machine-rank", str(rank), "--dist-url", dist_url]
        log = open(tmp_path / f"machine{rank}.log", "w")
        command = train_net_command(standin_config, overrides, *flags)
        machines.append(subprocess.Popen(command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [machine.wait(timeout=120) for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    logs = [(tmp_path / f"machine{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "world size 2" in logs[0]
    assert "world size 2" in (out / "log.txt.rank1").read_text()  # machine 1 joined the same run
    assert (out / "model_final.pth").is_file() and not (out / "run.lock").exists()
    assert [m["iteration"] for m in read_metrics(out) if "total_loss" in m] == [0, 1, 2]


ALL_REDUCE = """
import os, sys
import torch
import torch.distributed as dist
from salience_detr.engine.launch import launch

def main(rank):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print(f"pid {os.getpid()} sum {value.item()}", flush=True)

rank = int(sys.argv[2])
launch(main, 1, num_machines=2, machine_rank=rank, dist_url=sys.argv[1], args=(rank,))
print(f"launcher {os.getpid()} done", flush=True)
"""


@pytest.mark.slow
def test_one_process_per_machine_runs_in_the_launching_process():
    """No spawned copy per machine: half the start-up, and the launcher itself holds the rank."""
    dist_url = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-c", ALL_REDUCE, dist_url]
    machines = [subprocess.Popen([*command, str(rank)], stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [machine.communicate(timeout=120)[0] for machine in machines]
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output
        assert f"pid {machine.pid} sum 3.0" in output and f"launcher {machine.pid} done" in output
