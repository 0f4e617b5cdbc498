"""The level layout is checked once per transformer forward, never in each call of the op (unless asked to)."""

from __future__ import annotations

import pytest
import torch
from test_transformer import make_inputs, make_transformer

from salience_detr.layers import ms_deform_attn as msda
from salience_detr.modeling import transformer as transformer_module


@pytest.fixture
def layout_checks(monkeypatch):
    """Counts the checks made by the transformer and by the op wrapper, which each name the function globally."""
    calls = {"transformer": 0, "op": 0}

    def counted(where, check):
        def run(*args):
            calls[where] += 1
            return check(*args)

        return run

    # the transformer checks the host values it builds the layout from; the op (debug switch) reads its tensors
    monkeypatch.setattr(transformer_module, "check_level_values", counted("transformer", msda.check_level_values))
    monkeypatch.setattr(msda, "check_level_layout", counted("op", msda.check_level_layout))
    monkeypatch.delenv(msda.CHECK_ENV, raising=False)
    return calls


def run_transformer() -> None:
    transformer = make_transformer(enc_layers=1, dec_layers=1).eval()
    with torch.no_grad():
        transformer(*make_inputs(batch=1))


def test_one_check_per_transformer_forward(layout_checks):
    run_transformer()
    assert layout_checks == {"transformer": 1, "op": 0}


def test_debug_switch_checks_every_op_call(layout_checks, monkeypatch):
    monkeypatch.setenv(msda.CHECK_ENV, "1")
    run_transformer()
    assert layout_checks["transformer"] == 1 and layout_checks["op"] == 2  # one encoder and one decoder layer
