"""DetrTrainer.run_step reads its losses and gradient norms back in one transfer, whatever the accumulation.

detectron2's ``SimpleTrainer`` writes metrics with one ``.item()`` per loss (about 22 syncs per step on the tiny
config, plus the finiteness check); on a GPU each one waits for the whole step. Counted on the CPU with
``count_dispatch``, where the matcher's transfer of the cost matrices is free and not counted (on a GPU it is the
model's one ``device_to_host``).
"""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage
from test_loss_curve import TINY_CONFIG, fixed_batches
from test_sync_budget import TRAIN_SYNCS
from torch import nn

from salience_detr.engine import DetrTrainer, trainer_from_config
from salience_detr.utils.dispatch_count import count_dispatch


def _tiny_trainer(accumulate_steps: int) -> DetrTrainer:
    """The tiny config's model, clipping and (fused) AdamW."""
    cfg = LazyConfig.load(str(TINY_CONFIG))
    cfg.train.accumulate_steps = accumulate_steps
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    batches = fixed_batches(accumulate_steps + 1)[1:]  # batches with boxes in both images
    return trainer_from_config(cfg, model, iter(batches), instantiate(cfg.optimizer), None)


def test_run_step_reads_the_losses_back_once_beyond_the_model():
    trainer = _tiny_trainer(accumulate_steps=2)
    with EventStorage(0) as storage:
        trainer.storage, trainer.iter = storage, 0
        with count_dispatch(sync_sites=True) as counts:
            trainer.run_step()
    trainer_sites = {site: n for site, n in counts.sync_sites.items() if "engine/trainer.py" in site}
    assert sum(trainer_sites.values()) == 1 and next(iter(trainer_sites)).startswith("tolist"), counts.table(0)
    assert counts.total_syncs <= 2 * TRAIN_SYNCS + 1, counts.table(0)  # two model steps, one transfer
    latest = {name: value for name, (value, _) in storage.latest().items()}
    terms = {name: value for name, value in latest.items() if name.startswith("loss_")}
    assert len(terms) > 10 and all(math.isfinite(value) for value in terms.values())
    assert latest["total_loss"] == pytest.approx(sum(terms.values()), rel=1e-6)
    assert latest["grad_norm"] > 0 and latest["data_time"] >= 0


class _ChangingLosses(nn.Module):
    """A model whose second batch returns another loss term."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        return {"loss_a" if self.calls == 1 else "loss_b": (self.weight * batch).sum()}


def test_accumulation_with_changing_loss_terms_is_refused():
    model = _ChangingLosses()
    trainer = DetrTrainer(model, iter([torch.ones(2)] * 2), torch.optim.SGD(model.parameters()), accumulate_steps=2)
    with EventStorage(0) as storage, pytest.raises(ValueError, match=r"\['loss_b'\] at accumulation step 1"):
        trainer.storage = storage
        trainer.run_step()
