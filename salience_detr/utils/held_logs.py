"""Keep log records made before the loggers are set up, and replay them once they are.

train_net learns where ``log.txt`` goes only from the loaded config, but loading the config already has things to
say (e.g. ``model.num_classes`` taken from the dataset); without this they would be dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _Hold(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_records(name: str) -> Iterator[list[logging.LogRecord]]:
    """Collect the records of logger ``name`` (and its children) made inside the block into the yielded list."""
    target = logging.getLogger(name)
    hold, level = _Hold(), target.level
    target.addHandler(hold)
    target.setLevel(logging.DEBUG)
    try:
        yield hold.records
    except BaseException:
        _show_warnings(hold.records)  # the block failed, so nothing will replay them
        raise
    finally:
        target.removeHandler(hold)
        target.setLevel(level)


def _show_warnings(records: list[logging.LogRecord]) -> None:
    """What Python shows for records no handler takes: warnings and errors, on stderr."""
    if logging.lastResort is not None:
        for record in records:
            if record.levelno >= logging.WARNING:
                logging.lastResort.handle(record)


def replay(records: list[logging.LogRecord]) -> None:
    """Hand held records to the handlers set up since (each through its own logger, so levels and names apply)."""
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
