import copy
import types

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from test_meta_arch import make_input, tiny_model_config
from torch import nn
from torchvision.ops import box_convert, box_iou

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.engine import ModelIterationHook
from salience_detr.modeling.roi_refine import (
    RoIInputs,
    RoIRefineHead,
    level_strides,
    matched_mask,
    positive_targets,
    selected_rows,
    warmup_factor,
)
from salience_detr.modeling.roi_refine.layers import pool_rows, roi_pooler
from salience_detr.utils.dispatch_count import count_dispatch

EMBED_DIM = 32
NUM_CLASSES = 3
STRIDES = (8, 16, 32, 64)


def small_head(**overrides) -> RoIRefineHead:
    torch.manual_seed(0)
    options = dict(embed_dim=EMBED_DIM, num_rois=4, num_layers=1, num_heads=4, ffn_dim=64, warmup_iters=0)
    return RoIRefineHead(**{**options, **overrides})


def feature_maps(batch_size: int, padded_size: tuple[int, int]) -> list[torch.Tensor]:
    """Random levels at strides 8..64 with the sizes a stride-2 conv chain gives (ceil division)."""
    maps = []
    for stride in STRIDES:
        size = (-(-padded_size[0] // stride), -(-padded_size[1] // stride))
        maps.append(torch.randn(batch_size, EMBED_DIM, *size))
    return maps


def random_boxes(batch_size: int, num_queries: int, low: float = 0.2, high: float = 0.8) -> torch.Tensor:
    """Normalized cxcywh boxes whose XYXY corners lie inside [low, high] of the image."""
    corners = torch.rand(batch_size, num_queries, 2, 2) * (high - low) + low
    xyxy = torch.cat([corners.amin(2), corners.amax(2) + 0.01], -1)
    return box_convert(xyxy, "xyxy", "cxcywh")


def head_inputs(image_sizes, padded_size, num_queries=6):
    torch.manual_seed(1)
    batch_size = len(image_sizes)
    logits = torch.randn(batch_size, num_queries, NUM_CLASSES)
    boxes = random_boxes(batch_size, num_queries)
    inputs = RoIInputs(
        torch.randn(batch_size, num_queries, EMBED_DIM), feature_maps(batch_size, padded_size), image_sizes, padded_size
    )
    return logits, boxes, inputs


def test_shapes_with_different_image_sizes_and_fewer_queries_than_k():
    head = small_head(num_rois=100)
    logits, boxes, inputs = head_inputs([(96, 128), (64, 80), (128, 40)], (128, 128), num_queries=6)
    refinement = head(logits, boxes, inputs)
    assert refinement.boxes.shape == boxes.shape and refinement.logits.shape == logits.shape
    assert len(refinement.batch_index) == 3 * 6  # every query of every image, since Q < num_rois
    assert refinement.refined_boxes.shape == (18, 4) and refinement.iou_logits.shape == (18,)
    assert torch.isfinite(refinement.boxes).all() and torch.isfinite(refinement.logits).all()


def test_selection_is_top_k_by_sigmoid_score_plus_extra_queries():
    head = small_head(num_rois=2)
    logits, boxes, inputs = head_inputs([(96, 128), (64, 80)], (96, 128), num_queries=6)
    logits[:, :, :] = -5.0
    logits[0, 3, 1] = 4.0
    logits[0, 5, 0] = 3.0
    extra = torch.zeros(2, 6, dtype=torch.bool)
    extra[1, 0] = True
    refinement = head(logits, boxes, inputs, extra)
    selected = set(zip(refinement.batch_index.tolist(), refinement.query_index.tolist()))
    assert {(0, 3), (0, 5), (1, 0)} <= selected
    assert sum(1 for b, _ in selected if b == 0) == 2
    assert sum(1 for b, _ in selected if b == 1) == 3  # two by score plus the extra one


def test_crops_from_a_padded_batch_equal_those_of_the_image_alone():
    head = small_head(num_rois=5)
    image_sizes, padded = [(120, 128), (64, 64)], (128, 128)
    logits, boxes, inputs = head_inputs(image_sizes, padded, num_queries=5)
    boxes = random_boxes(2, 5, low=0.3, high=0.7)  # small boxes: finest level, away from the image border
    batch_cells = head.crop(inputs, boxes.flatten(0, 1), torch.arange(2).repeat_interleave(5))

    alone_features = [f[1:, :, : -(-64 // s), : -(-64 // s)] for f, s in zip(inputs.features, STRIDES)]
    alone = RoIInputs(inputs.query_features[1:], alone_features, image_sizes[1:], (64, 64))
    alone_cells = head.crop(alone, boxes[1], torch.zeros(5, dtype=torch.long))
    assert torch.allclose(batch_cells[5:], alone_cells, atol=1e-6)
    assert not torch.allclose(batch_cells[:5], alone_cells, atol=1e-3)


def test_level_strides_are_inferred_from_the_padded_size():
    assert level_strides(feature_maps(1, (800, 1216)), (800, 1216)) == list(STRIDES)
    with pytest.raises(ValueError, match="power-of-two stride"):
        level_strides([torch.zeros(1, 4, 36, 36)], (100, 100))


def test_zeroed_delta_layer_keeps_boxes_and_changed_layer_moves_them():
    head = small_head(iou_beta=0.0)
    logits, boxes, inputs = head_inputs([(96, 128)], (96, 128))
    refinement = head(logits, boxes, inputs)
    assert torch.allclose(refinement.boxes, boxes, atol=1e-6)
    assert torch.equal(refinement.logits, logits)
    nn.init.normal_(head.delta_head.layers[-1].weight, std=0.5)
    moved = head(logits, boxes, inputs).boxes
    changed = (moved - boxes).abs().amax(-1) > 1e-4
    selected = torch.zeros(6, dtype=torch.bool)
    selected[refinement.query_index] = True
    assert changed[0, selected].all() and not changed[0, ~selected].any()


def test_iou_rescoring_uses_geometric_mix():
    head = small_head(iou_beta=0.5)
    nn.init.zeros_(head.iou_head.layers[-1].weight)
    nn.init.constant_(head.iou_head.layers[-1].bias, 0.0)  # predicted IoU 0.5 everywhere
    logits, boxes, inputs = head_inputs([(96, 128)], (96, 128), num_queries=4)
    rescored = head(logits, boxes, inputs).logits.sigmoid()
    assert torch.allclose(rescored, (logits.sigmoid() * 0.5).sqrt(), atol=1e-5)


def test_losses_with_an_image_without_boxes_are_finite_and_train_only_the_head():
    head = small_head(num_rois=2)
    logits, boxes, inputs = head_inputs([(96, 128), (64, 80)], (96, 128), num_queries=6)
    boxes.requires_grad_(True)
    inputs.query_features.requires_grad_(True)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": random_boxes(1, 2)[0]},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.long),) * 2]
    refinement = head(logits, boxes, inputs, matched_mask(indices, (2, 6), boxes.device))
    losses = head.losses(refinement, targets, indices)
    assert set(losses) == {"loss_roi_bbox", "loss_roi_giou", "loss_roi_iou"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert boxes.grad is None and inputs.query_features.grad is None
    assert head.delta_head.layers[-1].weight.grad.abs().sum() > 0


def test_positive_iou_adds_the_refined_queries_near_an_object_with_their_best_ground_truth():
    head = small_head(num_rois=6, positive_iou=0.5)
    logits, _, inputs = head_inputs([(96, 128), (64, 80)], (96, 128), num_queries=4)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 40.0, 100.0, 80.0]]) / torch.tensor([128.0, 96.0] * 2)
    queries = torch.tensor(
        [
            [10.0, 10.0, 50.0, 50.0],  # matched to ground truth 0
            [14.0, 10.0, 54.0, 50.0],  # IoU 0.82 with ground truth 0
            [30.0, 30.0, 70.0, 70.0],  # IoU 0.14 with both: background
            [62.0, 40.0, 100.0, 84.0],  # IoU 0.86 with ground truth 1
        ]
    ) / torch.tensor([128.0, 96.0] * 2)
    boxes = box_convert(torch.stack([queries, queries]), "xyxy", "cxcywh")
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": box_convert(gt, "xyxy", "cxcywh")},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    indices = [(torch.tensor([0]), torch.tensor([0])), (torch.zeros(0, dtype=torch.long),) * 2]
    refinement = head(logits, boxes, inputs, matched_mask(indices, (2, 4), boxes.device))
    rows, target_boxes, weights = positive_targets(refinement, targets, indices, head.positive_iou)
    positives = [(int(refinement.batch_index[r]), int(refinement.query_index[r])) for r in rows[weights > 0]]
    assert positives == [(0, 0), (0, 1), (0, 3)]
    assert torch.allclose(target_boxes[weights > 0], targets[0]["boxes"][[0, 0, 1]])
    matched_only = positive_targets(refinement, targets, indices, positive_iou=None)
    assert matched_only[0].tolist() == rows[:1].tolist()
    assert all(torch.isfinite(v) and v > 0 for v in head.losses(refinement, targets, indices).values())
    with pytest.raises(ValueError, match="positive_iou"):
        small_head(positive_iou=0.0)


def test_positive_iou_with_every_refined_query_matched_adds_nothing():
    head = small_head(num_rois=1, positive_iou=0.5)
    logits, boxes, inputs = head_inputs([(96, 128), (64, 80)], (96, 128), num_queries=1)
    targets = [{"labels": torch.tensor([0]), "boxes": random_boxes(1, 1)[0]} for _ in range(2)]
    indices = [(torch.tensor([0]), torch.tensor([0]))] * 2
    refinement = head(logits, boxes, inputs, matched_mask(indices, (2, 1), boxes.device))
    rows, target_boxes, weights = positive_targets(refinement, targets, indices, head.positive_iou)
    assert sorted(rows[weights > 0].tolist()) == [0, 1]
    assert target_boxes[weights > 0].shape == (2, 4)


def test_losses_need_the_matched_queries_selected():
    head = small_head(num_rois=1)
    logits, boxes, inputs = head_inputs([(96, 128)], (96, 128))
    refinement = head(logits, boxes, inputs)
    missing = next(q for q in range(6) if q not in refinement.query_index.tolist())
    target = [{"labels": torch.tensor([0]), "boxes": random_boxes(1, 1)[0]}]
    with pytest.raises(ValueError, match="extra_selected"):
        head.losses(refinement, target, [(torch.tensor([missing]), torch.tensor([0]))])


def test_warmup_ramps_from_zero_and_is_off_without_an_iteration():
    assert warmup_factor(None, 100) == 1.0 and warmup_factor(49, 0) == 1.0
    assert warmup_factor(0, 100) == pytest.approx(0.01) and warmup_factor(500, 100) == 1.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="iou_beta"):
        small_head(iou_beta=1.5)
    with pytest.raises(ValueError, match="loss_roi_iou"):
        small_head(loss_weights={"loss_roi_bbox": 5.0, "loss_roi_giou": 2.0})
    head = small_head()
    logits, boxes, inputs = head_inputs([(96, 128)], (96, 128))
    with pytest.raises(ValueError, match="query features"):
        head(logits, boxes, RoIInputs(inputs.query_features[:, :3], inputs.features, [(96, 128)], (96, 128)))


# ---- wired into SalienceDETR (tiny model from test_meta_arch) ----


@pytest.fixture(scope="module")
def roi_model():
    cfg = tiny_model_config()
    cfg.model.roi_refine = L(RoIRefineHead)(
        embed_dim="${..embed_dim}", num_rois=10, num_layers=1, num_heads=4, ffn_dim=64, iou_beta=0.0, warmup_iters=0
    )
    torch.manual_seed(0)
    return instantiate(cfg.model)


def small_batch():
    return [
        make_input(64, 96, [[10, 12, 60, 50], [50, 20, 90, 60]], [1, 4]),
        make_input(48, 64, [], []),
    ]


def detections(model, batch):
    model.eval()
    with torch.no_grad():
        return [r["instances"] for r in model(batch)]


def test_state_dict_without_the_head_is_the_original():
    torch.manual_seed(0)
    base = instantiate(tiny_model_config().model)
    assert base.roi_refine is None
    keys = set(base.state_dict())
    cfg = tiny_model_config()
    cfg.model.roi_refine = L(RoIRefineHead)(embed_dim="${..embed_dim}", num_heads=4)
    with_head = set(instantiate(cfg.model).state_dict())
    assert {k for k in with_head if not k.startswith("roi_refine.")} == keys
    assert any(k.startswith("roi_refine.") for k in with_head)


def test_command_line_none_string_is_refused_with_the_hydra_spelling():
    cfg = LazyConfig.apply_overrides(tiny_model_config(), ["model.roi_refine=None"])  # Hydra reads this as a string
    with pytest.raises(TypeError, match="model.roi_refine=null"):
        instantiate(cfg.model)
    cfg = LazyConfig.apply_overrides(tiny_model_config(), ["model.roi_refine=null"])
    assert instantiate(cfg.model).roi_refine is None


def test_inference_uses_refined_boxes(roi_model):
    torch.manual_seed(2)
    batch = small_batch()
    refined = detections(roi_model, batch)
    head = roi_model.roi_refine
    roi_model.roi_refine = None
    try:
        base = detections(roi_model, batch)
    finally:
        roi_model.roi_refine = head
    for a, b in zip(refined, base):  # zero-initialised delta layer: identical detections
        assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3)
        assert torch.equal(a.pred_classes, b.pred_classes) and torch.allclose(a.scores, b.scores)

    changed = copy.deepcopy(roi_model)
    nn.init.normal_(changed.roi_refine.delta_head.layers[-1].weight, std=0.5)
    moved = detections(changed, batch)
    assert not torch.allclose(moved[0].pred_boxes.tensor, refined[0].pred_boxes.tensor, atol=1e-2)


@pytest.mark.parametrize("detach_features", [True, False])
def test_training_adds_finite_roi_losses_without_gradient_to_the_decoder(roi_model, detach_features):
    roi_model.train()
    roi_model.roi_refine.detach_features = detach_features
    torch.manual_seed(3)
    try:
        with EventStorage(start_iter=0):
            losses = roi_model(small_batch())
    finally:
        roi_model.roi_refine.detach_features = True
    assert {"loss_roi_bbox", "loss_roi_giou", "loss_roi_iou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    roi_model.zero_grad()
    sum(v for k, v in losses.items() if k.startswith("loss_roi")).backward()
    decoder_grads = [p.grad for p in roi_model.transformer.decoder.parameters()]
    assert all(g is None or not g.abs().any() for g in decoder_grads)
    assert roi_model.roi_refine.delta_head.layers[-1].weight.grad.abs().sum() > 0
    base_grads = [p.grad for name, p in roi_model.named_parameters() if not name.startswith("roi_refine.")]
    base_trained = any(g is not None and g.abs().any() for g in base_grads)
    assert base_trained == (not detach_features)  # detached crops: the RoI loss trains the head alone
    roi_model.zero_grad()


def test_warmup_scales_every_loss_term():
    head = small_head(num_rois=2, warmup_iters=10)
    logits, boxes, inputs = head_inputs([(96, 128)], (96, 128))
    targets = [{"labels": torch.tensor([1]), "boxes": random_boxes(1, 1)[0]}]
    indices = [(torch.tensor([2]), torch.tensor([0]))]
    refinement = head(logits, boxes, inputs, matched_mask(indices, (1, 6), boxes.device))
    full = head.losses(refinement, targets, indices)
    early = head.losses(refinement, targets, indices, iteration=0)
    for name, value in full.items():
        assert torch.allclose(early[name], value * 0.1), name


def test_the_hook_hands_the_trainer_iteration_to_the_model_and_the_model_to_the_warmup(roi_model):
    hook = ModelIterationHook(roi_model)
    hook.trainer = types.SimpleNamespace(iter=0)
    roi_model.train()
    roi_model.roi_refine.warmup_iters = 10
    try:
        warmed = {}
        for iteration in (0, None):
            if iteration is None:
                hook.after_train()
            else:
                hook.before_step()
            assert roi_model.iteration == iteration
            torch.manual_seed(3)
            with EventStorage(start_iter=40):  # the storage's iteration is not what the warm-up reads
                warmed[iteration] = roi_model(small_batch())
    finally:
        roi_model.roi_refine.warmup_iters = 0
        roi_model.iteration = None
    roi_terms = [name for name in warmed[None] if name.startswith("loss_roi")]
    assert len(roi_terms) == 3
    for name in warmed[None]:
        factor = 0.1 if name in roi_terms else 1.0
        torch.testing.assert_close(warmed[0][name], warmed[None][name] * factor)
    plain = nn.Linear(2, 2)
    hook = ModelIterationHook(plain)
    hook.trainer = types.SimpleNamespace(iter=7)
    hook.before_step()
    assert not hasattr(plain, "iteration"), "a model that does not read the iteration is left alone"


def test_adding_the_head_leaves_the_base_models_training_bit_for_bit_unchanged():
    """Detached crops, a forked generator for its initialisation and its own clipping group: the with-head arm of
    the ablation trains the same base model as the without-head arm, so switching the head off compares the two."""
    from salience_detr.engine.trainer import DetrTrainer

    class Batches:
        def __iter__(self):
            while True:
                yield [make_input(96, 128, [[10, 12, 60, 50], [50, 20, 90, 60]], [1, 2]), make_input(96, 96, [], [])]

    trained = []
    for with_head in (False, True):
        cfg = tiny_model_config()
        if with_head:
            cfg.model.roi_refine = L(RoIRefineHead)(embed_dim="${..embed_dim}", num_heads=4, warmup_iters=0)
        torch.manual_seed(0)
        model = instantiate(cfg.model).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        trainer = DetrTrainer(model, Batches(), optimizer, clip_grad_max_norm=0.1, clip_grad_separate=["roi_refine"])
        with EventStorage(0) as storage:
            trainer.storage = storage
            for _ in range(2):
                trainer.run_step()
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("roi_refine.")}
        trained.append((state, torch.randn(4)))  # the random stream goes on identically
    (base, base_next), (with_head, with_head_next) = trained
    assert base.keys() == with_head.keys()
    assert all(torch.equal(base[k], with_head[k]) for k in base)
    assert torch.equal(base_next, with_head_next)


def test_training_only_the_head_keeps_the_rest_as_loaded_batchnorm_statistics_included():
    """train.trainable=["roi_refine"]: adding the head to a trained checkpoint trains the head and nothing else."""
    from salience_detr.engine import DetrTrainer, detr_param_groups, freeze_all_but

    cfg = tiny_model_config()
    cfg.model.roi_refine = L(RoIRefineHead)(embed_dim="${..embed_dim}", num_heads=4, warmup_iters=0)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    frozen = freeze_all_but(model, ["roi_refine"])
    assert model.roi_refine not in frozen and model.transformer in frozen and model.backbone in frozen
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"roi_refine"}
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(detr_param_groups(model, 1e-3, 1e-4))
    batch = [make_input(96, 128, [[10, 12, 60, 50], [50, 20, 90, 60]], [1, 2]), make_input(96, 96, [], [])]
    batches = iter(lambda: batch, None)
    trainer = DetrTrainer(model, batches, optimizer, clip_grad_max_norm=0.1, frozen_modules=frozen)
    with EventStorage(0) as storage:
        trainer.storage = storage
        for _ in range(2):
            trainer.run_step()
            model.train()  # as an evaluation hook leaves it: the trainer puts the frozen modules back in eval
    after = model.state_dict()
    batchnorms = [k for k in after if k.startswith("transformer.neck") and k.endswith("running_mean")]
    assert batchnorms, "the tiny model's transformer neck should hold BatchNorm statistics"
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("roi_refine."))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("roi_refine."))


def test_trainable_paths_are_checked_and_may_be_nested():
    from salience_detr.engine import freeze_all_but

    torch.manual_seed(0)
    model = instantiate(tiny_model_config().model)
    with pytest.raises(ValueError, match="'roi_refine'.*not a module with parameters"):
        freeze_all_but(model, ["roi_refine"])  # this model has no head
    frozen = freeze_all_but(model, ["transformer.decoder"])
    assert model.transformer.encoder in frozen and model.transformer not in frozen and model.backbone in frozen
    assert all(p.requires_grad == n.startswith("transformer.decoder.") for n, p in model.named_parameters())


def test_pooling_the_selected_boxes_equals_detectrons_pooler_on_per_image_lists():
    generator = torch.Generator().manual_seed(5)
    features = [torch.randn(3, 4, 256 // s, 320 // s, generator=generator) for s in (8, 16, 32, 64)]
    sizes = torch.rand(3, 40, 2, generator=generator) * torch.tensor([300.0, 240.0]) + 2
    corners = torch.rand(3, 40, 2, generator=generator) * (torch.tensor([320.0, 256.0]) - sizes)
    rois = torch.cat([corners, corners + sizes], dim=-1)
    selected = torch.rand(3, 40, generator=generator) < 0.4
    selected[1] = False  # an image with no selected box
    pooler = roi_pooler((8, 16, 32, 64), 7, 0, 112, 4)  # canonical size 112: every level gets boxes
    batch_index, query_index, valid = selected_rows(selected)
    pooled = pool_rows(pooler, features, rois[batch_index, query_index], batch_index)
    expected_batch, expected_query = selected.nonzero(as_tuple=True)
    assert torch.equal(batch_index, expected_batch) and torch.equal(query_index, expected_query) and valid.all()
    expected = pooler(features, [Boxes(image_rois[mask]) for image_rois, mask in zip(rois, selected)])
    assert torch.equal(pooled, expected)
    levels = assign_boxes_to_levels([Boxes(rois[selected])], 2, 5, 112, 4)
    assert len(levels.unique()) == 4


def per_image_positives(refinement, targets, rows, positive_iou):
    """The per-image loop the batched positive search replaces."""
    unmatched = torch.ones(len(refinement.batch_index), dtype=torch.bool)
    unmatched[rows] = False
    found, found_boxes = [], []
    for image, target in enumerate(targets):
        if not len(target["boxes"]):
            continue
        candidates = (unmatched & (refinement.batch_index == image)).nonzero(as_tuple=True)[0]
        candidate_xyxy = box_convert(refinement.input_boxes[candidates], "cxcywh", "xyxy")
        best_iou, best_gt = box_iou(candidate_xyxy, box_convert(target["boxes"], "cxcywh", "xyxy")).max(1)
        found.append(candidates[best_iou >= positive_iou])
        found_boxes.append(target["boxes"][best_gt[best_iou >= positive_iou]])
    return torch.cat(found), torch.cat(found_boxes)


def test_batched_positive_search_equals_the_per_image_loop():
    head = small_head(num_rois=12, positive_iou=0.3)
    logits, _, inputs = head_inputs([(96, 128), (64, 80), (96, 96)], (96, 128), num_queries=16)
    generator = torch.Generator().manual_seed(2)
    gt = [random_boxes(1, n)[0] for n in (5, 0, 2)]
    jitter = torch.randn(3, 16, 4, generator=generator) * 0.03
    boxes = torch.stack([gt[0][torch.arange(16) % 5], random_boxes(1, 16)[0], gt[2][torch.arange(16) % 2]]) + jitter
    targets = [{"labels": torch.zeros(len(b), dtype=torch.long), "boxes": b} for b in gt]
    indices = [(torch.tensor([3, 7]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.long),) * 2]
    indices.append((torch.tensor([0]), torch.tensor([1])))
    refinement = head(logits, boxes.clamp(0.05, 0.95), inputs, matched_mask(indices, (3, 16), boxes.device))
    rows, target_boxes, weights = positive_targets(refinement, targets, indices, head.positive_iou)
    matched, matched_boxes, _ = positive_targets(refinement, targets, indices, None)
    looped_rows, looped_boxes = per_image_positives(refinement, targets, matched, head.positive_iou)
    assert len(looped_rows) > 3 and set(refinement.batch_index[looped_rows].tolist()) == {0, 2}
    assert torch.equal(rows[weights > 0], torch.cat([matched, looped_rows]))
    assert torch.equal(target_boxes[weights > 0], torch.cat([matched_boxes, looped_boxes]))


@pytest.mark.parametrize("positive_iou", [None, 0.5])
def test_a_match_that_was_not_refined_is_refused_with_or_without_positive_search(positive_iou):
    head = small_head(num_rois=1, positive_iou=positive_iou)
    logits, boxes, inputs = head_inputs([(96, 128)], (96, 128))
    refinement = head(logits, boxes, inputs)
    missing = next(q for q in range(6) if q not in refinement.query_index.tolist())
    target = [{"labels": torch.tensor([0]), "boxes": random_boxes(1, 1)[0]}]
    with pytest.raises(ValueError, match="extra_selected"):
        positive_targets(refinement, target, [(torch.tensor([missing]), torch.tensor([0]))], positive_iou)
    refined = refinement.query_index[:1]
    with count_dispatch() as counts:
        rows, _, _ = positive_targets(refinement, target, [(refined, torch.tensor([0]))], positive_iou)
    assert rows[0] == 0 and counts.total_syncs == 1  # the check shares the read of the positive search
