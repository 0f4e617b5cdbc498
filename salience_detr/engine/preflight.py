"""Checks that stop a run before the expensive part, with the fix in the message.

Each of these otherwise fails late or not at all: a CUDA device on a CPU machine after the model is built, an
evaluation of random weights that exits 0, a resume past ``train.max_iter`` inside the LR scheduler.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

import torch
from detectron2.utils import comm

from .run_lock import OutputDirError, RunLock, check_fresh_start

RANDOM_WEIGHTS = "random"

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """A run set-up that cannot work; the message names the setting to change."""


def check_device(device: str) -> None:
    """``train.device`` must exist on this machine; checked before any model is built."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise PreflightError(f"train.device={device!r} is not a device name; use train.device=cuda or cpu") from None
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        built = f"torch {torch.__version__}, {build}"
        raise PreflightError(
            f"train.device={device} but no CUDA device is usable here ({built}). "
            "Add train.device=cpu to run on the CPU, or run on a machine with an NVIDIA GPU and driver."
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise PreflightError(
            f"train.device={device} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use train.device=cuda (the launcher picks each process's GPU) or an index below the count."
        )


def eval_weights(init_checkpoint: str) -> str:
    """The checkpoint ``--eval-only`` loads: refuses none at all; ``random`` (on purpose, smoke tests) gives ""."""
    if init_checkpoint == RANDOM_WEIGHTS:
        logger.warning("train.init_checkpoint=random: evaluating randomly initialised weights (a smoke test)")
        return ""
    if not init_checkpoint:
        raise PreflightError(
            "--eval-only needs weights, but train.init_checkpoint is empty, so a random model would be evaluated. "
            "Pass train.init_checkpoint=PATH/model_final.pth (or train.init_checkpoint=random for a smoke test)."
        )
    return init_checkpoint


def resume_has_work(start_iter: int, max_iter: int, checkpoint: str) -> bool:
    """Whether a resumed run has iterations left: False when it already ended, an error when max_iter went below."""
    if start_iter < max_iter:
        return True
    if start_iter == max_iter:
        logger.info(
            "Nothing to do: %s is at the end of training (train.max_iter=%d). Raise train.max_iter to train longer.",
            checkpoint,
            max_iter,
        )
        return False
    raise PreflightError(
        f"--resume from {checkpoint}, which is at iteration {start_iter - 1}, but train.max_iter={max_iter}. "
        f"Raise train.max_iter above {start_iter - 1} to train further, or evaluate it with "
        f"--eval-only train.init_checkpoint={checkpoint}."
    )


def claim_output_dir(cfg: Any, *, resume: bool, eval_only: bool, is_main: bool) -> RunLock | None:
    """Lock ``train.output_dir`` for this run (main process only) and refuse to overwrite another run's checkpoints.

    Every process calls this: when the main process is refused, the others (on other machines too) stop with its
    message instead of waiting at their first collective until the timeout. The lock is released when the process
    exits (or earlier through the returned lock's ``release``).
    """
    lock, refusal = None, None
    if is_main:
        try:
            lock = _lock_and_check(cfg, resume=resume, eval_only=eval_only)
        except OutputDirError as error:
            refusal = str(error)
    if comm.get_world_size() > 1:
        refusal = next((message for message in comm.all_gather(refusal) if message), None)
    if refusal:
        raise OutputDirError(refusal if is_main else f"The main process stopped the run: {refusal}")
    return lock


def _lock_and_check(cfg: Any, *, resume: bool, eval_only: bool) -> RunLock:
    lock = RunLock(cfg.train.output_dir).acquire()
    atexit.register(lock.release)
    if not eval_only:
        try:
            check_fresh_start(cfg.train.output_dir, resume=resume, overwrite=bool(cfg.train.get("overwrite", False)))
        except OutputDirError:
            lock.release()
            raise
    return lock
