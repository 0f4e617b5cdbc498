"""A DetectionCheckpointer whose files are complete or absent, never truncated.

The checkpoint is written to a temporary file in the output folder and renamed over the final name
(``os.replace`` is atomic on one file system), and ``last_checkpoint`` is updated the same way afterwards.
A run killed mid-save therefore resumes from the previous complete checkpoint; the hidden temporary file
such a kill leaves behind is removed by the next save.

Loading is strict (``weights.plan_loading``): only a fresh start of training may fine-tune on other classes, and a
file that is not a checkpoint, or one that cannot be downloaded, stops with the fix named. Checkpoints written here
carry ``metadata`` (class names, dataset, model) so inference can label detections without the dataset.
"""

from __future__ import annotations

import glob
import os
import pickle
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from torch import nn

from salience_detr.utils.atomic import DiskFullError, atomic_write

from .weights import config_hint, log_reinitialised, plan_loading

D2_URL_PREFIX = "detectron2://"
D2_DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/detectron2/"


class CheckpointFileError(OSError):
    """A checkpoint path that cannot be read or downloaded (the message names the fix)."""


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic ``save`` and ``tag_last_checkpoint`` (local paths), strict loading,
    and ``metadata`` written into every checkpoint.

    ``allow_new_classes``: loading ``train.init_checkpoint`` at a fresh start may re-initialise the class heads
    (fine-tuning on other classes); resuming, evaluation and inference never do.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        metadata: dict[str, Any] | None = None,
        allow_new_classes: bool = False,
        **checkpointables: Any,
    ) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.metadata = metadata
        self.allow_new_classes = allow_new_classes
        self._source = "checkpoint"

    def save(self, name: str, *, tag_last: bool = True, **kwargs: Any) -> None:
        """Write ``{name}.pth`` atomically; ``tag_last=False`` leaves ``last_checkpoint`` (what --resume loads)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        if self.metadata is not None:
            data["metadata"] = dict(self.metadata)
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        for stale in glob.glob(os.path.join(self.save_dir, ".*.pth.*.tmp")):
            os.remove(stale)
        self.logger.info("Saving checkpoint to %s", save_file)
        try:
            atomic_write(save_file, lambda f: torch.save(data, f))
        except DiskFullError as error:
            last = self.get_checkpoint_file() if self.has_checkpoint() else None
            kept = f"the last complete checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
            raise DiskFullError(
                error.errno,
                f"Disk full while saving checkpoint {save_file}: {kept}. Free space in {self.save_dir} "
                "(or set train.output_dir to another disk, or lower train.checkpointer.max_to_keep) and continue "
                "with --resume.",
            ) from None
        if tag_last:
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """As detectron2's, but the run's own last checkpoint always loads strictly (no class-head changes)."""
        allow = self.allow_new_classes
        if resume and self.has_checkpoint():
            self.allow_new_classes = False
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self.allow_new_classes = allow

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load ``path`` (a local file, or a URL downloaded once), failing with the fix named when it cannot."""
        if path:
            path = local_checkpoint_path(path, self.path_manager)
            self._source = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict[str, Any]:
        try:
            return super()._load_file(filename)
        except UNREADABLE_ERRORS as error:
            raise unreadable_checkpoint(filename, error) from None

    def _load_model(self, checkpoint: dict[str, Any]) -> Any:
        """Match names (detectron2's heuristics for .pkl files), then load what fits under ``plan_loading``'s rules."""
        if checkpoint.get("matching_heuristics", False):
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(), checkpoint["model"], c2_conversion=checkpoint.get("__author__") == "Caffe2"
            )
            checkpoint["matching_heuristics"] = False
        state_dict = {key.removeprefix("module."): value for key, value in checkpoint["model"].items()}
        plan = plan_loading(
            self.model,
            state_dict,
            allow_new_classes=self.allow_new_classes,
            source=self._source,
            config_hint=config_hint(checkpoint.get("metadata")),
        )
        log_reinitialised(plan, self.model, self._source)
        checkpoint["model"] = plan.state_dict
        incompatible = super()._load_model(checkpoint)
        reinitialised = {key for keys in plan.reinitialised.values() for key in keys}
        incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if key not in reinitialised]
        return incompatible


def local_checkpoint_path(path: str, path_manager: Any) -> str:
    """``path`` itself when it is a file, else its downloaded copy; a clear error when neither can be had."""
    if os.path.isfile(path):
        return path
    if "://" not in path:
        raise CheckpointFileError(
            f"checkpoint {path!r} does not exist. Pass an existing file (train.init_checkpoint=/path/to/model.pth), "
            "or train.init_checkpoint='' to start from random weights."
        )
    url = path.replace(D2_URL_PREFIX, D2_DOWNLOAD_ROOT, 1)
    try:
        return path_manager.get_local_path(path)
    except OSError as error:
        raise CheckpointFileError(
            f"cannot download checkpoint {path!r} ({error}). Without internet, download {url} on another machine "
            f"and pass the file: train.init_checkpoint=/path/to/{os.path.basename(url)}."
        ) from None


UNREADABLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, UnicodeDecodeError, KeyError, ValueError)


def unreadable_checkpoint(filename: str, error: Exception) -> CheckpointFileError:
    """The error for a file torch cannot load: what it is not, and what to pass instead (not torch's pickle advice)."""
    unpickling = isinstance(error, (pickle.UnpicklingError, KeyError, UnicodeDecodeError))
    reason = "not a PyTorch file" if unpickling or not str(error).strip() else str(error).splitlines()[0]
    return CheckpointFileError(
        f"{filename!r} is not a readable checkpoint ({reason[:200]}). Pass a .pth file written by train_net.py, one "
        "converted by python -m salience_detr.tools.convert_official, or detectron2 .pkl weights; a truncated "
        "download must be fetched again."
    )


def read_checkpoint_field(path: str, key: str) -> Any:
    """The top-level entry ``key`` of a local ``.pth`` checkpoint (memory-mapped where possible), or None when the
    path is no local ``.pth`` file or the checkpoint has no such entry; an unreadable file is named as such."""
    if not path.endswith(".pth") or not os.path.isfile(path):
        return None
    try:
        try:
            data = torch.load(path, map_location="cpu", mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            data = torch.load(path, map_location="cpu")
    except UNREADABLE_ERRORS as error:
        raise unreadable_checkpoint(path, error) from None
    return data.get(key) if isinstance(data, dict) else None


def read_checkpoint_metadata(path: str) -> dict[str, Any] | None:
    """The ``metadata`` a training checkpoint carries (class names, dataset, model), or None when it has none.

    Only local ``.pth`` files are read; other paths load later, in the checkpointer.
    """
    metadata = read_checkpoint_field(path, "metadata")
    return dict(metadata) if metadata else None
