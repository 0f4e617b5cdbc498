"""Parity with the official Salience DETR code, kept without that code: ``data/official_parity_r50.pt`` holds the
official model's outputs for seeded random weights and images (``python -m salience_detr.tools.parity_official
--official-root CLONE --save-fixture tests/data/official_parity_r50.pt``). Here the same weights are regenerated,
converted into our model, and every stage must agree within ``TOLERANCE`` of the stage's largest official value.
"""

from pathlib import Path

import pytest
import torch
from detectron2.config import instantiate

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.checkpoint.official import convert_into_model
from salience_detr.checkpoint.parity import (
    detections_like_ours,
    is_selection,
    our_stages,
    parity_images,
    subsample,
    unmatched_detections,
)
from salience_detr.checkpoint.synthetic import random_official_state_dict, read_official_keys
from salience_detr.config import get_config
from salience_detr.tools.parity_official import DETECTION_BOX_TOL, DETECTION_SCORE_TOL, FIXTURE_FORMAT, OUR_CONFIG

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "official_parity_r50.pt"
KEYS = REPO / "tests" / "data" / "official_r50_state_dict_keys.tsv"
#: Measured differences are about 4e-6 of each stage's scale (float32 noise, backbone FrozenBN arithmetic).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fixture():
    stored = torch.load(FIXTURE, weights_only=True)
    assert stored["format"] == FIXTURE_FORMAT, "fixture written by another version of parity_official; regenerate it"
    return stored


@pytest.fixture(scope="module")
def model(fixture):
    weights = random_official_state_dict(read_official_keys(KEYS), fixture["seed"], fixture["constants"])
    for key, values in fixture["probe"].items():
        if not torch.equal(weights[key].flatten()[: len(values)], values):
            pytest.fail(
                f"the regenerated random weights differ from the fixture's ({key}): torch's random generator changed; "
                "regenerate the fixture with salience_detr.tools.parity_official and the official code"
            )
    model = instantiate(get_config(OUR_CONFIG).model).eval()
    convert_into_model(model, weights)
    return model


@pytest.fixture(scope="module")
def stages(model, fixture):
    """Our stages per fixture batch, with the official query order forced (near-tied queries may swap)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = {}
        for batch, sizes in fixture["batches"].items():
            official_queries = fixture["stages"][batch]["query_index"]["values"].long()
            outputs[batch] = our_stages(model, parity_images(fixture["seed"], sizes), query_index=official_queries)
        return outputs
    finally:
        torch.set_num_threads(threads)


def stage_failures(ours: dict, reference: dict, image_sizes: list) -> list[str]:
    """One message per stage of ``ours`` that disagrees with the fixture's official record."""
    failures = []
    for name, record in reference.items():
        if name.startswith("raw_detections.") or name == "query_index":
            continue  # detections below; query choice through query_scores (order may differ among near-ties)
        mine = ours[name]
        if tuple(mine.shape) != tuple(record["shape"]):
            failures.append(f"{name}: shape {tuple(mine.shape)}, official {tuple(record['shape'])}")
        elif is_selection(name):
            differing = int((mine.to(torch.int32) != record["values"]).sum())
            if differing:
                failures.append(f"{name}: {differing} of {mine.numel()} indices differ from the official ones")
        else:
            official = record["values"].flatten()
            values = mine.flatten() if record["full"] else subsample(mine, len(official))
            scale = record.get("scale", official.abs().max().item())
            error = (values - official).abs().max().item()
            mean_error = 0.0 if record["full"] else abs(mine.abs().mean().item() - record["mean_abs"])
            if max(error, mean_error) > TOLERANCE * scale:
                failures.append(
                    f"{name}: max abs difference {error:.3e} (mean |x| {mean_error:.3e}), scale {scale:.3e}"
                )
    for index, size in enumerate(image_sizes):
        raw = [reference[f"raw_detections.{index}.{field}"]["values"] for field in ("scores", "labels", "boxes")]
        official = detections_like_ours(raw[0], raw[1].long(), raw[2], tuple(size))
        mine = {field: ours[f"detections.{index}.{field}"] for field in ("scores", "labels", "boxes")}
        unmatched = unmatched_detections(mine, official, DETECTION_SCORE_TOL, DETECTION_BOX_TOL)
        if len(mine["scores"]) != len(official["scores"]) or len(unmatched):
            failures.append(
                f"detections of image {index}: {len(mine['scores'])} (official {len(official['scores'])}), "
                f"{len(unmatched)} without an official match"
            )
    return failures


@pytest.mark.parametrize("batch", ["single", "pair"])
def test_every_stage_matches_the_official_model(stages, fixture, batch):
    failures = stage_failures(stages[batch], fixture["stages"][batch], fixture["batches"][batch])
    assert not failures, "stages that differ from the official implementation:\n" + "\n".join(failures)


def test_a_drifted_stage_is_reported(stages, fixture):
    drifted = dict(stages["single"])
    drifted["decoder.3.boxes"] = drifted["decoder.3.boxes"] * (1 + 1e-3)
    drifted["encoder_tokens.5"] = drifted["encoder_tokens.5"].flip(1)
    failures = stage_failures(drifted, fixture["stages"]["single"], fixture["batches"]["single"])
    assert [failure.split(":")[0] for failure in failures] == ["encoder_tokens.5", "decoder.3.boxes"]
