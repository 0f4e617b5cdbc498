"""The common AdamW runs its multi-tensor (foreach) update on every device: the per-parameter loop that torch picks
on the CPU costs several ATen calls per parameter and step, and the foreach update is bit-identical to it."""

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


def _optimizer(model: nn.Module, foreach: bool) -> torch.optim.Optimizer:
    cfg = LazyConfig.load(str(REPO / "configs/common/optim.py"))
    cfg.AdamW.params.model = model
    cfg.AdamW.lr = 1e-2  # large steps, so a difference in any update would show
    cfg.AdamW.weight_decay = 0.1
    if not foreach:
        cfg.AdamW.foreach = False
    return instantiate(cfg.AdamW)


def test_the_common_adamw_uses_foreach_and_updates_bit_for_bit_like_the_loop():
    torch.manual_seed(0)
    loop_model = _Tiny()
    foreach_model = copy.deepcopy(loop_model)
    loop, foreach = _optimizer(loop_model, foreach=False), _optimizer(foreach_model, foreach=True)
    assert foreach.defaults["foreach"] is True and len(foreach.param_groups) == 4
    generator = torch.Generator().manual_seed(1)
    calls = {}
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in loop_model.parameters()]
        for name, model, optimizer in (("loop", loop_model, loop), ("foreach", foreach_model, foreach)):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            with count_dispatch() as counts:
                optimizer.step()
            calls[name] = counts.total_calls
    for mine, theirs in zip(foreach_model.parameters(), loop_model.parameters()):
        assert torch.equal(mine, theirs)
    assert calls["foreach"] < calls["loop"] / 2, calls
