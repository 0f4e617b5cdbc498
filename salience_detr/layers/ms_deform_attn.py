"""Multi-scale deformable attention (Deformable DETR), the attention of every Salience DETR layer.

Two interchangeable implementations compute the same thing:

* ``torch.ops.salience_detr.ms_deform_attn``, the compiled C++/CUDA operator from ``salience_detr._C``
  (registered with a fake kernel and an autograd formula, so ``torch.compile`` and ``opcheck`` work);
* ``multi_scale_deformable_attn_pytorch``, a pure-PyTorch reference built on ``F.grid_sample``, which
  runs everywhere (and is the ONNX export path).

The backend is chosen per call from the tensor's device and dtype; ``SALIENCE_DETR_MSDA_BACKEND`` (or the
module's ``backend`` argument) forces one.

The compiled op checks shapes, dtypes and devices only, so it never copies data to the host. The values of
``spatial_shapes`` and ``level_start_index`` are checked once per transformer forward, on the host values the
transformer builds them from (``check_level_values``, no sync); ``SALIENCE_DETR_MSDA_CHECK=1`` runs
``check_level_layout`` before every call of the op as well (for debugging direct callers). Its kernels take any
batch size with any ``im2col_step`` (the last chunk may be smaller), and no size is turned into a Python int on the
way, so ``torch.compile(dynamic=True)`` and ``torch.export`` keep the batch dynamic.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BACKEND_ENV",
    "CHECK_ENV",
    "NO_JIT_ENV",
    "MultiScaleDeformableAttention",
    "check_level_layout",
    "check_level_values",
    "compiled_backend_available",
    "extension_status",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_pytorch",
    "resolve_backend",
]

BACKEND_ENV = "SALIENCE_DETR_MSDA_BACKEND"
CHECK_ENV = "SALIENCE_DETR_MSDA_CHECK"
NO_JIT_ENV = "SALIENCE_DETR_NO_JIT"
BACKENDS = ("auto", "compiled", "pytorch")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BUILD_HINT = "build it with `pip install -e . --no-build-isolation` from the repository root"


def _cuda_include_dirs() -> list[str]:
    """The venv's nvidia/cu13 headers (cuBLAS, cuSPARSE), missing from the system CUDA toolkit here."""
    candidates = [Path(p) / "nvidia" / "cu13" / "include" for p in sys.path if p.endswith("site-packages")]
    return [str(path) for path in candidates if path.is_dir()]


def _csrc_dir() -> Path:
    """csrc/ of the source checkout: the one pip installed this package from in editable mode, else the cwd's."""
    roots = [Path.cwd()]
    try:
        record = json.loads(importlib.metadata.distribution("salience-detr").read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        record = {}
    if record.get("dir_info", {}).get("editable") and record.get("url", "").startswith("file://"):
        roots.insert(0, Path(unquote(urlparse(record["url"]).path)))
    for root in roots:
        if (root / "csrc" / "ops.cpp").is_file():
            return root / "csrc"
    raise FileNotFoundError(
        f"no C++ sources (csrc/ with ops.cpp) under {', '.join(map(str, roots))}: run from a source checkout"
    )


def _jit_build() -> ModuleType:
    """Compile csrc/ with ninja into torch's extension cache (a source checkout without a built ``_C``)."""
    from torch.utils import cpp_extension

    csrc = _csrc_dir()
    cpp_extension.verify_ninja_availability()
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    patterns = ["**/*.cpp", "**/*.cu"] if with_cuda else ["**/*.cpp"]
    sources = sorted(str(path) for pattern in patterns for path in csrc.glob(pattern))
    defines = ["-DWITH_CUDA"] if with_cuda else []
    openmp = ["-fopenmp"] if torch._C.has_openmp and sys.platform != "darwin" else []  # as setup.py: parallel_for
    return cpp_extension.load(
        name="salience_detr_jit_C",
        sources=sources,
        extra_cflags=["-O3", *defines, *openmp],
        extra_ldflags=openmp,
        extra_cuda_cflags=["-O3", *defines],
        extra_include_paths=[str(csrc), *(_cuda_include_dirs() if with_cuda else [])],
        with_cuda=with_cuda,
    )


def _load_extension() -> tuple[ModuleType | None, str]:
    """Import ``salience_detr._C`` (which registers the ops); else try one JIT build; else explain why not."""
    try:
        return importlib.import_module("salience_detr._C"), "salience_detr._C imported"
    except ImportError as error:
        import_error = f"salience_detr._C could not be imported ({error})"
    if os.environ.get(NO_JIT_ENV, "0") == "1":
        return None, f"{import_error}; JIT build disabled by {NO_JIT_ENV}=1"
    try:
        return _jit_build(), f"{import_error}; built just in time with torch.utils.cpp_extension.load"
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        return None, f"{import_error}; JIT build failed ({error})"


_C, _EXTENSION_STATUS = _load_extension()
if _C is None:
    warnings.warn(
        f"Multi-scale deformable attention falls back to the slower pure-PyTorch path: {_EXTENSION_STATUS}. "
        f"To use the compiled operator, {BUILD_HINT}.",
        stacklevel=2,
    )


def _check_one_device(value: Tensor, *others: Tensor) -> None:
    """The dispatcher sends a call with any meta tensor here, even when value is on a real device: refuse it."""
    for other in others:
        if other.device != value.device:
            raise RuntimeError(
                f"value is on {value.device} but another input is on {other.device}; move all inputs to one device"
            )


def _register_fake_kernels() -> None:
    """Shape-only kernels, so torch.compile and FakeTensor tracing see through the compiled ops."""

    @torch.library.register_fake("salience_detr::ms_deform_attn")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        _check_one_device(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        batch, _, num_heads, head_dim = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], num_heads * head_dim))

    @torch.library.register_fake("salience_detr::ms_deform_attn_backward")
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output, step):
        _check_one_device(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )


def _setup_autograd_context(ctx, inputs: tuple, output: Tensor) -> None:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.im2col_step = im2col_step


def _ms_deform_attn_backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.salience_detr.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output, ctx.im2col_step
    )
    return grad_value, None, None, grad_locations, grad_weights, None


if _C is not None:
    _register_fake_kernels()
    torch.library.register_autograd(
        "salience_detr::ms_deform_attn", _ms_deform_attn_backward, setup_context=_setup_autograd_context
    )


def extension_status() -> str:
    """Why the compiled operator is (or is not) available, for logs and collect_env."""
    return _EXTENSION_STATUS


# Read once: a plain dict is also what torch.compile can trace through when it picks the backend.
_BUILD_INFO: dict[str, object] | None = None if _C is None else dict(_C.build_info())


def extension_build_info() -> dict[str, object] | None:
    """Compiler, CUDA version and architectures the loaded extension was built with (None without one)."""
    return None if _BUILD_INFO is None else dict(_BUILD_INFO)


def extension_kernels_for(device: torch.device) -> tuple[bool, str]:
    """Whether the loaded extension was built with kernels for ``device``'s type, and if not, why (every op's check)."""
    if _C is None:
        return False, f"the compiled extension is not loaded: {_EXTENSION_STATUS}; {BUILD_HINT}"
    if device.type == "cpu":
        return True, "CPU kernels are built"
    if device.type == "cuda":
        if _BUILD_INFO["with_cuda"]:
            return True, "CUDA kernels are built"
        return False, f"salience_detr._C was built without CUDA kernels; rebuild with FORCE_CUDA=1 ({BUILD_HINT})"
    return False, f"device type {device.type!r} has no compiled kernel"


def compiled_backend_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the compiled operator can run on this device and dtype, and if not, why."""
    if _C is not None and dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {dtype} is not supported (use one of {SUPPORTED_DTYPES})"
    return extension_kernels_for(device)


def resolve_backend(device: torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """``"compiled"`` or ``"pytorch"``: ``requested`` wins over the environment, ``auto`` prefers compiled."""
    choice = (requested or os.environ.get(BACKEND_ENV) or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or {BACKEND_ENV}), got {choice!r}")
    if choice == "pytorch":
        return "pytorch"
    available, reason = compiled_backend_available(device, dtype)
    if choice == "compiled" and not available:
        raise RuntimeError(f"the compiled deformable-attention backend was forced but cannot run: {reason}")
    return "compiled" if available else "pytorch"


def _layout_error(message: str) -> ValueError:
    return ValueError(
        f"{message}; spatial_shapes must hold each level's positive (height, width) and level_start_index the "
        "exclusive cumulative sum of height * width (salience_detr.layers.levels.level_start_index builds it)"
    )


def check_level_layout(spatial_shapes: Tensor, level_start_index: Tensor, num_values: int) -> None:
    """Raise ``ValueError`` unless the levels tile the ``num_values`` values of the op's ``value`` exactly.

    Checks positive sizes, starts equal to the exclusive cumulative sum of height * width, a total equal to
    ``num_values``, and no product beyond int64. It reads the values (one host copy for CUDA tensors), which is why
    the op runs it only when asked to (the transformer checks its host values instead). Skipped while torch.compile
    or torch.export traces (the values are not known then) and for meta tensors.
    """
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {tensor.dtype}; build it with dtype=torch.long")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or level_start_index.shape != spatial_shapes.shape[:1]:
        raise ValueError(
            f"spatial_shapes must be (L, 2) and level_start_index (L,), got {tuple(spatial_shapes.shape)} and "
            f"{tuple(level_start_index.shape)}; pass one (height, width) row and one start per level"
        )
    if torch.compiler.is_compiling() or spatial_shapes.device.type == "meta":
        return
    values = torch.cat([spatial_shapes.flatten(), level_start_index.to(spatial_shapes.device)]).tolist()
    num_levels = spatial_shapes.shape[0]
    shapes = list(zip(values[0 : 2 * num_levels : 2], values[1 : 2 * num_levels : 2]))
    check_level_values(shapes, values[2 * num_levels :], num_values)


def check_level_values(shapes: Sequence[tuple[int, int]], starts: Sequence[int], num_values: int) -> None:
    """``check_level_layout`` on host values (the model builds its layout from the maps' shapes): no sync at all."""
    offset = 0
    for level, ((height, width), start) in enumerate(zip(shapes, starts, strict=True)):
        if height <= 0 or width <= 0:
            raise _layout_error(f"spatial_shapes[{level}] = ({height}, {width}) is not a positive size")
        if height * width > torch.iinfo(torch.int64).max:
            raise _layout_error(f"spatial_shapes[{level}] = ({height}, {width}): height * width overflows int64")
        if start != offset:
            raise _layout_error(f"level_start_index[{level}] = {start} but the levels before it hold {offset} values")
        offset += height * width
    if offset != num_values:
        raise _layout_error(
            f"spatial_shapes describe {offset} values (sum of height * width) but value holds {num_values} (dim 1)"
        )


def multi_scale_deformable_attn_pytorch(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Reference implementation with ``F.grid_sample`` (bilinear, zero padding, align_corners=False).

    value (B, Nv, H, Dh); spatial_shapes (L, 2) int64 as (height, width); sampling_locations
    (B, Nq, H, L, P, 2) as normalized (x, y); attention_weights (B, Nq, H, L, P). Returns (B, Nq, H * Dh).
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(height), int(width)) for height, width in spatial_shapes.tolist()]
    value_per_level = value.split([height * width for height, width in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (height, width) in enumerate(shapes):
        level_value = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def multi_scale_deformable_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int = 64,
    backend: str | None = None,
) -> Tensor:
    """Deformable attention on the chosen backend; shapes as in ``multi_scale_deformable_attn_pytorch``.

    Inputs of mixed float dtypes (half values with float32 locations under autocast) are computed in the
    wider dtype and the result is returned in ``value``'s dtype. ``im2col_step`` (images per CUDA launch) is a
    speed knob: any positive value works with any batch size.
    """
    compute_dtype = value.dtype
    if not value.dtype == sampling_locations.dtype == attention_weights.dtype:  # each promote_types is an ATen call
        compute_dtype = torch.promote_types(compute_dtype, sampling_locations.dtype)
        compute_dtype = torch.promote_types(compute_dtype, attention_weights.dtype)
    inputs = [tensor.to(compute_dtype) for tensor in (value, sampling_locations, attention_weights)]
    if not torch.compiler.is_compiling() and os.environ.get(CHECK_ENV, "0") == "1":
        check_level_layout(spatial_shapes, level_start_index, value.shape[1])
    if resolve_backend(value.device, compute_dtype, backend) == "compiled":
        output = torch.ops.salience_detr.ms_deform_attn(
            inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], im2col_step
        )
    else:
        output = multi_scale_deformable_attn_pytorch(inputs[0], spatial_shapes, inputs[1], inputs[2])
    return output.to(value.dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``num_points`` learned offsets around its reference point on every level.

    Arguments after ``embed_dim`` are keyword-only: they follow mmcv's and detrex's order, but this module once took
    ``num_levels`` before ``num_heads``, and a positional call of that era must fail rather than swap the two.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        *,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(im2col_step, int) or im2col_step < 1:
            raise ValueError(
                f"im2col_step must be a positive int (images per CUDA launch; any batch works), got {im2col_step!r}"
            )
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}); "
                "choose num_heads among the divisors of embed_dim"
            )
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.im2col_step = im2col_step
        self.backend = backend
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial offsets fan out per head in evenly spaced directions, farther for later points."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def _check_inputs(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor) -> None:
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (batch, num_queries, {self.embed_dim}), got {tuple(query.shape)}")
        if value.dim() != 3 or value.shape[-1] != self.embed_dim or value.shape[0] != query.shape[0]:
            raise ValueError(
                f"value must be (batch={query.shape[0]}, num_values, {self.embed_dim}), got {tuple(value.shape)}"
            )
        if spatial_shapes.shape != (self.num_levels, 2):
            raise ValueError(
                f"spatial_shapes must be ({self.num_levels}, 2) (height, width per level), "
                f"got {tuple(spatial_shapes.shape)}"
            )
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                "reference_points must end in 2 (x, y) or 4 (cx, cy, w, h): expected "
                f"(batch, num_queries, {self.num_levels}, 2|4), got {tuple(reference_points.shape)}"
            )
        if reference_points.shape[:3] != (query.shape[0], query.shape[1], self.num_levels):
            raise ValueError(
                f"reference_points must be ({query.shape[0]}, {query.shape[1]}, {self.num_levels}, 2|4) to match "
                f"query and num_levels, got {tuple(reference_points.shape)}"
            )

    def project_value(self, value: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """value_proj of the (B, Nv, C) values with padding zeroed: (B, Nv, heads, head_dim)."""
        batch, num_values, _ = value.shape
        # the projections run on (rows, C) matrices: one addmm each, no reshapes around every linear
        value = self.value_proj(value.reshape(-1, self.embed_dim)).view(batch, num_values, self.num_heads, -1)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask.reshape(batch, num_values, 1, 1), 0.0)
        return value

    def _sampling_locations(self, offsets: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        """Offsets are in pixels of each level (2-D refs) or in fractions of the half box size (4-D refs)."""
        batch, num_queries, num_levels, coordinates = reference_points.shape
        references = reference_points.view(batch, num_queries, 1, num_levels, 1, coordinates)  # one call
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype).view(self.num_levels, 1, 2)
            return references + offsets / normalizer
        # the half box size per point is scaled on the (B, Nq, 1, L, 1, 2) references, not on every offset
        return references[..., :2] + offsets * (references[..., 2:] * (0.5 / self.num_points))

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """query (B, Nq, C), reference_points (B, Nq, L, 2|4) normalized, value (B, Nv, C),
        spatial_shapes (L, 2) int64, level_start_index (L,) int64, key_padding_mask (B, Nv) bool with True
        on padding. Returns (B, Nq, C)."""
        self._check_inputs(query, reference_points, value, spatial_shapes)
        batch, num_queries, _ = query.shape
        value = self.project_value(value, key_padding_mask)
        rows = query.reshape(-1, self.embed_dim)
        offsets = self.sampling_offsets(rows).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(rows).view(batch, num_queries, self.num_heads, -1).softmax(-1)
        weights = weights.view(batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        locations = self._sampling_locations(offsets, reference_points, spatial_shapes)
        output = multi_scale_deformable_attn(
            value, spatial_shapes, level_start_index, locations, weights, self.im2col_step, self.backend
        )
        return self.output_proj(output.reshape(-1, self.embed_dim)).view(batch, num_queries, self.embed_dim)
