"""Keep ``model_best.pth``, the checkpoint with the best evaluation so far, next to the periodic ones.

detectron2's ``BestCheckpointer`` has two gaps this closes. Its save goes through the checkpointer's ``save``,
which also points ``last_checkpoint`` at ``model_best.pth``, so ``--resume`` would restart from the best (older)
iteration instead of the newest one. And it keeps the best score in memory only, so after ``--resume`` the first
evaluation would replace ``model_best.pth`` however bad it is. Here the file records its own score and
``last_checkpoint`` is left alone; a resumed run reads the score back.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any

from detectron2.engine import hooks

from .checkpoint import AtomicDetectionCheckpointer, read_checkpoint_field

logger = logging.getLogger(__name__)

BEST_FILE_PREFIX = "model_best"


class BestCheckpointer(hooks.BestCheckpointer):
    """``model_best.pth`` by ``val_metric`` (e.g. ``bbox/AP``), written atomically, surviving ``--resume``.

    Runs after the ``EvalHook`` (same ``eval_period``) on the main process only.
    """

    def __init__(
        self,
        eval_period: int,
        checkpointer: AtomicDetectionCheckpointer,
        val_metric: str = "bbox/AP",
        mode: str = "max",
        resume: bool = False,
    ) -> None:
        super().__init__(eval_period, checkpointer, val_metric, mode=mode, file_prefix=BEST_FILE_PREFIX)
        self._atomic = checkpointer
        self._resume = resume
        # the parent saves through ``self._checkpointer.save``: route it to a save that records the score
        self._checkpointer = SimpleNamespace(save=self._save_best, save_dir=checkpointer.save_dir)

    @property
    def path(self) -> str:
        return os.path.join(self._atomic.save_dir, f"{BEST_FILE_PREFIX}.pth")

    def before_train(self) -> None:
        """On ``--resume``, start from the score recorded in the run's ``model_best.pth``."""
        if not self._resume or not os.path.isfile(self.path):
            return
        recorded = read_best_metric(self.path)
        if recorded is None or recorded["name"] != self._val_metric:
            logger.warning("%s records no %s score; the next evaluation replaces it", self.path, self._val_metric)
            return
        self.best_metric, self.best_iter = recorded["value"], recorded["iteration"]
        logger.info(
            "Best %s so far: %.5f at iteration %d (%s)", self._val_metric, self.best_metric, self.best_iter, self.path
        )

    def _save_best(self, name: str, **kwargs: Any) -> None:
        value, iteration = self.trainer.storage.latest()[self._val_metric]
        score = {"name": self._val_metric, "value": float(value), "iteration": int(iteration)}
        self._atomic.save(name, tag_last=False, best_metric=score, **kwargs)


def read_best_metric(path: str) -> dict[str, Any] | None:
    """The ``best_metric`` record ({name, value, iteration}) of a ``model_best.pth``, or None when it has none; a
    truncated file is named as such (``read_checkpoint_field``)."""
    return read_checkpoint_field(path, "best_metric")
