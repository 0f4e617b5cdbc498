"""The meta-arch's batch layout from host sizes: padding masks built on the host equal the device ones
(``padding_mask`` + ``level_masks_for``), and the batch normalised at once equals image-by-image normalisation.

The masks of every level come from the host image sizes with F.interpolate's nearest rule re-derived in numpy, so
no device op builds them; these tests pin that rule and the masks against the ops themselves.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import ImageList

from salience_detr.modeling.meta_arch import (
    _nearest_sources,
    host_level_masks,
    level_masks_for,
    normalise_and_pad,
    padding_mask,
)
from salience_detr.utils.dispatch_count import count_dispatch


def test_nearest_rule_equals_interpolate_for_every_size_up_to_256():
    for in_size in range(1, 257):
        rows = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1)
        out_sizes = sorted({1, 2, 3, in_size, 2 * in_size, max(1, in_size // 2), -(-in_size // 3), in_size + 7})
        for out, ours in zip(out_sizes, _nearest_sources(in_size, out_sizes)):
            expected = F.interpolate(rows, size=(out, 1)).reshape(-1).to(torch.int64).numpy()
            assert np.array_equal(ours, expected), (in_size, out)


def test_host_masks_equal_the_device_masks_on_random_batches():
    generator = np.random.default_rng(0)
    for _ in range(200):
        batch = int(generator.integers(1, 4))
        sizes = [(int(generator.integers(1, 200)), int(generator.integers(1, 200))) for _ in range(batch)]
        padded = (-(-max(h for h, _ in sizes) // 32) * 32, -(-max(w for _, w in sizes) // 32) * 32)
        shapes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in (8, 16, 32, 64)]
        images = ImageList(torch.zeros(batch, 1, *padded), sizes)
        device = level_masks_for(padding_mask(images), [torch.zeros(batch, 1, h, w) for h, w in shapes])
        host = host_level_masks(sizes, padded, shapes)
        assert all(np.array_equal(d.numpy(), h) for d, h in zip(device, host)), (sizes, padded)


def test_a_padded_image_masks_its_padding_only():
    (mask,) = host_level_masks([(64, 96), (32, 40)], (64, 96), [(8, 12)])
    assert not mask[0].any()
    assert not mask[1, :4, :5].any() and mask[1, 4:].all() and mask[1, :, 5:].all()


def test_images_normalised_in_the_batch_equal_image_by_image_then_zero_padding():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in ((50, 70), (33, 90))]
    mean, std = (
        torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
        torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
    )
    with count_dispatch() as counts:
        batch = normalise_and_pad(images, mean, std, 32)
    assert batch.tensor.shape == (2, 3, 64, 96) and batch.image_sizes == [(50, 70), (33, 90)]
    for image, padded, (h, w) in zip(images, batch.tensor, batch.image_sizes):
        assert torch.equal(padded[:, :h, :w], (image.float() - mean) / std)
        assert padded[:, h:].eq(0).all() and padded[:, :, w:].eq(0).all()
    assert counts.total_calls <= 5 + 3 * len(images), counts.table(8)
