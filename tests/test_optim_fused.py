"""The common AdamW runs its fused update on every device: the per-parameter loop that torch picks on the CPU costs
several ATen calls per parameter and step, the foreach update reads every step counter on the host twice, and the fused
update does neither while giving the loop's parameters to float rounding."""

from __future__ import annotations

import copy

import torch
from detectron2.config import LazyConfig, instantiate
from test_loss_curve import REPO
from torch import nn

from salience_detr.utils.dispatch_count import count_dispatch


class _Tiny(nn.Module):
    """Parameters in every group of detr_param_groups (backbone, sampling_offsets, norm, bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*(nn.Linear(6, 6) for _ in range(4)), nn.Linear(6, 5))
        self.sampling_offsets = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)


def _optimizer(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    cfg = LazyConfig.load(str(REPO / "configs/common/optim.py"))
    cfg.AdamW.params.model = model
    cfg.AdamW.lr = 1e-2  # large steps, so a difference in any update would show
    cfg.AdamW.weight_decay = 0.1
    if not fused:
        cfg.AdamW.fused, cfg.AdamW.foreach = None, False
    return instantiate(cfg.AdamW)


def test_the_common_adamw_is_fused_reads_nothing_back_and_updates_like_the_loop():
    torch.manual_seed(0)
    loop_model = _Tiny()
    fused_model = copy.deepcopy(loop_model)
    loop, fused = _optimizer(loop_model, fused=False), _optimizer(fused_model, fused=True)
    assert fused.defaults["fused"] is True and len(fused.param_groups) == 4
    generator = torch.Generator().manual_seed(1)
    calls, syncs = {}, {}
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in loop_model.parameters()]
        for name, model, optimizer in (("loop", loop_model, loop), ("fused", fused_model, fused)):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            with count_dispatch() as counts:
                optimizer.step()
            calls[name], syncs[name] = counts.total_calls, counts.total_syncs
    for mine, theirs in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    assert calls["fused"] < calls["loop"] / 4, calls
    assert syncs["fused"] == 0, syncs
