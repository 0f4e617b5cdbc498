"""SalienceDETR meta-architecture: detectron2 batched inputs -> weighted losses (training) or Instances (eval).

Normalisation and padding happen here (docs/model.md#preprocessing, #padding-masks, #detectron2-integration):
images are normalised, then padded with zeros to a multiple of ``size_divisibility``; the padding mask follows the
padded batch and is resized to every feature level by nearest interpolation. Boxes inside the model are normalized
cxcywh relative to each unpadded image.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from salience_detr.layers.box_ops import to_absolute_xyxy, whwh_scale

from .criterion import average_num_boxes
from .denoising import check_class_ids
from .frozen_bn import cache_frozen_batchnorm
from .roi_refine import RoIInputs, RoIRefineHead
from .transformer import SalienceTransformer, TransformerOutput


def padding_mask(images: ImageList) -> Tensor:
    """(B, H_pad, W_pad) bool, True on padding (docs/model.md#padding-masks)."""
    batch_size, _, height, width = images.tensor.shape
    mask = torch.ones(batch_size, height, width, dtype=torch.bool, device=images.tensor.device)
    for index, (h, w) in enumerate(images.image_sizes):
        mask[index, :h, :w] = False
    return mask


def normalise_and_pad(images: list[Tensor], mean: Tensor, std: Tensor, size_divisibility: int) -> ImageList:
    """``(image - mean) / std`` of each image, zero-padded to the largest size of the batch rounded up to
    ``size_divisibility`` like ``ImageList.from_tensors``, with the sizes computed on the host (it reads them back
    from tensors).

    The raw images are copied into a batch filled with ``mean``, which is then normalised in two calls: each value is
    the same float arithmetic as image by image, and the padding becomes exactly 0.
    """
    if torch.jit.is_tracing():  # export: detectron2 keeps the sizes traced
        return ImageList.from_tensors([(x.float() - mean) / std for x in images], size_divisibility, pad_value=0.0)
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    stride = max(size_divisibility, 1)
    height, width = (-(-max(side) // stride) * stride for side in zip(*sizes))
    batch = mean.expand(len(images), -1, height, width).contiguous()
    for image, padded, (h, w) in zip(images, batch, sizes):
        padded[..., :h, :w].copy_(image)
    return ImageList((batch - mean) / std, sizes)


def level_masks_for(mask: Tensor, features: list[Tensor]) -> list[Tensor]:
    """Padding mask resized to each feature map with nearest interpolation (official ``F.interpolate`` default)."""
    return [F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in features]


def _nearest_sources(in_size: int, out_sizes: list[int]) -> list[np.ndarray]:
    """The input row that ``F.interpolate``'s default nearest mode takes for every output row, one array per size:
    its float32 rule ``min(floor(i * (in / out)), in - 1)`` (``nearest_idx`` of ATen's UpSample.h), on the host
    (tested against the op for every size up to 256)."""
    scales = [np.float32(in_size) / np.float32(out) for out in out_sizes]
    return [
        np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale), in_size - 1).astype(np.int64)
        for out, scale in zip(out_sizes, scales)
    ]


def host_level_masks(
    image_sizes: list[tuple[int, int]], padded_size: tuple[int, int], shapes: list[tuple[int, int]]
) -> list[np.ndarray]:
    """Every level's (B, H_l, W_l) bool padding mask, ``level_masks_for(padding_mask(...))`` built on the host.

    Nearest interpolation picks rows and columns independently, so a cell is padding where its source row is
    below the image's height or its source column right of its width. One transfer per level, no device work.
    """
    rows = _nearest_sources(padded_size[0], [h for h, _ in shapes])
    cols = _nearest_sources(padded_size[1], [w for _, w in shapes])
    heights = np.array([h for h, _ in image_sizes]).reshape(-1, 1, 1)
    widths = np.array([w for _, w in image_sizes]).reshape(-1, 1, 1)
    return [(r.reshape(1, -1, 1) >= heights) | (c.reshape(1, 1, -1) >= widths) for r, c in zip(rows, cols)]


def level_valid_counts(
    image_sizes: list[tuple[int, int]], padded_size: tuple[int, int], shapes: list[tuple[int, int]]
) -> list[list[int]]:
    """(B, L) unpadded cells of every image's level mask (``level_masks_for``), computed on the host.

    The token budgets come from these counts instead of a read of the device masks (docs/model.md#token-ranking).
    """
    return unpadded_counts(host_level_masks(image_sizes, padded_size, shapes))


def unpadded_counts(host_masks: list[np.ndarray]) -> list[list[int]]:
    """(B, L) unpadded cells of each image in each level's (B, H_l, W_l) host padding mask, as host ints."""
    return np.stack([(~mask).reshape(len(mask), -1).sum(1) for mask in host_masks], axis=1).tolist()


def split_denoising(logits: Tensor, boxes: Tensor, num_denoising: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the (num_layers, B, D + Q', ...) decoder outputs into denoising and matching parts (dn_post_process)."""
    sizes = [num_denoising, logits.shape[2] - num_denoising]
    (dn_logits, logits), (dn_boxes, boxes) = logits.split(sizes, dim=2), boxes.split(sizes, dim=2)
    return layer_outputs(dn_logits, dn_boxes), layer_outputs(logits, boxes)


def layer_outputs(logits: Tensor, boxes: Tensor) -> dict[str, Any]:
    """Last decoder layer as the main prediction, earlier layers as ``aux_outputs`` (one unbind per tensor)."""
    logits, boxes = logits.unbind(0), boxes.unbind(0)
    return {
        "pred_logits": logits[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])],
    }


def postprocess_detections(instances: Instances, height: int, width: int) -> Instances:
    """detectron2's ``detector_postprocess`` for box predictions, with one host sync instead of four.

    The same rescaling to ``(height, width)``, clipping and filtering of empty boxes (identical Instances, tested
    against detectron2's), but its finiteness assert and its boolean-mask indexing of every field are one
    ``nonzero``: when a box is not finite every index is listed once more, so the length alone tells (no read of
    its own). Under tracing, or with sizes given as tensors, detectron2's own function runs.
    """
    if torch.jit.is_tracing() or isinstance(height, Tensor) or isinstance(width, Tensor):
        return detector_postprocess(instances, height, width)
    boxes = instances.pred_boxes
    boxes.scale(width / instances.image_size[1], height / instances.image_size[0])
    x1, y1, x2, y2 = boxes.tensor.unbind(1)
    clipped = torch.stack(
        (
            x1.clamp(min=0, max=width),
            y1.clamp(min=0, max=height),
            x2.clamp(min=0, max=width),
            y2.clamp(min=0, max=height),
        ),
        dim=-1,
    )
    keep = (clipped[:, 2] - clipped[:, 0] > 0) & (clipped[:, 3] - clipped[:, 1] > 0)
    not_finite = ~torch.isfinite(boxes.tensor).all()
    hits = torch.cat([keep, not_finite.expand(len(keep) + 1)]).nonzero()[:, 0]
    if len(hits) > len(keep):
        raise ValueError(
            "predicted boxes contain infinite or NaN values (detectron2's 'Box tensor contains infinite or NaN!'); "
            "the weights or the input are broken: check the checkpoint, the AMP settings and the input image"
        )
    fields = dict(instances.get_fields(), pred_boxes=Boxes(clipped))
    return Instances((height, width), **{name: value[hits] for name, value in fields.items()})


@META_ARCH_REGISTRY.register()
class SalienceDETR(nn.Module):
    """Salience DETR (CVPR 2024) with explicit modules, constructible from a LazyConfig.

    Training input: detectron2 dicts with "image" (C,H,W) in ``input_format`` and "instances" (gt_boxes absolute
    XYXY in the image as given, gt_classes contiguous ids). Eval output: [{"instances": Instances(pred_boxes, scores,
    pred_classes)}] rescaled to "height"/"width". With ``return_salience=True`` eval outputs also carry the per-level
    salience logit maps, the per-encoder-layer selected token indices and the tokens chosen as queries (for
    visualisation).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        position_embedding: nn.Module,
        transformer: SalienceTransformer,
        criterion: nn.Module,
        focus_criterion: nn.Module,
        denoising_generator: nn.Module,
        num_classes: int = 80,
        embed_dim: int = 256,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
        input_format: str = "RGB",
        select_box_nums_for_evaluation: int = 300,
        size_divisibility: int = 32,
        return_salience: bool = False,
        roi_refine: RoIRefineHead | None = None,
    ):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embed_dim", embed_dim)):
            if getattr(transformer, name) != value:
                raise ValueError(
                    f"transformer.{name}={getattr(transformer, name)} differs from the model's {name}={value}; "
                    f"set both from one value (the model config interpolates ${{..{name}}})."
                )
        if roi_refine is not None and not isinstance(roi_refine, nn.Module):
            raise TypeError(
                f"roi_refine must be a RoIRefineHead or None, got {roi_refine!r}; "
                "to switch the head off on the command line write model.roi_refine=null (Hydra syntax)."
            )
        cache_frozen_batchnorm(backbone)  # FrozenBN's scale and shift computed once, not on every training forward
        self.backbone = backbone
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.denoising_generator = denoising_generator
        self.criterion = criterion
        self.roi_refine = roi_refine
        self.focus_criterion = focus_criterion
        self.num_classes = num_classes
        self.input_format = input_format
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.size_divisibility = size_divisibility
        self.return_salience = return_salience
        #: the training iteration, set before every step by engine.ModelIterationHook (None outside training)
        self.iteration: int | None = None
        shapes = backbone.output_shape()
        self.in_features = sorted(shapes, key=lambda name: shapes[name].stride)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        """Normalise, then pad with zeros to a multiple of size_divisibility (official order)."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        return normalise_and_pad(images, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def check_batchnorm_statistics(self, features: list[Tensor], padded_size: torch.Size) -> None:
        """Name the fix before the transformer neck's BatchNorm fails on a level with one value per channel."""
        single = [f for f in features if f.shape[0] * f.shape[-2] * f.shape[-1] == 1]
        if not single:
            return
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.transformer.modules()):
            stride = padded_size[-1] // single[0].shape[-1]
            raise ValueError(
                f"a training batch of one {padded_size[0]}x{padded_size[1]} image gives a 1x1 feature map at stride "
                f"{stride}, and the transformer neck's BatchNorm cannot take statistics of one value per channel. "
                f"Train with 2 or more images per batch, or with images larger than {stride} px on a side."
            )

    def check_gt_classes(self, labels: np.ndarray) -> None:
        """Every gt class id of the batch in [0, num_classes), checked on the host copies (the mapper's tensors)."""
        fix = "set model.num_classes to the dataset's number of categories"
        check_class_ids(labels, self.num_classes, "gt_classes", fix)

    def prepare_targets(self, batched_inputs: list[dict[str, Any]], images: ImageList) -> list[dict[str, Tensor]]:
        """gt boxes -> cxcywh normalized by each unpadded image size; also keeps the absolute xyxy boxes.

        Built once for the batch from the host copies (the mapper's tensors): the class check and the normalisation
        run in numpy, then labels, boxes and xyxy boxes reach the device as three tensors, split per image.
        """
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("SalienceDETR in training mode needs 'instances' in every input dict.")
        instances = [x["instances"] for x in batched_inputs]
        counts = [len(i) for i in instances]
        labels = torch.cat([i.gt_classes for i in instances]).cpu().long()
        boxes_xyxy = torch.cat([i.gt_boxes.tensor for i in instances]).cpu().float()
        self.check_gt_classes(labels.numpy())
        corners = boxes_xyxy.numpy()
        whwh = np.array([[w, h, w, h] for h, w in images.image_sizes], dtype=np.float32)
        low, high = corners[:, :2], corners[:, 2:]
        boxes = np.concatenate([(low + high) / 2, high - low], axis=1) / np.repeat(whwh, counts, axis=0)
        flat = (labels, torch.from_numpy(boxes), boxes_xyxy)
        labels, boxes, boxes_xyxy = (tensor.to(self.device).split(counts) for tensor in flat)
        return [{"labels": c, "boxes": b, "boxes_xyxy": x} for c, b, x in zip(labels, boxes, boxes_xyxy)]

    def forward(self, batched_inputs: list[dict[str, Any]]):
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        features = self.neck([features[name] for name in self.in_features])
        padded_size = tuple(images.tensor.shape[-2:])
        shapes = [tuple(f.shape[-2:]) for f in features]
        # masks and token budgets from the host sizes; an export trace (traced sizes) computes them on the device
        if torch.jit.is_tracing():
            level_masks, valid_counts = level_masks_for(padding_mask(images), features), None
        else:
            host_masks = host_level_masks(images.image_sizes, padded_size, shapes)
            level_masks = [torch.from_numpy(m).to(self.device) for m in host_masks]
            valid_counts = unpadded_counts(host_masks)
        position_embeddings = self.position_embedding.flat(level_masks).to(features[0].dtype)  # every level at once
        if not self.training:
            output = self.transformer(features, level_masks, position_embeddings, valid_counts=valid_counts)
            if self.roi_refine is not None:
                roi_inputs = RoIInputs(output.query_features, features, images.image_sizes, padded_size)
                output = self.roi_refine.refine_output(output, roi_inputs)
            return self.inference(output, batched_inputs, images.image_sizes)

        targets = self.prepare_targets(batched_inputs, images)
        self.check_batchnorm_statistics(features, images.tensor.shape[-2:])
        host_labels = [x["instances"].gt_classes for x in batched_inputs]  # the denoising check reads no device value
        make_denoising = functools.partial(self.denoising_generator, host_labels, [t["boxes"] for t in targets])
        output = self.transformer(features, level_masks, position_embeddings, make_denoising, valid_counts=valid_counts)
        roi_inputs = None
        if self.roi_refine is not None:
            roi_inputs = RoIInputs(output.query_features, features, images.image_sizes, padded_size)
        return self.losses(output, targets, padded_size, roi_inputs)

    def losses(
        self,
        output: TransformerOutput,
        targets: list[dict[str, Tensor]],
        padded_size: tuple[int, int],
        roi_inputs: RoIInputs | None = None,
    ):
        """Weighted loss dict: set criterion (decoder layers, encoder proposals, denoising) + salience loss
        (+ the RoI head's losses on the last layer's matching when ``roi_inputs`` is given)."""
        pred_logits = output.pred_logits
        if output.denoising.max_gt_per_image == 0:
            # keeps the denoising label embedding in the graph for DDP when no image has boxes (official no-op; with
            # boxes the label queries use it)
            pred_logits = pred_logits + self.denoising_generator.label_encoder.weight[0, 0] * 0.0
        num_denoising = output.denoising.label_query.shape[1]
        dn_outputs, outputs = split_denoising(pred_logits, output.pred_boxes, num_denoising)
        dn_outputs["denoising_groups"] = output.denoising.num_groups
        dn_outputs["max_gt_num_per_image"] = output.denoising.max_gt_per_image
        outputs["enc_outputs"] = {"pred_logits": output.enc_logits, "pred_boxes": output.enc_boxes}
        outputs["dn_outputs"] = dn_outputs
        set_targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        if roi_inputs is None:
            loss_dict = dict(self.criterion(outputs, set_targets))
        else:
            # one normaliser (in DDP one all-reduce) for the set losses and the RoI head's
            num_boxes = average_num_boxes(set_targets, pred_logits.device)
            loss_dict, indices = self.criterion(outputs, set_targets, return_indices=True, num_boxes=num_boxes)
            loss_dict = dict(loss_dict)
            loss_dict.update(
                self.roi_refine.training_losses(output, roi_inputs, set_targets, indices, self.iteration, num_boxes)
            )
        loss_dict.update(self.focus_criterion(output.salience, [t["boxes_xyxy"] for t in targets], padded_size))
        return loss_dict

    def inference(
        self, output: TransformerOutput, batched_inputs: list[dict[str, Any]], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """Top-k over queries x classes of the last decoder layer, no NMS, rescaled to the requested size.

        Described in docs/model.md#post-processing; ``postprocess_detections`` rescales as detectron2 does.
        """
        logits, boxes = output.pred_logits[-1], output.pred_boxes[-1]
        num_queries, num_classes = logits.shape[1:]
        num_select = min(self.select_box_nums_for_evaluation, num_queries * num_classes)
        scores, flat_index = logits.sigmoid().flatten(1).topk(num_select, dim=1)
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        boxes = boxes.gather(1, query_index.unsqueeze(-1).expand(-1, -1, 4))
        boxes_xyxy = to_absolute_xyxy(boxes, whwh_scale(image_sizes, boxes)[:, None])

        results = []
        for index, (x, (height, width)) in enumerate(zip(batched_inputs, image_sizes)):
            instances = Instances((height, width))
            instances.pred_boxes = Boxes(boxes_xyxy[index])
            instances.scores = scores[index]
            instances.pred_classes = labels[index]
            result = {"instances": postprocess_detections(instances, x.get("height", height), x.get("width", width))}
            if self.return_salience:
                result["salience"] = [level[index, 0] for level in output.salience]
                result["selected_indices"] = [layer[index] for layer in output.layer_indices]
                result["spatial_shapes"] = output.spatial_shapes
                result["query_index"] = output.query_index[index]
            results.append(result)
        return results
