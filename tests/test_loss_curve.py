"""A seeded 20-iteration loss curve of the tiny config equals the recorded one to 1e-5: refactors for speed (fewer
syncs and ATen calls) must leave every loss of every step unchanged.

The curve runs in float64 at a tenth of the config's learning rate. In float32 it is chaotic: the encoder's sampling
points start on pixel corners, where bilinear sampling's gradient jumps, so a last-bit change of a summation order
(1e-7 at step 0) grows about tenfold per step and passes 1e-5 within 5 steps. In float64 at this learning rate a
1e-15 change of every gradient at every step stays below 1e-11 over the 20 steps, a 1e-3 change passes 1e-5 by
step 5, and training moves the losses by 0.4 to 2.3 against an untrained model: a tolerance of 1e-5 tells a
refactor from a change of behaviour.

Regenerate the fixture (only when a change is meant to alter training) with::

    .venv/bin/python tests/test_loss_curve.py --regenerate
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

import salience_detr  # noqa: F401  (registers the meta-architecture)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs/salience_detr/salience_detr_tiny_synthetic.py"
FIXTURE = Path(__file__).parent / "data/tiny_loss_curve.json"
ITERATIONS = 20
LR_SCALE = 0.1


def _image(generator: torch.Generator, height: int, width: int, boxes: list, classes: list) -> dict:
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return {"image": image, "instances": instances, "height": height, "width": width}


def fixed_batches(num: int) -> list[list[dict]]:
    """``num`` batches of 2 small images with a few boxes each, one of them without any: the same on every run."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(num):
        shift = 4 * (step % 5)
        first = _image(generator, 64, 96, [[10 + shift, 12, 50, 40], [50, 20 + shift, 90, 60]], [1, 4])
        second = _image(generator, 64, 64, [[5, 5 + shift, 40, 50]] if step % 3 else [], [0] if step % 3 else [])
        batches.append([first, second])
    return batches


def loss_curve(iterations: int = ITERATIONS) -> list[dict[str, float]]:
    """Every loss term of every step of ``iterations`` float64 AdamW steps of the tiny config's model from seed 0.

    One thread: the sums of a multi-threaded reduction may round differently on another machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(iterations)
    finally:
        torch.set_num_threads(threads)


def _train(iterations: int) -> list[dict[str, float]]:
    cfg = LazyConfig.load(str(TINY_CONFIG))
    torch.manual_seed(0)
    model = instantiate(cfg.model).train().double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr * LR_SCALE, weight_decay=1e-4)
    curve = []
    for batch in fixed_batches(iterations):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        curve.append({name: float(value.detach()) for name, value in sorted(losses.items())})
    return curve


def test_seeded_loss_curve_of_the_tiny_config_is_unchanged():
    expected = json.loads(FIXTURE.read_text())
    curve = loss_curve(len(expected))
    assert [sorted(step) for step in curve] == [sorted(step) for step in expected]
    for step, (got, want) in enumerate(zip(curve, expected)):
        for name, value in want.items():
            assert abs(got[name] - value) <= 1e-5 * max(1.0, abs(value)), (step, name, got[name], value)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regenerate", action="store_true", help=f"write {FIXTURE.name} from the current code")
    if parser.parse_args().regenerate:
        FIXTURE.write_text(json.dumps(loss_curve(), indent=1) + "\n")
        print(f"wrote {FIXTURE}")
