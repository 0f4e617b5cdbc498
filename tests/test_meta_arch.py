import math

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.backbone import ResNet
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.modeling.meta_arch import SalienceDETR, postprocess_detections
from salience_detr.utils.dispatch_count import count_dispatch

R50_CONFIG = "configs/models/salience_detr_r50.py"
NUM_CLASSES = 5


def tiny_model_config():
    """The R50 model config shrunk to ResNet-18, 64-d, 2+2 layers, 50 queries: a few seconds per CPU step."""
    cfg = LazyConfig.load(R50_CONFIG)
    model = cfg.model
    model.num_classes = NUM_CLASSES
    model.embed_dim = 64
    model.backbone.stages = L(ResNet.make_default_stages)(depth=18, norm="FrozenBN")
    model.neck.in_channels = [128, 256, 512]
    model.position_embedding.num_pos_feats = 32
    encoder, decoder = model.transformer.encoder, model.transformer.decoder
    encoder.num_layers = 2
    encoder.layer.update(ffn_dim=128, num_heads=4, num_points=2, topk_sa=30)
    decoder.num_layers = 2
    decoder.layer.update(ffn_dim=128, num_heads=4, num_points=2)
    model.transformer.neck.num_blocks = 1
    model.transformer.num_queries = 50
    model.transformer.layer_filter_ratio = (1.0, 0.5)
    model.denoising_generator.denoising_nums = 10
    return cfg


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return instantiate(tiny_model_config().model)


def make_input(height, width, boxes, classes):
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    return {"image": image, "instances": instances, "height": height * 2, "width": width * 2}


def mixed_batch():
    return [
        make_input(96, 128, [[10, 12, 60, 70], [70, 20, 120, 90]], [1, 4]),
        make_input(64, 96, [], []),
        make_input(128, 80, [[5, 5, 40, 100]], [0]),
    ]


def test_registered_and_r50_model_is_salience_detr():
    assert META_ARCH_REGISTRY.get("SalienceDETR") is SalienceDETR


def test_training_step_gives_finite_losses_with_empty_image(tiny_model):
    tiny_model.train()
    losses = tiny_model(mixed_batch())
    decoder_layers = 2
    assert len(losses) == 3 * decoder_layers + 3 + 3 * decoder_layers + 1
    for suffix in ["", "_0", "_enc", "_dn", "_dn_0"]:
        assert {f"loss_class{suffix}", f"loss_bbox{suffix}", f"loss_giou{suffix}"} <= set(losses)
    assert "loss_salience" in losses
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    grads = [p.grad for p in tiny_model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert tiny_model.denoising_generator.label_encoder.weight.grad is not None
    tiny_model.zero_grad()


def test_training_step_without_any_box(tiny_model):
    tiny_model.train()
    tiny_model.zero_grad(set_to_none=True)
    losses = tiny_model([make_input(64, 64, [], []), make_input(64, 96, [], [])])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # every trainable parameter takes part (DDP without find_unused_parameters), the dn embedding included
    unused = [n for n, p in tiny_model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    tiny_model.zero_grad()


def test_class_id_out_of_range_is_a_clear_error(tiny_model):
    tiny_model.train()
    with pytest.raises(ValueError, match="num_classes"):
        tiny_model([make_input(64, 64, [[1, 1, 20, 20]], [NUM_CLASSES])])


def test_batch_of_one_tiny_image_names_the_batchnorm_fix(tiny_model):
    tiny_model.train()
    with pytest.raises(ValueError, match="1x1 feature map at stride 64.*2 or more images"):
        tiny_model([make_input(64, 64, [[1, 1, 20, 20]], [1])])
    tiny_model.eval()
    with torch.no_grad():
        assert len(tiny_model([make_input(64, 64, [], [])])) == 1  # evaluation keeps working


def test_eval_output_format_and_scaling(tiny_model):
    tiny_model.eval()
    batch = mixed_batch()
    with torch.no_grad():
        outputs = tiny_model(batch)
    assert len(outputs) == 3
    for x, out in zip(batch, outputs):
        assert set(out) == {"instances"}
        instances = out["instances"]
        assert instances.image_size == (x["height"], x["width"])
        assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        assert 0 < len(instances) <= 300
        assert instances.pred_classes.min() >= 0 and instances.pred_classes.max() < NUM_CLASSES
        assert torch.all(instances.scores[:-1] >= instances.scores[1:])
        boxes = instances.pred_boxes.tensor
        assert torch.all(boxes[:, 2] <= x["width"]) and torch.all(boxes[:, 3] <= x["height"])


def test_eval_boxes_follow_decoder_output(tiny_model):
    """A box predicted at the centre of the unpadded image lands at the centre of the requested output size."""
    tiny_model.eval()
    captured = {}
    hook = tiny_model.transformer.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    batch = [make_input(64, 96, [], []), make_input(96, 64, [], [])]
    with torch.no_grad():
        outputs = tiny_model(batch)
    hook.remove()
    out = captured["out"]
    logits, boxes = out.pred_logits[-1], out.pred_boxes[-1]
    for index, (x, result) in enumerate(zip(batch, outputs)):
        flat = logits[index].sigmoid().flatten()
        best = int(flat.argmax())
        cx, cy, w, h = boxes[index, best // NUM_CLASSES].tolist()
        expected = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * torch.tensor(
            [x["width"], x["height"], x["width"], x["height"]], dtype=torch.float32
        )
        expected[0::2] = expected[0::2].clamp(0, x["width"])
        expected[1::2] = expected[1::2].clamp(0, x["height"])
        torch.testing.assert_close(result["instances"].pred_boxes.tensor[0], expected, rtol=1e-4, atol=1e-3)
        assert int(result["instances"].pred_classes[0]) == best % NUM_CLASSES
        assert math.isclose(float(result["instances"].scores[0]), float(flat.max()), rel_tol=1e-6)


def test_return_salience_adds_maps_and_indices(tiny_model):
    tiny_model.eval()
    tiny_model.return_salience = True
    try:
        with torch.no_grad():
            out = tiny_model([make_input(64, 96, [], [])])[0]
    finally:
        tiny_model.return_salience = False
    assert len(out["salience"]) == 4 and out["salience"][0].ndim == 2
    assert len(out["selected_indices"]) == 2
    assert out["spatial_shapes"].shape == (4, 2)


def test_padding_mask_and_normalisation(tiny_model):
    tiny_model.eval()
    batch = [make_input(50, 70, [], []), make_input(33, 90, [], [])]
    images = tiny_model.preprocess_image(batch)
    assert images.tensor.shape[-2:] == (64, 96)
    expected = (batch[0]["image"].float() - tiny_model.pixel_mean) / tiny_model.pixel_std
    torch.testing.assert_close(images.tensor[0, :, :50, :70], expected)
    assert torch.all(images.tensor[0, :, 50:] == 0) and torch.all(images.tensor[1, :, :, 90:] == 0)
    assert "pixel_mean" not in tiny_model.state_dict()


@pytest.mark.slow
def test_overfitting_two_images_lowers_the_loss():
    """From scratch, 50 steps take the total loss from about 23 to about 13 (measured)."""
    torch.manual_seed(0)
    model = instantiate(tiny_model_config().model)
    model.train()
    batch = [
        make_input(96, 96, [[10, 10, 50, 60], [55, 40, 90, 90]], [1, 3]),
        make_input(96, 128, [[20, 30, 100, 80]], [2]),
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    totals = []
    for _ in range(50):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        totals.append(float(total.detach()))
    assert sum(totals[-5:]) / 5 < 0.7 * sum(totals[:5]) / 5


def detections(boxes):
    instances = Instances((60, 80))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.linspace(0.9, 0.1, len(boxes))
    instances.pred_classes = torch.arange(len(boxes))
    return instances


@pytest.mark.parametrize("output_size", [(120, 100), (60, 80), (45, 200)])
def test_postprocess_gives_detectrons_instances_with_one_sync(output_size):
    boxes = [
        [10.0, 5.0, 30.0, 25.0],  # inside
        [20.0, 20.0, 20.0, 40.0],  # zero width: dropped
        [-10.0, -5.0, 30.5, 70.0],  # clipped on three sides
        [85.0, 10.0, 95.0, 20.0],  # right of the image: empty once clipped
        [5.0, 50.0, 70.0, 50.5],  # thin but not empty
        [30.0, 30.0, 10.0, 40.0],  # x2 < x1: dropped
    ]
    expected = detector_postprocess(detections(boxes), *output_size)
    with count_dispatch() as counts:
        ours = postprocess_detections(detections(boxes), *output_size)
    assert counts.total_syncs == 1
    assert ours.image_size == expected.image_size and len(ours) == len(expected) < len(boxes)
    assert set(ours.get_fields()) == set(expected.get_fields())
    assert torch.equal(ours.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(ours.scores, expected.scores) and torch.equal(ours.pred_classes, expected.pred_classes)
    empty = postprocess_detections(detections([[1.0, 1.0, 1.0, 1.0]]), *output_size)
    assert len(empty) == 0 and empty.pred_boxes.tensor.shape == (0, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_postprocess_refuses_boxes_that_are_not_finite_as_detectron2_does(bad):
    boxes = [[10.0, 5.0, 30.0, 25.0], [1.0, 2.0, bad, 4.0]]
    with pytest.raises(AssertionError, match="infinite or NaN"):
        detector_postprocess(detections(boxes), 60, 80)
    with pytest.raises(ValueError, match="infinite or NaN"):
        postprocess_detections(detections(boxes), 60, 80)
