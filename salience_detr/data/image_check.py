"""Check a dataset's image files before any model work: each exists, decodes to the end, and has the json's size.

Without this, a missing, corrupt or truncated file, or one whose size the json gets wrong, is found only when the
data loader reaches it: at some iteration of training, or in the evaluation after it. A wrong size caused by EXIF
orientation (the json written from the stored pixels, the reader turning the picture upright) is named as such.

Decoding is what finds truncated files, so every checked file is decoded; JPEGs at 1/8 scale (Pillow's ``draft``),
which still reads all of their data and is several times faster than a full decode.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from detectron2.data import DatasetCatalog
from detectron2.utils import comm
from PIL import Image
from tqdm import tqdm

from .image_io import EXIF_SIZE_FIX, UnsupportedImageModeError, to_8bit

logger = logging.getLogger(__name__)

EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
DRAFT_SCALE = 8
PROGRESS_MIN_IMAGES = 500  # smaller checks take well under a second: no bar
MAX_WORKERS = 8  # Pillow decodes without the GIL, so threads scale until the disk is the limit
EXAMPLES_SHOWN = 3
PROBLEM_FIXES = {
    "missing": "restore the files or fix the image folder (datasets.<split>.image_root) or the json's file_name",
    "corrupt": "replace or re-encode these files, or remove their entries from the json",
    "truncated": "the files end early (an interrupted copy or download): copy them again",
    "unsupported pixels": "convert these files to 8- or 16-bit PNG or JPEG",
    "wrong size": "the json's width/height must describe the image: regenerate the json from the files",
    "EXIF orientation": EXIF_SIZE_FIX,
}


@dataclass
class ImageCheckReport:
    """What a check found: per kind of problem, ``(file_name, detail)`` pairs."""

    datasets: list[str]
    checked: int = 0
    total: int = 0
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """Counts per problem with a few examples and the fix; one line when all is well."""
        scope = "all" if self.checked == self.total else f"a random sample of {self.checked} of"
        head = f"Checked {scope} {self.total} images of {', '.join(self.datasets)}"
        if self.ok:
            return f"{head}: every file exists, decodes and has the json's size."
        lines = [f"{head}: {sum(len(v) for v in self.problems.values())} with problems."]
        for kind, found in self.problems.items():
            examples = "; ".join(f"{name} ({detail})" for name, detail in found[:EXAMPLES_SHOWN])
            lines.append(f"  {kind}: {len(found)}, e.g. {examples}. Fix: {PROBLEM_FIXES[kind]}.")
        return "\n".join(lines)


class ImageCheckError(ValueError):
    """Some image files of a dataset are missing, unreadable or of another size than the json says."""

    def __init__(self, report: ImageCheckReport) -> None:
        hint = "Set train.check_images=0 to skip this check (the loader will then stop at the first bad file)."
        super().__init__(f"{report.summary()}\n{hint}")
        self.report = report


class PeerImageCheckError(ValueError):
    """The image check of another machine of a distributed run failed; this process stops with its message."""


def check_record(record: dict[str, Any]) -> tuple[str, str] | None:
    """``(kind, detail)`` of the first problem of one dataset dict's image, or None when it is fine."""
    path = record["file_name"]
    if not os.path.isfile(path):
        return "missing", "no such file"
    try:
        with Image.open(path) as image:
            stored_size = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
            image.draft("RGB", (stored_size[0] // DRAFT_SCALE, stored_size[1] // DRAFT_SCALE))
            image.load()
            to_8bit(image, path)  # the reader refuses pixel types without an 8-bit meaning
    except UnsupportedImageModeError as error:
        return "unsupported pixels", str(error)
    except (OSError, SyntaxError, ValueError) as error:
        return ("truncated" if "truncated" in str(error).lower() else "corrupt"), str(error)
    width, height = stored_size[::-1] if orientation in TRANSPOSING_ORIENTATIONS else stored_size
    expected = record.get("width"), record.get("height")
    if None in expected or expected == (width, height):
        return None
    if expected == stored_size:
        detail = f"json {expected[0]}x{expected[1]} is the stored size; EXIF orientation {orientation} turns it"
        detail += f" to {width}x{height}"
        return "EXIF orientation", detail
    return "wrong size", f"json {expected[0]}x{expected[1]}, file {width}x{height}"


def check_images(
    dataset_names: str | Sequence[str],
    max_images: int | None = None,
    seed: int = 0,
    raise_on_problems: bool = True,
    workers: int | None = None,
) -> ImageCheckReport:
    """Check the image files of registered datasets: all of them, or a seeded random ``max_images`` per dataset.

    ``workers`` threads decode in parallel (default: the CPU count, at most ``MAX_WORKERS``).

    Raises :class:`ImageCheckError` (holding the report) when a file has a problem, unless ``raise_on_problems`` is
    False; otherwise returns the report.
    """
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be a positive number of images or None for all, got {max_images}")
    report = ImageCheckReport(datasets=names)
    records = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        report.total += len(dicts)
        if max_images is not None and len(dicts) > max_images:
            dicts = random.Random(seed).sample(dicts, max_images)
        records.extend(dicts)
    report.checked = len(records)
    workers = workers or min(MAX_WORKERS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = tqdm(
            pool.map(check_record, records),
            total=len(records),
            desc="Checking images",
            unit="image",
            disable=len(records) < PROGRESS_MIN_IMAGES,
        )
        for record, problem in zip(records, found):
            if problem is not None:
                report.problems.setdefault(problem[0], []).append((record["file_name"], problem[1]))
    logger.info("%s", report.summary())
    if raise_on_problems and not report.ok:
        raise ImageCheckError(report)
    return report


def check_images_option(limit: Any, dataset_names: Sequence[str]) -> ImageCheckReport | None:
    """Run the check ``train.check_images`` asks for: per dataset all images up to ``limit``, a seeded random sample
    of ``limit`` beyond; 0 turns it off. A dataset named twice (train and test) is checked once."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(
            f"train.check_images must be a number of images per dataset (0 turns the check off), got {limit!r}; "
            "e.g. train.check_images=1000"
        )
    if limit == 0:
        logger.info("train.check_images=0: the image files are not checked before training")
        return None
    return check_images(list(dict.fromkeys(dataset_names)), max_images=limit)


def checks_images_here(local_rank: int) -> bool:
    """Each machine's first process checks: machines of a cluster may each hold their own copy of the data, so
    one machine's files say nothing about another's; the other processes of a machine share its files."""
    return local_rank == 0


def peer_failure(failures: Sequence[str | None], processes_per_machine: int) -> str | None:
    """One message naming the machines whose check failed and what they found, or None when none failed."""
    found = [
        f"machine {rank // processes_per_machine} (rank {rank}): {failure}"
        for rank, failure in enumerate(failures)
        if failure is not None
    ]
    return "The image check failed on " + "\n".join(found) if found else None


def check_images_on_each_machine(limit: Any, dataset_names: Sequence[str]) -> ImageCheckReport | None:
    """:func:`check_images_option` once per machine (see :func:`checks_images_here`); every process of the run
    learns whether any check failed, and stops then: the failing ones with their own error, the others with
    :class:`PeerImageCheckError`, so no process is left waiting for the ones that stopped."""
    if comm.get_world_size() == 1:
        return check_images_option(limit, dataset_names)
    report, error = None, None
    if checks_images_here(comm.get_local_rank()):
        try:
            report = check_images_option(limit, dataset_names)
        except Exception as raised:  # re-raised below, once every process knows
            error = raised
    message = peer_failure(comm.all_gather(None if error is None else str(error)), comm.get_local_size())
    if error is not None:
        raise error
    if message is not None:
        raise PeerImageCheckError(message)
    return report
