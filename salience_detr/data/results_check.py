"""Check that a COCO detection results file belongs to a registered dataset before it is scored or drawn.

COCOeval ignores results of unknown categories and pycocotools accepts any results whose image ids exist, so a
results file of another dataset, or of another category numbering, would be scored (badly) without a word. Image
ids and category ids the dataset lacks are errors. Boxes reaching beyond their image by more than rounding are
warned about: detectron2 clips every predicted box to its image, so many such boxes mean results computed on other
images with overlapping ids, but other detectors may not clip, so they do not stop the tool. Results that carry the
image's ``file_name`` and the ``category_name`` (the demo's ``--output-json`` writes both) are checked by name as
well, which catches another dataset whose ids and image sizes all overlap; plain COCO results carry ids only.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog

logger = logging.getLogger(__name__)

BOX_SLACK = 1.0  # pixels: boxes may pass the image edge by rounding, not more
EXAMPLES_SHOWN = 5


class ResultsMismatchError(ValueError):
    """A results file names images or categories that the dataset does not have, or boxes beyond its images."""


def _examples(values: Iterable[Any]) -> str:
    values = list(values)
    shown = ", ".join(str(value) for value in values[:EXAMPLES_SHOWN])
    return shown + (", ..." if len(values) > EXAMPLES_SHOWN else "")


def _beyond_image(bbox: Sequence[float], size: tuple[int, int] | None) -> bool:
    if size is None or None in size:
        return False
    x, y, w, h = bbox
    width, height = size
    return x < -BOX_SLACK or y < -BOX_SLACK or x + w > width + BOX_SLACK or y + h > height + BOX_SLACK


def results_problems(
    results: Sequence[dict[str, Any]], image_sizes: dict[Any, tuple[int, int]], category_ids: Iterable[Any]
) -> list[str]:
    """One sentence per way ``results`` do not fit these images (``image_id -> (width, height)``) and categories;
    empty when they fit."""
    category_ids = set(category_ids)
    problems = []
    unknown_images = Counter(r["image_id"] for r in results if r["image_id"] not in image_sizes)
    if unknown_images:
        problems.append(
            f"{sum(unknown_images.values())} of {len(results)} results name {len(unknown_images)} image ids that are "
            f"not in the dataset, e.g. {_examples(sorted(unknown_images, key=str))}"
        )
    unknown_categories = Counter(r["category_id"] for r in results if r["category_id"] not in category_ids)
    if unknown_categories:
        problems.append(
            f"{sum(unknown_categories.values())} results use category ids that are not in the dataset "
            f"(id: count {_examples(f'{k}: {v}' for k, v in unknown_categories.most_common())}); the dataset has "
            f"{_examples(sorted(category_ids, key=str))}"
        )
        if all(isinstance(k, int) and 0 <= k < len(category_ids) for k in unknown_categories):
            problems[-1] += (
                f"; they look like contiguous class indices (0..{len(category_ids) - 1}): map them to the dataset's "
                "category ids (thing_dataset_id_to_contiguous_id, reversed), as detectron2's COCOEvaluator writes them"
            )
    return problems


def named_mismatches(
    results: Sequence[dict[str, Any]], image_files: dict[Any, str], category_names: dict[Any, str]
) -> list[str]:
    """One sentence per name that disagrees with the dataset: results whose ``file_name`` (compared by base name)
    is not their image id's file, or whose ``category_name`` is not their category id's name."""
    problems = []
    wrong_files = [
        r
        for r in results
        if "file_name" in r
        and r["image_id"] in image_files
        and os.path.basename(r["file_name"]) != image_files[r["image_id"]]
    ]
    if wrong_files:
        examples = (f"image {r['image_id']}: {os.path.basename(r['file_name'])!r}" for r in wrong_files)
        problems.append(
            f"{len(wrong_files)} results name another file than the dataset's image of their image id, "
            f"e.g. {_examples(examples)} (the dataset has {image_files[wrong_files[0]['image_id']]!r} there)"
        )
    wrong_names = Counter(
        (r["category_id"], r["category_name"])
        for r in results
        if "category_name" in r
        and r["category_id"] in category_names
        and r["category_name"] != category_names[r["category_id"]]
    )
    if wrong_names:
        examples = (f"{k} is {category_names[k]!r} here, {name!r} there" for k, name in wrong_names)
        problems.append(
            f"{sum(wrong_names.values())} results give category names the dataset does not use for their ids: "
            f"{_examples(examples)}"
        )
    return problems


def boxes_beyond_images(results: Sequence[dict[str, Any]], image_sizes: dict[Any, tuple[int, int]]) -> str | None:
    """A sentence counting the results whose XYWH box passes its image's edge by more than rounding, or None."""
    beyond = [
        r for r in results if r["image_id"] in image_sizes and _beyond_image(r["bbox"], image_sizes[r["image_id"]])
    ]
    if not beyond:
        return None
    examples = (
        f"image {r['image_id']} ({'x'.join(map(str, image_sizes[r['image_id']]))}): bbox "
        f"{[round(float(v), 1) for v in r['bbox']]}"
        for r in beyond
    )
    return f"{len(beyond)} of {len(results)} results have boxes beyond their image, e.g. {_examples(examples)}"


def check_results_match(
    results: Sequence[dict[str, Any]],
    dataset: str,
    source: str = "The results file",
    records: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Raise :class:`ResultsMismatchError` unless ``results`` fit the image ids and dataset category ids of the
    registered ``dataset`` (``records``: its dicts, when already loaded), with counts, examples and the fix; warn
    about boxes beyond their images."""
    records = DatasetCatalog.get(dataset) if records is None else records
    image_sizes = {r["image_id"]: (r.get("width"), r.get("height")) for r in records}
    id_map = MetadataCatalog.get(dataset).get("thing_dataset_id_to_contiguous_id", None)
    if id_map is None:
        raise ResultsMismatchError(
            f"Dataset {dataset!r} has no thing_dataset_id_to_contiguous_id metadata, so the category ids of {source} "
            "cannot be checked; register it as a COCO-format dataset (--coco-json and --image-root)."
        )
    problems = results_problems(results, image_sizes, id_map)
    image_files = {r["image_id"]: os.path.basename(r["file_name"]) for r in records if r.get("file_name")}
    thing_classes = MetadataCatalog.get(dataset).get("thing_classes", None) or []
    category_names = {k: thing_classes[v] for k, v in id_map.items() if v < len(thing_classes)}
    problems += named_mismatches(results, image_files, category_names)
    beyond = boxes_beyond_images(results, image_sizes)
    if beyond and not problems:
        logger.warning(
            "%s: %s. detectron2 clips its boxes to the image, so results of another dataset with overlapping image "
            "ids look like this: check that they belong to %r.",
            source,
            beyond,
            dataset,
        )
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ResultsMismatchError(
            f"{source} does not belong to dataset {dataset!r} ({len(records)} images):\n{listed}\n"
            "Pass the dataset these results were computed on (--dataset, or --coco-json and --image-root), or the "
            "results file of this dataset."
        )
