"""The cached FrozenBN gives detectron2's numbers bit for bit, in fewer calls, and follows every change of a buffer."""

from __future__ import annotations

import copy

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from test_loss_curve import REPO

from salience_detr.modeling.frozen_bn import CachedFrozenBatchNorm2d, cache_frozen_batchnorm
from salience_detr.utils.dispatch_count import count_dispatch


def random_frozen_bn(channels: int = 8, seed: int = 0) -> FrozenBatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    norm = FrozenBatchNorm2d(channels)
    for name in ("weight", "bias", "running_mean"):
        getattr(norm, name).copy_(torch.randn(channels, generator=generator))
    norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return norm


def outputs_and_grads(norm, x):
    x = x.detach().clone().requires_grad_()
    out = norm(x)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad


def assert_same_as_detectron2(cached: CachedFrozenBatchNorm2d, x: torch.Tensor) -> None:
    reference = FrozenBatchNorm2d(cached.num_features, cached.eps)
    reference.load_state_dict(cached.state_dict())
    reference.to(cached.weight.dtype)
    for ours, theirs in zip(outputs_and_grads(cached, x), outputs_and_grads(reference, x)):
        assert torch.equal(ours, theirs)


@pytest.fixture
def cached():
    norm = random_frozen_bn()
    assert cache_frozen_batchnorm(norm) == 1 and type(norm) is CachedFrozenBatchNorm2d
    return norm


def test_bit_for_bit_and_two_calls_once_cached(cached):
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    assert_same_as_detectron2(cached, x)
    with count_dispatch() as counts:
        cached(x)
    assert counts.total_calls == 2, counts.table(5)  # detectron2's takes 9


def test_a_loaded_checkpoint_is_used(cached):
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    before = cached(x).detach()
    cached.load_state_dict(random_frozen_bn(seed=1).state_dict())
    assert not torch.equal(cached(x), before)
    assert_same_as_detectron2(cached, x)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_an_in_place_edit_of_any_buffer_is_used(cached, name):
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    cached(x)
    with torch.no_grad():
        getattr(cached, name).mul_(1.5).add_(0.25)
    assert_same_as_detectron2(cached, x)


def test_a_replaced_buffer_and_a_new_dtype_are_used(cached):
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    cached(x)
    cached.running_mean = torch.full((8,), 0.5)
    assert_same_as_detectron2(cached, x)
    cached.to(torch.float64)
    assert_same_as_detectron2(cached, x.double())
    cached.eps = 1e-3
    assert_same_as_detectron2(cached, x.double())


def test_without_gradient_the_fused_batch_norm_runs(cached):
    x = torch.randn(2, 8, 3, 3)
    with count_dispatch() as counts:
        out = cached(x)
    assert torch.equal(out, FrozenBatchNorm2d.forward(cached, x))
    assert "_affine_cache" not in cached.__dict__ and counts.calls["aten::native_batch_norm"] == 1, counts.table(5)


def test_the_r50_model_uses_it_with_detectron2s_state_dict():
    cfg = LazyConfig.load(str(REPO / "configs/models/salience_detr_r50.py"))
    backbone = instantiate(cfg.model.backbone)
    plain_keys = list(copy.deepcopy(backbone).state_dict())
    model = instantiate(cfg.model)
    norms = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 53 and all(type(m) is CachedFrozenBatchNorm2d for m in norms)
    assert list(model.backbone.state_dict()) == plain_keys
