"""The compiled grid NMS op (``torch.ops.salience_detr.grid_nms``) and whether it can run (docs/model.md#proposal-nms).

Two-stage query selection removes, among the top-scored tokens, every token whose box (x - 1, y - 1, x + 1, y + 1)
in its level's grid overlaps a better kept one at IoU above 0.3. On the integer grid that is exactly a kept token
in the same cell or at Manhattan distance 1 on the same level of the same image (side neighbours have IoU 1/3,
diagonal ones 1/7, farther ones 0), so the op walks the candidates in score order with a bitmap of kept cells and
returns a fixed-size keep mask: no IoU, no data-dependent size, no host read (torchvision's NMS copies its mask to
the host on CUDA). The rule equals NMS for every threshold strictly inside ``GRID_RULE_IOU_RANGE``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .ms_deform_attn import BUILD_HINT, extension_build_info, extension_kernels_for

__all__ = ["GRID_RULE_IOU_RANGE", "compiled_grid_nms", "grid_nms_available"]

# NMS suppresses a side neighbour (IoU 1/3) when the threshold is below 1/3 and a diagonal one (IoU 1/7) when it is
# below 1/7: in between it suppresses the side neighbours and the same cell only, which is the op's rule. At the
# ends themselves float rounding of the IoU decides, so the op is used strictly inside (1/7, 1/3).
GRID_RULE_IOU_RANGE = (1.0 / 7.0, 1.0 / 3.0)

_BUILD_INFO = extension_build_info()
_HAS_OP = _BUILD_INFO is not None and hasattr(torch.ops.salience_detr, "grid_nms")
if _BUILD_INFO is not None and not _HAS_OP:
    warnings.warn(
        "salience_detr._C was built before the grid_nms op was added: query selection falls back to torchvision's "
        f"NMS, which reads its result back to the host on a GPU; {BUILD_HINT}",
        stacklevel=2,
    )


def grid_nms_available(device: torch.device) -> tuple[bool, str]:
    """Whether the compiled grid NMS can run on ``device``, and if not, why."""
    if _BUILD_INFO is not None and not _HAS_OP:
        return False, f"salience_detr._C has no grid_nms op (an older build); {BUILD_HINT}"
    return extension_kernels_for(device)


def compiled_grid_nms(
    token_index: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, num_tokens: int
) -> Tensor:
    """(B, k) bool keep mask of the candidates ``token_index`` (B, k), visited in their order (best first).

    ``token_index`` holds flat token indices over all levels of the layout (``spatial_shapes`` (L, 2) as (H, W),
    ``level_start_index`` (L,)), all int64 on one device; ``num_tokens`` is the number of tokens of one image.
    """
    return torch.ops.salience_detr.grid_nms(token_index, spatial_shapes, level_start_index, num_tokens)


if _HAS_OP:

    @torch.library.register_fake("salience_detr::grid_nms")
    def _(token_index, spatial_shapes, level_start_index, num_tokens):
        for other in (spatial_shapes, level_start_index):
            if other.device != token_index.device:
                raise RuntimeError(
                    f"token_index is on {token_index.device} but another input is on {other.device}; "
                    "move all inputs to one device"
                )
        return token_index.new_empty(token_index.shape, dtype=torch.bool)
