"""One run per output directory, and no run silently mixing its files with an earlier one's.

Two runs into one ``train.output_dir`` interleave ``metrics.json`` and ``log.txt`` and overwrite each other's
checkpoints. The main process therefore holds ``run.lock`` there for the whole run: an exclusive ``flock`` (freed by
the kernel when the process dies, so a crashed run never blocks the next one on the same host) on a file that names
the holder's pid and host: for the error message, and to tell a live run from a crashed one where ``flock`` does
nothing (some network file systems). A fresh (not ``--resume``) run into a directory with checkpoints
stops unless ``train.overwrite=True``, and a resumed run drops the ``metrics.json`` rows it is about to repeat.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import socket
import sys
import time

LOCK_NAME = "run.lock"
METRICS_NAME = "metrics.json"

logger = logging.getLogger(__name__)


class OutputDirError(RuntimeError):
    """The output directory is in use by another run, or holds a run that this one would overwrite."""


class RunLock:
    """An exclusive, crash-safe lock on an output directory; use as a context manager or acquire/release."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_NAME)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`OutputDirError` naming the run that holds it."""
        os.makedirs(self.output_dir, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputDirError(self._held_message(_read_holder(self.path))) from None
            if not _same_file(fd, self.path):  # the holder removed it between our open and flock: try again
                os.close(fd)
                continue
            self._take_over(fd)
        return self

    def _take_over(self, fd: int) -> None:
        """With the flock held: refuse a lock of a live run on another host, note a stale one, write ours."""
        holder = _read_holder(self.path)
        if holder and holder.get("host") != socket.gethostname():
            os.close(fd)
            raise OutputDirError(
                self._held_message(holder)
                + f" It runs on another host, so this one cannot tell whether it is still alive: if it is not, "
                f"delete {self.path} and start again."
            )
        if holder and _alive(holder.get("pid")):  # flock is a no-op on some network file systems
            os.close(fd)
            raise OutputDirError(
                self._held_message(holder) + f" If pid {holder.get('pid')} is not that run, delete {self.path}."
            )
        if holder:
            logger.warning("Taking over %s from pid %s, which ended without releasing it", self.path, holder.get("pid"))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def _held_message(self, holder: dict | None) -> str:
        who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "another process"
        return (
            f"Output directory {self.output_dir} is in use by another run ({who}; lock file {self.path}). "
            "Wait for that run to finish, or give this run its own directory with train.output_dir=..."
        )

    def release(self) -> None:
        """Remove the lock file and free the lock; a no-op when not held."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None


def _alive(pid: object) -> bool:
    """Whether another process with this pid runs on this host."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(path: str) -> dict | None:
    """The pid/host record of a lock file; None when it is empty (being written) or unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def existing_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint files of an earlier run in ``output_dir`` (``model_*.pth`` and ``last_checkpoint``)."""
    found = glob.glob(os.path.join(output_dir, "model_*.pth")) + glob.glob(os.path.join(output_dir, "last_checkpoint"))
    return sorted(found)


def check_fresh_start(output_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Stop a new run that would overwrite another run's checkpoints; with ``overwrite``, clear them first.

    Clearing matters: ``metrics.json`` is appended to, and an old ``last_checkpoint`` would make a later
    ``--resume`` continue the old run.
    """
    found = existing_checkpoints(output_dir)
    if resume or not found:
        return
    if not overwrite:
        names = ", ".join(os.path.basename(f) for f in found[:4]) + (" ..." if len(found) > 4 else "")
        raise OutputDirError(
            f"Output directory {output_dir} already holds checkpoints of another run ({names}). "
            "Continue that run with --resume, write to another directory with train.output_dir=..., or replace it "
            "with train.overwrite=True (deletes its checkpoints and metrics.json)."
        )
    stale = found + glob.glob(os.path.join(output_dir, METRICS_NAME))
    logger.warning("train.overwrite=True: deleting %d files of the earlier run in %s", len(stale), output_dir)
    for path in stale:
        os.remove(path)


def trim_metrics(output_dir: str, start_iter: int) -> int:
    """Drop ``metrics.json`` rows at or after ``start_iter``, which a resumed run logs again; returns how many.

    Rewritten in place, not renamed: detectron2's JSONWriter already holds the file open for appending.
    """
    path = os.path.join(output_dir, METRICS_NAME)
    if not os.path.isfile(path):
        return 0
    with open(path, "r+", encoding="utf-8") as file:
        lines = [line for line in file if line.strip()]
        kept = [line for line in lines if _row_iteration(line) < start_iter]
        if len(kept) < len(lines):
            file.seek(0)
            file.write("".join(kept))
            file.truncate()
    dropped = len(lines) - len(kept)
    if dropped:
        logger.info("Dropped %d metrics.json rows from iteration %d on (logged again on resume)", dropped, start_iter)
    return dropped


def _row_iteration(line: str) -> float:
    """A row's iteration; a row that cannot be read (a write cut by a kill) counts as repeated."""
    try:
        return float(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
