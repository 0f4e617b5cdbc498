"""convert_official on files it cannot read: the advice fits what was passed (no --allow-pickle advice when it was
given), and files that are not checkpoints at all are named as such."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from torch import nn

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.checkpoint.official import ConversionError, load_official_checkpoint
from salience_detr.tools import convert_official


@pytest.fixture
def pickled_objects(tmp_path):
    """A real checkpoint with its training arguments (an argparse Namespace, as training scripts save them): safe mode
    refuses it, --allow-pickle reads it."""
    path = tmp_path / "with_objects.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    return path


def test_objects_other_than_tensors_advise_allow_pickle_only_without_it(pickled_objects):
    with pytest.raises(ConversionError, match="if you trust the file, pass --allow-pickle"):
        load_official_checkpoint(str(pickled_objects))
    state_dict, wrapper = load_official_checkpoint(str(pickled_objects), allow_pickle=True)
    assert wrapper == "model" and list(state_dict) == ["w"]


def test_damaged_pickle_with_allow_pickle_says_so(tmp_path):
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=2)[:-6])
    with pytest.raises(ConversionError) as error:
        load_official_checkpoint(str(damaged), allow_pickle=True)
    message = str(error.value)
    assert "cannot be unpickled even with --allow-pickle" in message and "Download the official .pth" in message
    assert "pass --allow-pickle" not in message


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_a_text_file_is_not_a_checkpoint(tmp_path, allow_pickle):
    text = tmp_path / "model.pth"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(ConversionError, match="is not a PyTorch checkpoint") as error:
        load_official_checkpoint(str(text), allow_pickle=allow_pickle)
    assert "--allow-pickle" not in str(error.value)
    with pytest.raises(ConversionError, match="does not exist; pass the path of the official checkpoint"):
        load_official_checkpoint(str(tmp_path / "missing.pth"), allow_pickle=allow_pickle)


def test_cli_with_allow_pickle_does_not_advise_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert_official, "instantiate", lambda cfg: nn.Linear(2, 2))  # no model build: the file fails
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(pickle.dumps({"w": 1}, protocol=2)[:-3])
    argv = [str(damaged), str(tmp_path / "out.pth"), "--backbone-family", "resnet", "--allow-pickle"]
    assert convert_official.main(argv) == 1
    err = capsys.readouterr().err
    assert "even with --allow-pickle" in err and "pass --allow-pickle" not in err
    assert not (tmp_path / "out.pth").exists()
