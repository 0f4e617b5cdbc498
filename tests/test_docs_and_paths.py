"""The design lives in docs/: citations resolve, usage lines name real files, no sources found through parents."""

import io
import itertools
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/(\w+\.md)#([a-z][a-z0-9-]*)((?:(?:,| and| to) #[a-z][a-z0-9-]*)*)")
FOLLOW_UP = re.compile(r"#([a-z][a-z0-9-]*)")
ANCHOR = re.compile(r'<a id="([a-z0-9-]+)"></a>')
USAGE_PATH = re.compile(r"(?<![\w/.$-])((?:configs|demo|salience_detr)/[\w./{},-]*[\w/}])")
# Paths that usage lines name on purpose although this checkout does not have them.
NOT_IN_THIS_CHECKOUT = {
    "configs/salience_detr/my_dataset_r50_12ep.py": "README: the config a user writes for a custom dataset",
    "configs/salience_detr/salience_detr_resnet50_800_1333.py": "the official repository's config (parity tool)",
}


def python_files():
    roots = ("salience_detr", "configs", "demo")
    return [REPO / "train_net.py", *(p for root in roots for p in sorted((REPO / root).rglob("*.py")))]


def markdown_files():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "benchmarks").glob("*.md"))]


def prose_of(path):
    """Comments and string literals of a Python file (docstrings, help texts), or the whole of a Markdown file."""
    text = path.read_text()
    if path.suffix != ".py":
        return text
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return "\n".join(tok.string for tok in tokens if tok.type in (tokenize.COMMENT, tokenize.STRING))


def expand_braces(path):
    """``a_{x,y}.py`` -> ``a_x.py``, ``a_y.py`` (shell brace expansion, as README lines use it)."""
    pieces = re.split(r"\{([^{}]*)\}", path)
    options = [[piece] if i % 2 == 0 else piece.split(",") for i, piece in enumerate(pieces)]
    return ["".join(choice) for choice in itertools.product(*options)]


def test_docs_citations_name_existing_anchors():
    anchors = {doc.name: set(ANCHOR.findall(doc.read_text())) for doc in (REPO / "docs").glob("*.md")}
    cited, missing = 0, []
    for path in python_files() + markdown_files():
        for match in CITATION.finditer(path.read_text()):
            doc, names = match.group(1), [match.group(2), *FOLLOW_UP.findall(match.group(3))]
            cited += len(names)
            missing += [
                f"{path.relative_to(REPO)}: docs/{doc}#{name}" for name in names if name not in anchors.get(doc, ())
            ]
    assert cited >= 30, "the code should cite docs/model.md for the design"
    assert not missing, missing


def test_no_comment_cites_the_out_of_repo_spec():
    stale = [
        str(path.relative_to(REPO))
        for path in python_files() + sorted((REPO / "tests").glob("*.py"))
        if path != Path(__file__).resolve() and re.search(r"spec §|\(§\d|shared/design/", prose_of(path))
    ]
    assert not stale, stale


def test_usage_lines_name_existing_files():
    missing = []
    for path in python_files() + markdown_files():
        for match in USAGE_PATH.finditer(prose_of(path)):
            if re.search(r"\{[^},]*\}", match.group(1)):
                continue  # a format placeholder ("configs/{name}"), not a path
            for name in expand_braces(match.group(1).rstrip(".")):
                packaged = name.startswith("salience_detr/") and (REPO / "configs" / name).exists()
                if not ((REPO / name).exists() or packaged or name in NOT_IN_THIS_CHECKOUT):
                    missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing, sorted(set(missing))


@pytest.mark.parametrize("name", ["configs/models/salience_detr_{r50,swin_l}.py", "demo/demo.py"])
def test_brace_expansion_is_checked_file_by_file(name):
    assert all((REPO / expanded).is_file() for expanded in expand_braces(name))
    assert len(expand_braces(name)) == name.count(",") + 1


def test_package_code_finds_no_sources_through_parents():
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "salience_detr").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"parents\[\d\]", line) and re.search(r"tests|csrc|configs|train_net|demo", line)
    ]
    assert not offenders, offenders


def test_jit_build_sources_come_from_the_install_record_or_the_working_directory(tmp_path, monkeypatch):
    import importlib.metadata

    from salience_detr.layers import ms_deform_attn

    monkeypatch.chdir(REPO)
    assert (ms_deform_attn._csrc_dir() / "ops.cpp").is_file()

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="run from a source checkout"):
        ms_deform_attn._csrc_dir()
