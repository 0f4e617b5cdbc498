"""The errors that mean "this input is wrong" and whose message names the fix: a command prints that message alone.

A traceback of 40 lines above "Unknown config key 'train.max_itr' ... Did you mean train.max_iter?" hides the one
line a user needs. Errors of the code itself (and a non-finite loss, where the stack helps) keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from salience_detr.config.overrides import ConfigOverrideError
from salience_detr.data.datasets import DatasetPathError
from salience_detr.data.image_check import ImageCheckError, PeerImageCheckError
from salience_detr.engine.checkpoint import CheckpointFileError
from salience_detr.engine.preflight import PreflightError
from salience_detr.engine.run_lock import OutputDirError
from salience_detr.engine.weights import CheckpointMismatchError

USER_ERRORS = (
    CheckpointFileError,
    CheckpointMismatchError,
    ConfigOverrideError,
    DatasetPathError,
    ImageCheckError,
    OutputDirError,
    PeerImageCheckError,
    PreflightError,
)

#: The exit status of a refused input, argparse's for a usage error.
USER_ERROR_STATUS = 2


def describe(error: BaseException) -> str:
    """``ErrorClass: message``: the class name stays searchable in the docs."""
    return f"{type(error).__name__}: {error}"


@contextmanager
def exit_on_user_error(command: str) -> Iterator[None]:
    """Inside it, one of ``USER_ERRORS`` ends the process with ``command: ErrorClass: message`` on stderr and exit
    status 2 instead of a traceback."""
    try:
        yield
    except USER_ERRORS as error:
        print(f"{command}: {describe(error)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None
