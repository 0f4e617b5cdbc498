"""A refused input ends a command with its one-line message and exit status 2, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from salience_detr.config.overrides import ConfigOverrideError
from salience_detr.tools.user_errors import USER_ERROR_STATUS, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
TYPO = "train.max_itr=5"


def test_a_user_error_becomes_its_message_and_status_2(capsys):
    with pytest.raises(SystemExit) as stop, exit_on_user_error("tool"):
        raise ConfigOverrideError("Unknown config key 'x'. Did you mean y?")
    assert stop.value.code == USER_ERROR_STATUS
    assert capsys.readouterr().err == "tool: ConfigOverrideError: Unknown config key 'x'. Did you mean y?\n"


def test_an_error_of_the_code_keeps_its_traceback():
    with pytest.raises(KeyError), exit_on_user_error("tool"):
        raise KeyError("a bug")


@pytest.mark.slow
@pytest.mark.parametrize(
    "tool, arguments",
    [
        ("benchmark", ["--config-file", TINY_CONFIG, "--opts", TYPO]),
        ("export_onnx", ["--config-file", TINY_CONFIG, "--output", "{tmp}/model.onnx", "--opts", TYPO]),
        ("check_dataset", ["--config-file", TINY_CONFIG, TYPO]),
        ("quickstart", ["--output-dir", "{tmp}/quickstart", "--opts", TYPO]),
    ],
)
def test_each_tool_with_overrides_refuses_a_typo_in_one_line(tool, arguments, tmp_path):
    command = [sys.executable, "-m", f"salience_detr.tools.{tool}", *(a.format(tmp=tmp_path) for a in arguments)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == USER_ERROR_STATUS, result.stderr[-3000:]
    assert f"{tool}: ConfigOverrideError: Unknown config key 'train.max_itr'" in result.stderr
    assert "Did you mean train.max_iter?" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())
