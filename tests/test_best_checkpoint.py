"""model_best.pth keeps the better of the evaluations, leaves last_checkpoint alone and survives --resume."""

from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.engine import AtomicDetectionCheckpointer, BestCheckpointer
from salience_detr.engine.best_checkpoint import read_best_metric

EVAL_PERIOD = 10


def _evaluate(hook: BestCheckpointer, model: nn.Module, storage: EventStorage, iteration: int, ap: float) -> None:
    """What one EvalHook + BestCheckpointer step does: weights change, the metric is stored, the hook checks it."""
    with torch.no_grad():
        model.weight.fill_(float(iteration))
    storage.iter = iteration
    storage.put_scalar("bbox/AP", ap, smoothing_hint=False)
    hook.trainer.iter = iteration
    hook.after_step()


def _hook(tmp_path, model: nn.Module, storage: EventStorage, resume: bool) -> BestCheckpointer:
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    hook = BestCheckpointer(EVAL_PERIOD, checkpointer, "bbox/AP", "max", resume=resume)
    hook.trainer = SimpleNamespace(storage=storage, iter=0, max_iter=1000)
    hook.before_train()
    return hook


def test_keeps_the_better_of_two_evaluations(tmp_path):
    model = nn.Linear(2, 2)
    with EventStorage() as storage:
        hook = _hook(tmp_path, model, storage, resume=False)
        AtomicDetectionCheckpointer(model, str(tmp_path)).save("model_0000004")
        _evaluate(hook, model, storage, EVAL_PERIOD - 1, ap=30.0)
        _evaluate(hook, model, storage, 2 * EVAL_PERIOD - 1, ap=20.0)
    best = torch.load(tmp_path / "model_best.pth")
    assert torch.all(best["model"]["weight"] == EVAL_PERIOD - 1), "the worse evaluation replaced model_best.pth"
    assert best["best_metric"] == {"name": "bbox/AP", "value": 30.0, "iteration": EVAL_PERIOD - 1}
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth", "saving the best moved last_checkpoint"


def test_a_better_evaluation_replaces_it(tmp_path):
    model = nn.Linear(2, 2)
    with EventStorage() as storage:
        hook = _hook(tmp_path, model, storage, resume=False)
        _evaluate(hook, model, storage, EVAL_PERIOD - 1, ap=20.0)
        _evaluate(hook, model, storage, 2 * EVAL_PERIOD - 1, ap=30.0)
    assert torch.all(torch.load(tmp_path / "model_best.pth")["model"]["weight"] == 2 * EVAL_PERIOD - 1)
    assert read_best_metric(str(tmp_path / "model_best.pth"))["value"] == 30.0


@pytest.mark.parametrize("resume", [True, False])
def test_resume_reads_the_recorded_best(tmp_path, resume):
    """A resumed run does not replace model_best.pth by a worse evaluation; a fresh run starts its own best."""
    model = nn.Linear(2, 2)
    with EventStorage() as storage:
        _evaluate(_hook(tmp_path, model, storage, resume=False), model, storage, EVAL_PERIOD - 1, ap=30.0)
    with EventStorage() as storage:
        hook = _hook(tmp_path, model, storage, resume=resume)
        assert hook.best_metric == (30.0 if resume else None)
        _evaluate(hook, model, storage, 3 * EVAL_PERIOD - 1, ap=10.0)
    kept = read_best_metric(str(tmp_path / "model_best.pth"))
    assert kept["value"] == (30.0 if resume else 10.0)


def test_a_truncated_best_checkpoint_is_named_not_unpickled(tmp_path):
    from salience_detr.engine import CheckpointFileError

    (tmp_path / "model_best.pth").write_bytes(b"PK\x03\x04 cut short by a full disk")
    with pytest.raises(CheckpointFileError, match="is not a readable checkpoint"):
        read_best_metric(str(tmp_path / "model_best.pth"))
