"""The ATen call and host-sync counter on toy functions whose calls and syncs are known."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from salience_detr.utils.dispatch_count import count_dispatch


def data_dependent(x: torch.Tensor) -> None:
    """One sync of every kind the counter knows on the CPU, each written as users write it."""
    y = x + 1
    mask = y > 1
    y[mask].sum().item()  # boolean_mask_index, item
    torch.nonzero(mask)
    torch.unique(y)
    y.tolist()
    torch.masked_select(y, mask)
    if mask.any():  # item (bool of a tensor)
        y[mask] = 0.0  # boolean_mask_index (index_put_)


def test_counts_every_kind_of_sync():
    with count_dispatch() as counts:
        data_dependent(torch.tensor([0.5, -1.0, 2.0, 3.0]))
    assert counts.syncs == {
        "boolean_mask_index": 2,
        "item": 2,
        "nonzero": 1,
        "unique": 1,
        "tolist": 1,
        "masked_select": 1,
    }
    assert counts.total_syncs == 8
    assert counts.calls["aten::add.Tensor"] == 1 and counts.calls["aten::index.Tensor"] == 1
    assert counts.calls["aten::_unique2"] == 1 and counts.calls["aten::index_put_"] == 1


def test_sync_free_code_counts_calls_only():
    x = torch.arange(6.0)
    index = torch.tensor([0, 2])
    with count_dispatch() as counts:
        y = (x * 2).relu()
        y[index]  # integer indexing: no sync
        torch.where(y > 3, y, 0.0)
        y.sum()
    assert counts.total_syncs == 0
    assert counts.calls["aten::mul.Tensor"] == 1 and counts.calls["aten::relu"] == 1
    assert counts.calls["aten::index.Tensor"] == 1 and counts.calls["aten::where.self"] == 1
    assert counts.total_calls == sum(counts.calls.values()) >= 6
    assert "data-dependent host syncs: 0" in counts.table()


def test_counts_stop_at_the_end_of_the_block():
    with count_dispatch() as counts:
        torch.ones(3).sum()
    before = counts.total_calls
    torch.ones(3).nonzero()
    assert counts.total_calls == before and counts.total_syncs == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_to_host_copies_count_once():
    x = torch.arange(4.0, device="cuda")
    with count_dispatch() as counts:
        x.cpu()
        x.tolist()  # one sync, not also a device_to_host copy
        x.sum().item()
    assert counts.syncs == {"device_to_host": 1, "tolist": 1, "item": 1}


def test_sync_sites_name_the_line_that_synced():
    x = torch.tensor([1.0, 2.0])
    with count_dispatch(sync_sites=True) as counts:
        line = inspect.currentframe().f_lineno + 1
        x.tolist()
        x.sum().item()
    here = os.path.relpath(__file__)
    assert counts.sync_sites == {f"tolist at {here}:{line}": 1, f"item at {here}:{line + 1}": 1}
    assert f"tolist at {here}:{line}: 1" in counts.table()
