"""A DetectionCheckpointer whose files are complete or absent, never truncated.

The checkpoint is written to a temporary file in the output folder and renamed over the final name
(``os.replace`` is atomic on one file system), and ``last_checkpoint`` is updated the same way afterwards.
A run killed mid-save therefore resumes from the previous complete checkpoint; the hidden temporary file
such a kill leaves behind is removed by the next save.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from salience_detr.utils.atomic import atomic_write


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic ``save`` and ``tag_last_checkpoint`` (local paths)."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        for stale in glob.glob(os.path.join(self.save_dir, ".*.pth.*.tmp")):
            os.remove(stale)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))
