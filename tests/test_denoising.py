import pytest
import torch
from torchvision.ops import box_convert

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.layers.box_ops import inverse_sigmoid
from salience_detr.modeling.denoising import GenerateCDNQueries, denoising_attention_mask, denoising_group_count


def make_targets(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, 80, (n,), generator=gen) for n in counts]
    centres = [torch.rand(n, 2, generator=gen) * 0.5 + 0.25 for n in counts]
    sizes = [torch.rand(n, 2, generator=gen) * 0.3 + 0.1 for n in counts]
    boxes = [torch.cat([c, s], dim=1) for c, s in zip(centres, sizes)]
    return labels, boxes


@pytest.mark.parametrize("n_max, groups", [(0, 1), (1, 100), (3, 33), (7, 14), (150, 1)])
def test_group_count_and_query_count(n_max, groups):
    assert denoising_group_count(100, n_max) == groups
    generator = GenerateCDNQueries(num_classes=80, label_embed_dim=16)
    labels, boxes = make_targets([n_max, max(n_max - 1, 0)])
    out = generator(labels, boxes, num_queries=10)
    num_dn = 2 * n_max * groups
    assert out.num_groups == groups
    assert out.max_gt_per_image == n_max
    assert out.label_query.shape == (2, num_dn, 16)
    assert out.box_query.shape == (2, num_dn, 4)
    assert out.attn_mask.shape == (num_dn + 10, num_dn + 10)
    assert out.attn_mask.dtype == torch.bool


def test_attention_mask_blocks():
    group_size, groups, queries = 4, 3, 5
    mask = denoising_attention_mask(group_size, groups, queries)
    num_dn = group_size * groups
    # matching queries cannot see any dn query, but see each other
    assert mask[num_dn:, :num_dn].all()
    assert not mask[num_dn:, num_dn:].any()
    # dn queries see the matching queries
    assert not mask[:num_dn, num_dn:].any()
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        assert not mask[rows, rows].any()  # own group visible
        others = torch.ones(num_dn, dtype=torch.bool)
        others[rows] = False
        assert mask[rows, :num_dn][:, others].all()  # other groups blocked


def test_no_boxes_gives_empty_dn_part_and_open_mask():
    generator = GenerateCDNQueries(label_embed_dim=8)
    empty = torch.zeros(0, dtype=torch.long)
    out = generator([empty, empty], [torch.zeros(0, 4), torch.zeros(0, 4)], num_queries=7)
    assert out.label_query.shape == (2, 0, 8) and out.box_query.shape == (2, 0, 4)
    assert out.num_groups == 1 and out.max_gt_per_image == 0
    assert out.attn_mask.shape == (7, 7) and not out.attn_mask.any()


def test_slot_layout_and_empty_slots():
    torch.manual_seed(0)
    generator = GenerateCDNQueries(num_classes=80, label_embed_dim=8, label_noise_prob=0.0, box_noise_scale=0.0)
    labels, boxes = make_targets([3, 1])
    out = generator(labels, boxes, num_queries=5)
    n_max, groups = 3, out.num_groups
    weight = generator.label_encoder.weight
    for g in range(2 * groups):  # positive and negative blocks
        for image, count in enumerate([3, 1]):
            block = slice(g * n_max, g * n_max + count)
            torch.testing.assert_close(out.label_query[image, block], weight[labels[image]])
            torch.testing.assert_close(out.box_query[image, block], inverse_sigmoid(boxes[image]))
    # image 1 has one box: slots 1 and 2 of every block stay zero
    empty_slots = torch.tensor([g * n_max + t for g in range(2 * groups) for t in (1, 2)])
    assert (out.label_query[1, empty_slots] == 0).all() and (out.box_query[1, empty_slots] == 0).all()


def test_negatives_noisier_than_positives():
    torch.manual_seed(1)
    generator = GenerateCDNQueries(label_embed_dim=8)
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.4, 0.6, 0.2, 0.1]]).repeat(500, 1)
    negative = torch.arange(len(boxes)) % 2 == 0
    noised = box_convert(generator.noise_boxes(boxes, negative), "cxcywh", "xyxy")
    half_size = boxes[:, 2:].repeat(1, 2) / 2
    # corners move by u * half-size; no clamping happens for these central boxes
    shift = (noised - box_convert(boxes, "cxcywh", "xyxy")).abs() / half_size
    assert shift[~negative].max() < 1.0 + 1e-4
    assert shift[negative].min() > 1.0 - 1e-4 and shift[negative].max() < 2.0 + 1e-4
    assert abs(shift[~negative].mean() - 0.5) < 0.05 and abs(shift[negative].mean() - 1.5) < 0.05


def test_box_query_negatives_are_the_odd_blocks():
    torch.manual_seed(5)
    generator = GenerateCDNQueries(label_embed_dim=8, label_noise_prob=0.0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    out = generator([torch.tensor([0])], [boxes], num_queries=3)  # n_max 1 -> 100 groups of [pos, neg]
    centres = out.box_query[0].sigmoid()[:, :2].view(-1, 2, 2)
    distance = (centres - 0.5).abs().sum(-1)
    assert distance[:, 1].mean() > 2 * distance[:, 0].mean()


def test_noised_boxes_stay_in_unit_square():
    torch.manual_seed(2)
    generator = GenerateCDNQueries(label_embed_dim=8)
    boxes = torch.tensor([[0.05, 0.95, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0]])
    out = generator([torch.tensor([0, 1])], [boxes], num_queries=3)
    xyxy = box_convert(out.box_query[0].sigmoid(), "cxcywh", "xyxy")
    assert xyxy.min() >= -1e-3 and xyxy.max() <= 1 + 1e-3


def test_label_flip_rate_near_quarter():
    torch.manual_seed(3)
    num_classes = 1000  # large, so a "flip" to the same class is rare (1/1000)
    generator = GenerateCDNQueries(num_classes=num_classes, label_embed_dim=4)
    labels = torch.zeros(100, dtype=torch.long)  # 100 boxes -> 1 group, 200 copies per call
    flipped = sum((generator.noise_labels(labels.repeat(200)) != 0).float().mean().item() for _ in range(10))
    assert abs(flipped / 10 - 0.25 * (1 - 1 / num_classes)) < 0.01


def test_label_query_is_the_embedding_of_the_noised_label():
    torch.manual_seed(4)
    generator = GenerateCDNQueries(num_classes=5, label_embed_dim=8)
    out = generator([torch.tensor([0, 1, 2, 3])], [torch.rand(4, 4) * 0.3 + 0.2], num_queries=2)
    equal_rows = (out.label_query[0, :, None] == generator.label_encoder.weight[None]).all(-1)
    assert (equal_rows.sum(dim=1) == 1).all()
    out.label_query.sum().backward()
    assert generator.label_encoder.weight.grad is not None


def test_bad_labels_are_refused():
    generator = GenerateCDNQueries(num_classes=3, label_embed_dim=4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        generator([torch.tensor([3])], [torch.rand(1, 4)], num_queries=2)
