"""The tools' shared helpers (salience_detr.tools._cli): the checkout check, the printed, timed steps, and no tool
importing another (what they share lives in tools/_*.py or the package)."""

import ast
import sys
from pathlib import Path

import pytest

from salience_detr.tools import _cli

REPO = Path(__file__).resolve().parents[1]


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


def _is_tool(path: Path) -> bool:
    """A tool is a module run with ``python -m``: it has a ``__main__`` block."""
    return '__name__ == "__main__"' in path.read_text()


# the installer runs as a plain script before detectron2 exists, importing nothing of the project, so the bundle
# builder reuses its wheel build instead of the other way round
TOOL_IMPORT_EXCEPTIONS = {("prepare_gpu_bundle", "install_detectron2")}


def test_no_tool_and_not_train_net_imports_another_tool():
    tools_dir = REPO / "salience_detr" / "tools"
    tools = {path.stem for path in tools_dir.glob("*.py") if _is_tool(path)}
    assert {"benchmark", "gpu_check", "check_dataset", "prepare_gpu_bundle"} <= tools
    found = set()
    for path in [*tools_dir.glob("*.py"), REPO / "train_net.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "salience_detr.tools":
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("salience_detr.tools."):
                names = {node.module.split(".")[2]}
            else:
                continue
            found |= {(path.stem, name) for name in names & tools if name != path.stem}
    assert found == TOOL_IMPORT_EXCEPTIONS, "move what tools share into salience_detr/tools/_*.py or a package module"
