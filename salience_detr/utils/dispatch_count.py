"""Count ATen calls and data-dependent host syncs of a piece of code, a development tool and a test helper.

On a GPU every data-dependent sync (a value or a size the host must read before it can go on) stalls the stream
and rules out CUDA graphs, and thousands of small calls make a step launch-bound. Both are visible on the CPU too,
so they can be counted and budgeted in CPU tests::

    with count_dispatch() as counts:
        loss = model(batch)
    print(counts.total_calls, counts.syncs)

Syncs counted: ``item`` (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``int()``, ``float()`` of a
tensor), ``nonzero``, ``masked_select``, ``unique`` (every variant), ``boolean_mask_index`` (indexing or index_put
with a bool mask), ``tolist``, ``device_to_host`` (a copy from an accelerator to the CPU outside ``tolist``) and
``nms`` (``torchvision::nms``: its CUDA kernel copies the suppression mask to the host, and its size is data's).
Calls are counted per ATen overload as the dispatcher sees them from Python, so composite ops count once, not
per kernel they decompose into. ``count_dispatch(sync_sites=True)`` also records the line that made each sync.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DispatchCounts", "count_dispatch"]

aten = torch.ops.aten
_SYNC_KINDS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.nonzero.out: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
}
# Ops of other libraries, by name: counting them must not import those libraries.
_NAMED_SYNC_KINDS = {"torchvision::nms": "nms"}
_INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
_COPY_OPS = (aten._to_copy.default, aten.copy_.default)


@dataclass
class DispatchCounts:
    """ATen calls per overload name (``aten::add.Tensor``) and data-dependent host syncs per kind."""

    calls: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)
    sync_sites: Counter[str] = field(default_factory=Counter)  # "kind at file:line", with sync_sites=True

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def table(self, top: int = 10) -> str:
        """Totals, the syncs by kind and the ``top`` most frequent calls, as plain text for logs."""
        lines = [f"ATen calls: {self.total_calls}, data-dependent host syncs: {self.total_syncs}"]
        lines += [f"  sync {kind}: {count}" for kind, count in self.syncs.most_common()]
        lines += [f"  {site}: {count}" for site, count in self.sync_sites.most_common()]
        lines += [f"  {name}: {count}" for name, count in self.calls.most_common(top)]
        return "\n".join(lines)


def _caller_site() -> str:
    """The innermost frame outside torch and this module: the line of user code that asked for the sync."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(torch_dir) and frame.filename != __file__:
            return f"{os.path.relpath(frame.filename)}:{frame.lineno}"
    return "unknown"


def _has_bool_index(indices: object) -> bool:
    return isinstance(indices, (list, tuple)) and any(
        isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) for index in indices
    )


def _is_device_to_host(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """A copy whose source is on an accelerator and whose result is on the CPU (``.cpu()``, ``.to("cpu")``)."""
    source = args[1] if func is aten.copy_.default else args[0]
    if not isinstance(source, torch.Tensor) or source.device.type in ("cpu", "meta"):
        return False
    if func is aten.copy_.default:
        return args[0].device.type == "cpu"
    target = kwargs.get("device")
    return target is not None and torch.device(target).type == "cpu"


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: DispatchCounts, sync_sites: bool) -> None:
        super().__init__()
        self.counts = counts
        self.sync_sites = sync_sites
        self.in_tolist = False

    def record_sync(self, kind: str) -> None:
        self.counts.syncs[kind] += 1
        if self.sync_sites:
            self.counts.sync_sites[f"{kind} at {_caller_site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts.calls[func.name()] += 1
        kind = _SYNC_KINDS.get(func) or _NAMED_SYNC_KINDS.get(func.name())
        if kind is None and func in _INDEX_OPS and _has_bool_index(args[1]):
            kind = "boolean_mask_index"
        if kind is None and func in _COPY_OPS and not self.in_tolist and _is_device_to_host(func, args, kwargs):
            kind = "device_to_host"
        if kind is not None:
            self.record_sync(kind)
        return func(*args, **kwargs)


class _ToListCounter(TorchFunctionMode):
    """``tolist`` reads CPU memory without any ATen call, so it is counted where Python calls it."""

    def __init__(self, aten_counter: _AtenCounter) -> None:
        super().__init__()
        self.aten_counter = aten_counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.Tensor.tolist:
            return func(*args, **kwargs)
        self.aten_counter.record_sync("tolist")
        self.aten_counter.in_tolist = True  # its device-to-host copy is part of this one sync
        try:
            return func(*args, **kwargs)
        finally:
            self.aten_counter.in_tolist = False


@contextmanager
def count_dispatch(sync_sites: bool = False) -> Iterator[DispatchCounts]:
    """Count the ATen calls and host syncs of the enclosed code; the counts fill in as it runs.

    ``sync_sites`` records where each sync comes from (a stack walk per sync: slower, for finding them).
    """
    counts = DispatchCounts()
    aten_counter = _AtenCounter(counts, sync_sites)
    with _ToListCounter(aten_counter), aten_counter:
        yield counts
