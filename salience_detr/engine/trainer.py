"""The training step: gradient accumulation, global-norm clipping, AMP on CUDA, non-finite loss checks.

One trainer iteration is one optimizer step over ``accumulate_steps`` batches, so the schedule, the
checkpoints and ``--resume`` all count optimizer steps whatever the accumulation.

Modules named in ``clip_grad_separate`` (e.g. the RoI head, whose loss trains only itself) are clipped on their own:
under one global norm their gradients would rescale every other parameter's step, so adding them would change how
the rest of the model trains.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


def resolve_amp(enabled: bool, dtype: str, device: str) -> torch.dtype | None:
    """The autocast dtype, or None when AMP is off. AMP here is a CUDA feature; on CPU it is refused."""
    if not enabled:
        return None
    if dtype not in AMP_DTYPES:
        raise ValueError(f"train.amp.dtype must be one of {sorted(AMP_DTYPES)}, got {dtype!r}")
    if not str(device).startswith("cuda"):
        raise ValueError(
            f"train.amp.enabled=True needs a CUDA device, but train.device={device!r}. "
            "Set train.amp.enabled=False to train on CPU."
        )
    return AMP_DTYPES[dtype]


def clip_groups(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, separate: Sequence[str]
) -> dict[str, list[torch.nn.Parameter]]:
    """The optimizer's parameters split by clipping group: "" for the model, then each ``separate`` module that has
    parameters (a module path such as "roi_refine"; DDP's "module." prefix is ignored)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    group_of = {}
    for name, param in model.named_parameters():
        group_of[id(param)] = next((prefix for prefix in separate if name.startswith(f"{prefix}.")), "")
    groups: dict[str, list[torch.nn.Parameter]] = {"": []}
    for param_group in optimizer.param_groups:
        for param in param_group["params"]:
            groups.setdefault(group_of.get(id(param), ""), []).append(param)
    return groups


class DetrTrainer(SimpleTrainer):
    """``SimpleTrainer`` with accumulation, clipping and optional AMP (fp16 uses a GradScaler, bf16 none)."""

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        accumulate_steps: int = 1,
        clip_grad_max_norm: float | None = None,
        clip_grad_norm_type: float = 2.0,
        clip_grad_separate: Sequence[str] = (),
        amp_dtype: torch.dtype | None = None,
        frozen_modules: Sequence[torch.nn.Module] = (),
    ) -> None:
        if accumulate_steps < 1:
            raise ValueError(f"train.accumulate_steps must be >= 1, got {accumulate_steps}")
        super().__init__(model, data_loader, optimizer)
        self.accumulate_steps = accumulate_steps
        self.clip_grad_max_norm = clip_grad_max_norm
        self.clip_grad_norm_type = clip_grad_norm_type
        self.clip_groups = clip_groups(model, optimizer, clip_grad_separate)
        self.amp_dtype = amp_dtype
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.frozen_modules = list(frozen_modules)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _forward(self, data) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self._autocast():
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        return sum(loss_dict.values()), loss_dict

    def run_step(self) -> None:
        """One optimizer step. The losses and gradient norms reach the host in one transfer, after the backward and
        before the step: detectron2's metric writer reads every loss with its own ``.item()`` (a sync each)."""
        assert self.model.training, "[DetrTrainer] model was changed to eval mode!"
        for module in self.frozen_modules:  # again every step: evaluation hooks switch the whole model back to train
            module.eval()
        self.optimizer.zero_grad(set_to_none=True)
        data_time = 0.0
        names: list[str] = []
        summed = None
        for micro_step in range(self.accumulate_steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            is_last = micro_step == self.accumulate_steps - 1
            sync = contextlib.nullcontext()
            if not is_last and isinstance(self.model, DistributedDataParallel):
                sync = self.model.no_sync()
            with sync:
                losses, loss_dict = self._forward(data)
                scaled = losses / self.accumulate_steps
                (self.grad_scaler.scale(scaled) if self.grad_scaler else scaled).backward()
            names = names or list(loss_dict)
            values = stacked_losses(loss_dict, names, micro_step) / self.accumulate_steps
            summed = values if summed is None else summed + values
        norms = self._clip()
        host = torch.cat([summed, torch.stack(list(norms.values()))]) if norms else summed
        host_values = host.tolist()  # the one device-to-host transfer of the step
        loss_values = dict(zip(names, host_values))
        if not all(math.isfinite(value) for value in loss_values.values()):
            raise NonFiniteLossError(f"Non-finite loss at iteration {self.iter}: {loss_values}")
        write_host_metrics(loss_values, data_time)
        for key, norm in zip(norms, host_values[len(names) :]):
            self.storage.put_scalar(key, norm if math.isfinite(norm) else float("nan"))
        self._step()

    def _clip(self) -> dict[str, torch.Tensor]:
        """Clip each group's gradients (unscaled first under fp16); the norms stay on the device for the transfer."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        norms: dict[str, torch.Tensor] = {}
        if self.clip_grad_max_norm:
            for name, group in self.clip_groups.items():
                params = [p for p in group if p.grad is not None]
                if params:
                    norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_max_norm, self.clip_grad_norm_type)
                    norms["grad_norm" if not name else f"grad_norm/{name}"] = norm.float()
        return norms

    def _step(self) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def stacked_losses(loss_dict: dict[str, torch.Tensor], names: list[str], micro_step: int) -> torch.Tensor:
    """The loss terms as one detached float vector in the order of ``names`` (the first batch's terms)."""
    if set(loss_dict) != set(names):
        raise ValueError(
            f"the model returned the losses {sorted(loss_dict)} at accumulation step {micro_step} but {sorted(names)} "
            "at step 0; gradient accumulation needs the same loss terms from every batch"
        )
    return torch.stack([loss_dict[name].detach().float() for name in names])


def write_host_metrics(metrics: dict[str, float], data_time: float, prefix: str = "") -> None:
    """detectron2's ``SimpleTrainer.write_metrics`` for losses already on the host: gathered from every process,
    data_time as the slowest worker's, the mean of each loss and ``total_loss`` into the event storage."""
    metrics_dict = {**metrics, "data_time": data_time}
    all_metrics_dict = comm.gather(metrics_dict)
    if not comm.is_main_process():
        return
    storage = get_event_storage()
    storage.put_scalar("data_time", np.max([x.pop("data_time") for x in all_metrics_dict]))
    metrics_dict = {k: np.mean([x[k] for x in all_metrics_dict]) for k in all_metrics_dict[0].keys()}
    total_losses_reduced = sum(metrics_dict.values())
    if not np.isfinite(total_losses_reduced):
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration={storage.iter}!\nloss_dict = {metrics_dict}"
        )
    storage.put_scalar(f"{prefix}total_loss", total_losses_reduced)
    if len(metrics_dict) > 1:
        storage.put_scalars(**metrics_dict)


def trainer_from_config(
    cfg: Any,
    model: torch.nn.Module,
    data_loader: Any,
    optimizer: torch.optim.Optimizer,
    amp_dtype: torch.dtype | None,
    frozen_modules: Sequence[torch.nn.Module] = (),
) -> DetrTrainer:
    """The ``DetrTrainer`` that ``cfg.train`` describes (accumulation, clipping and its separate groups), so that
    train_net and the training benchmark run the same step."""
    clip = cfg.train.clip_grad
    return DetrTrainer(
        model,
        data_loader,
        optimizer,
        accumulate_steps=cfg.train.accumulate_steps,
        clip_grad_max_norm=clip.max_norm if clip.enabled else None,
        clip_grad_norm_type=clip.norm_type,
        clip_grad_separate=clip.get("separate", ()),
        amp_dtype=amp_dtype,
        frozen_modules=frozen_modules,
    )
