"""The tools' shared helpers (salience_detr.tools._cli): the checkout check and the printed, timed steps."""

import sys

import pytest

from salience_detr.tools import _cli


def test_a_step_is_printed_timed_and_a_failure_names_the_tool_and_the_step(tmp_path, capsys):
    timings = {}
    _cli.run_step("mytool", "say hi", [sys.executable, "-c", "print('hi')"], tmp_path, timings)
    assert "=== say hi" in capsys.readouterr().out and timings["say hi"] > 0
    with pytest.raises(SystemExit, match="mytool: step 'fail' failed with exit code 3"):
        _cli.run_step("mytool", "fail", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path, timings)


def test_the_checkout_is_the_current_directory_or_the_tool_says_where_to_run_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="mytool: run it from the salience-detr checkout"):
        _cli.checkout_root("mytool")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.py").write_text("")
    (tmp_path / "train_net.py").write_text("")
    assert _cli.checkout_root("mytool") == tmp_path
