"""Compare this project's R50 model with the official Salience DETR code, stage by stage, on the same weights.

    python -m salience_detr.tools.parity_official --official-root /path/to/Salience-DETR [--save-fixture PATH]

The official model is built from the clone's own ``configs/salience_detr/salience_detr_resnet50_800_1333.py``
(imported from ``--official-root``; its ImageNet download is skipped since every weight is replaced), ours from
``configs/salience_detr/salience_detr_r50_4scale_12ep.py``. One seeded random state dict in the official layout
is loaded strictly into the official model and, through ``checkpoint.official`` (the converter), into ours.
Both see the same normalized images (the official ``eval_transform`` and our normalisation are off) and every
stage is printed: max abs difference and the same relative to the stage's largest official value; for index
stages, the share of positions that agree. Class logits are compared on the 80 COCO columns. Our decoder runs on
the official query order, so two near-tied queries that float noise swaps cannot blur the decoder comparison
(our own order is still reported); final detections are matched by content after ``detector_postprocess``,
the one deliberate difference (it clips boxes to the image). ``--save-fixture`` stores the official outputs
(subsampled) for ``tests/test_official_parity.py``, which needs no official code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.checkpoint.official import coco_category_ids
from salience_detr.checkpoint.official_model import (  # noqa: F401  (OUR_CONFIG: the tests)
    OUR_CONFIG,
    official_and_ours,
    recorded_query_index,
)
from salience_detr.checkpoint.parity import (
    RECORDED_MODULES,
    common_stages,
    detections_like_ours,
    is_selection,
    our_stages,
    parity_images,
    query_stages,
    record_outputs,
    subsample,
    unmatched_detections,
)
from salience_detr.checkpoint.synthetic import CONSTANT_BUFFERS, OFFICIAL_R50_KEYS
from salience_detr.utils.atomic import atomic_write

#: Image sizes (H, W) per batch: larger than the 320x320 the official code needs, small enough for a CPU test.
BATCHES = {"single": [(384, 448)], "pair": [(416, 352), (352, 448)]}
#: Stages whose last dimension holds the official 91 class rows (compared on the 80 COCO ids).
CLASS_STAGES = ("enc_logits_all", "enc_logits")
#: Final detections match when the label is equal and score and box agree within these.
DETECTION_SCORE_TOL = 1e-4
DETECTION_BOX_TOL = 0.05
FIXTURE_FORMAT = 1
SUBSAMPLE = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-root", required=True, help="a clone of github.com/xiuqhou/Salience-DETR")
    parser.add_argument(
        "--keys", default=OFFICIAL_R50_KEYS, help="official R50 state-dict key list (.tsv; default: the checkout's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    parser.add_argument("--save-fixture", metavar="PATH", help="write the official outputs for the parity test")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser.parse_args(argv)


def official_stages(model: nn.Module, images: list[Tensor]) -> dict[str, Tensor]:
    """Run the official model on normalized images and name its stages like ``parity.our_stages``.

    The final detections come unclipped, as ``raw_detections.{image}.{scores,labels,boxes}``.
    """
    transformer = model.transformer
    encoder_inputs: dict[str, Any] = {}

    def recording_encoder(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        encoder_inputs["encoder_tokens"] = kwargs["foreground_inds"]

    hook = transformer.encoder.register_forward_pre_hook(recording_encoder, with_kwargs=True)
    try:
        with torch.no_grad(), record_outputs(model, RECORDED_MODULES) as records, recorded_query_index(model) as chosen:
            results = model(images)
    finally:
        hook.remove()
    logits, boxes, enc_logits, enc_boxes, salience = records["transformer"][-1]
    records["transformer.neck"] = [list(maps.values()) for maps in records["transformer.neck"]]
    stages = common_stages(records, records["neck"][-1], salience, encoder_inputs["encoder_tokens"])
    queries = (chosen["query_index"], enc_logits, enc_boxes, logits, boxes)
    stages.update(query_stages(stages["enc_logits_all"], transformer.two_stage_num_proposals, *queries))
    coco_ids = coco_category_ids()
    for name in list(stages):
        if name in CLASS_STAGES or name.endswith(".logits"):
            stages[name] = stages[name][..., coco_ids]
    for index, result in enumerate(results):
        for field in ("scores", "labels", "boxes"):
            stages[f"raw_detections.{index}.{field}"] = result[field]
    return stages


def compare(ours: Tensor, official: Tensor, selection: bool) -> str:
    """One table cell: index agreement for selections, else max abs and max abs / max |official|."""
    if ours.shape != official.shape:
        return f"shape {tuple(ours.shape)} vs official {tuple(official.shape)}"
    if selection:
        same = (ours == official).float().mean().item()
        overlap = [len(set(a.tolist()) & set(b.tolist())) / max(len(b), 1) for a, b in zip(ours, official)]
        return f"indices agree {100 * same:6.2f}% in order, {100 * min(overlap):6.2f}% as sets"
    diff = (ours.double() - official.double()).abs().max().item()
    scale = official.double().abs().max().item()
    return f"max abs {diff:9.3e}  rel {diff / max(scale, 1e-30):9.3e}"


def detection_rows(
    ours: dict[str, Tensor], official: dict[str, Tensor], image_sizes: list[tuple[int, int]]
) -> list[str]:
    """Per image: final detections matched by content, and what clipping to the image changed."""
    rows = []
    for index, size in enumerate(image_sizes):
        raw = {field: official[f"raw_detections.{index}.{field}"] for field in ("scores", "labels", "boxes")}
        reference = detections_like_ours(raw["scores"], raw["labels"], raw["boxes"], size)
        mine = {field: ours[f"detections.{index}.{field}"] for field in ("scores", "labels", "boxes")}
        unmatched = unmatched_detections(mine, reference, DETECTION_SCORE_TOL, DETECTION_BOX_TOL)
        score_diff = (
            (mine["scores"] - reference["scores"]).abs().max().item()
            if len(mine["scores"]) == len(reference["scores"])
            else float("nan")
        )
        clipped = raw["boxes"][reference["clipped"]]
        overshoot = torch.cat([-clipped, clipped - clipped.new_tensor([size[1], size[0]] * 2)]).clamp(min=0)
        rows.append(
            f"{f'detections.{index}':<24} {str((len(mine['scores']), len(reference['scores']))):<18} "
            f"{len(unmatched)} unmatched (label equal, box within {DETECTION_BOX_TOL} px, score within "
            f"{DETECTION_SCORE_TOL}); scores in rank order max abs {score_diff:9.3e}"
        )
        rows.append(
            f"{'':<24} {'':<18} clipping: {int(reference['clipped'].sum())} of {len(raw['boxes'])} official boxes "
            f"reach outside the {size[0]}x{size[1]} image (by up to "
            f"{overshoot.max().item() if len(clipped) else 0.0:.1f} px); {int((~reference['kept']).sum())} become empty"
        )
    return rows


def parity_table(ours: dict[str, Tensor], official: dict[str, Tensor], image_sizes: list[tuple[int, int]]) -> list[str]:
    """Rows ``stage  shape  result`` for every stage up to the decoder, then the final detections."""
    rows = []
    for name, reference in official.items():
        if name.startswith("raw_detections."):
            continue
        result = compare(ours[name], reference, is_selection(name)) if name in ours else "missing in ours"
        rows.append(f"{name:<24} {str(tuple(reference.shape)):<18} {result}")
        if name == "query_index" and ours[name].shape == reference.shape and not torch.equal(ours[name], reference):
            scores = official["enc_logits_all"].max(-1).values
            tie = (scores.gather(1, ours[name]) - scores.gather(1, reference)).abs().max().item()
            rows.append(
                f"{'':<24} {'':<18} where they differ, the official scores of both choices differ by <= {tie:.3e}"
            )
    return rows + detection_rows(ours, official, image_sizes)


def fixture_record(name: str, tensor: Tensor) -> dict[str, Any]:
    """Selections and raw detections whole, other stages as ``subsample`` plus their scale and mean |x|."""
    if is_selection(name) or name.startswith("raw_detections.") or name == "query_scores":
        values = tensor.to(torch.int32) if not tensor.is_floating_point() else tensor.clone()
        return {"shape": tuple(tensor.shape), "full": True, "values": values}
    return {
        "shape": tuple(tensor.shape),
        "full": False,
        "values": subsample(tensor, SUBSAMPLE).clone(),
        "scale": tensor.abs().max().item(),
        "mean_abs": tensor.abs().mean().item(),
    }


def weight_probe(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A few generated values, so the test can tell a changed random generator from a drifted model."""
    keys = ("backbone.conv1.weight", "transformer.decoder.layers.5.linear2.weight", "transformer.tgt_embed.weight")
    return {key: state_dict[key].flatten()[:8].clone() for key in keys}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    official_model, ours, official_weights = official_and_ours(Path(args.official_root), args.seed, args.keys)
    fixture: dict[str, Any] = {
        "format": FIXTURE_FORMAT,
        "seed": args.seed,
        "batches": BATCHES,
        "constants": {key: official_weights[key].clone() for key in CONSTANT_BUFFERS},
        "probe": weight_probe(official_weights),
        "stages": {},
    }
    for batch, sizes in BATCHES.items():
        images = parity_images(args.seed, sizes)
        official = official_stages(official_model, images)
        mine = our_stages(ours, images, query_index=official["query_index"])
        print(f"\n== batch '{batch}': {len(sizes)} image(s) {', '.join(f'{h}x{w}' for h, w in sizes)}")
        print("\n".join(parity_table(mine, official, sizes)))
        fixture["stages"][batch] = {name: fixture_record(name, tensor) for name, tensor in official.items()}
    if args.save_fixture:
        atomic_write(args.save_fixture, lambda file: torch.save(fixture, file))
        print(f"\nwrote the official outputs to {args.save_fixture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
