"""RoI refinement head: the best queries look again at the image through RoIAlign crops at their boxes.

After the last decoder layer, the top-K queries (plus, in training, every query the matcher assigned to a ground
truth) crop a 7x7 RoIAlignV2 window from the neck level that fits their box size (FPN rule). A few
query-conditioned cross-attention layers read the 49 cells and predict R-CNN box deltas relative to the detached
decoder box, and optionally the IoU of the refined box for rescoring. The design is in docs/roi_refine.md.

Its box losses train on the matched queries and, with ``positive_iou`` (default 0.5), on every other refined query
whose box overlaps a ground truth that much, as R-CNN heads do: 8.6 times the examples on the trained tiny model, and
drawn from the queries it refines at inference (benchmarks/roi_refine.md measures the gain).

By default the crops are detached as well, so the head's loss trains the head alone; with the head clipped as its
own group (``train.clip_grad.separate``) the base model trains bit for bit as without the head. The head is then a
pure add-on, and switching it off at inference is the without-head arm of the ablation on the very same weights.

Laid out as detectron2's ``roi_heads``: ``layers`` (attention layer, pooler), ``sampling`` (which queries are
refined and what each trains on), ``losses`` (the box and IoU losses, their warm-up) and ``head`` (the module).
"""

from .head import RoIRefineHead
from .layers import RoIRefineLayer, level_strides
from .losses import DEFAULT_ROI_WEIGHTS, roi_box_losses, warmup_factor
from .sampling import matched_mask, positive_targets, select_queries, selected_rows
from .structures import RoIInputs, RoIRefinement

__all__ = [
    "DEFAULT_ROI_WEIGHTS",
    "RoIInputs",
    "RoIRefineHead",
    "RoIRefineLayer",
    "RoIRefinement",
    "level_strides",
    "matched_mask",
    "positive_targets",
    "roi_box_losses",
    "select_queries",
    "selected_rows",
    "warmup_factor",
]
