"""Write files all at once or not at all: a killed run never leaves a truncated checkpoint behind."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """The disk filled up while writing a file; the file at the target path, if any, is unchanged."""


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it onto ``path``.

    The file gets the mode a plain ``open`` would give (0666 less the umask), not ``mkstemp``'s private 0600.
    A full disk raises :class:`DiskFullError` naming ``path``, whatever layer (e.g. torch's zip writer) saw it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except (OSError, RuntimeError) as error:
        if _is_disk_full(error):
            kept = "the previous file there is intact" if os.path.exists(path) else "nothing was written there"
            raise DiskFullError(
                errno.ENOSPC,
                f"No space left on the disk holding {path} while writing it; {kept}. "
                "Free some space (or write to another disk) and run again.",
            ) from None
        raise
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_disk_full(error: BaseException | None) -> bool:
    """True when ``error`` or an exception it was raised from or during is ENOSPC/EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False
