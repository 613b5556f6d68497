"""Affine (block-wise) quantize / dequantize / choose-qparams custom ops: the PyTorch reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slimc.quant.qparams import FP32_EPS, qparams_from_minmax

__all__ = [
    "block_grid_shape",
    "expand_blocks",
    "resolve_block_size",
    "choose_qparams_affine",
    "quantize_affine",
    "dequantize_affine",
    "quantize_per_token",
]


# --------------------------------------------------------------------------- helpers


def resolve_block_size(shape: Sequence[int], block_size: Sequence[int]) -> list[int]:
    """Concrete block size per dim (-1 becomes the dim's size).

    Raises:
        ValueError: wrong number of entries, an entry that is not -1 or positive, or a block
            that does not divide its dim (the message names the dim).
    """
    if len(block_size) != len(shape):
        raise ValueError(
            f"block_size {list(block_size)} needs one entry per dim of a tensor of shape "
            f"{list(shape)}"
        )
    resolved = []
    for dim, (n, b) in enumerate(zip(shape, block_size, strict=False)):
        if b == -1:
            resolved.append(n)
            continue
        if b <= 0:
            raise ValueError(f"block_size[{dim}]={b} must be -1 or positive")
        if b != 1:
            if isinstance(n, int):
                if n % b != 0:
                    raise ValueError(f"block size {b} does not divide dim {dim} of size {n}")
            else:  # symbolic size under tracing: record the requirement instead
                torch._check(
                    n % b == 0, lambda d=dim, bb=b: f"block size {bb} does not divide dim {d}"
                )
        resolved.append(b)
    return resolved


def block_grid_shape(shape: Sequence[int], block_size: Sequence[int]) -> list[int]:
    """Shape of scale / zero_point for `shape` split into `block_size` blocks (keepdim style)."""
    resolved = resolve_block_size(shape, block_size)
    return [
        1 if b_in == -1 else n // b for n, b, b_in in zip(shape, resolved, block_size, strict=False)
    ]


def _interleaved(shape: Sequence[int], block_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """(x view shape [g0, b0, g1, b1, ...], grid view shape [g0, 1, g1, 1, ...])."""
    resolved = resolve_block_size(shape, block_size)
    view, grid = [], []
    for n, b, b_in in zip(shape, resolved, block_size, strict=False):
        g = 1 if b_in == -1 else n // b
        view += [g, b]
        grid += [g, 1]
    return view, grid


def _grid_param(t: Tensor, grid_view: list[int], name: str) -> Tensor:
    """Reshape a scale / zero point to the interleaved grid view, checking its element count."""
    numel = 1
    for g in grid_view:
        numel *= g
    if t.numel() != numel:
        raise ValueError(
            f"{name} has shape {list(t.shape)} ({t.numel()} elements) but the block grid has "
            f"{numel} elements ({[g for g in grid_view[::2]]})"
        )
    return t.reshape(grid_view)


def expand_blocks(t: Tensor, shape: Sequence[int], block_size: Sequence[int]) -> Tensor:
    """Broadcast a per-block tensor (scale / zero point, keepdim grid shape) to the full `shape`."""
    view, grid = _interleaved(shape, block_size)
    return _grid_param(t, grid, "tensor").expand(view).reshape(list(shape))


def _quantize_math(
    x: Tensor,
    block_size: Sequence[int],
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
) -> Tensor:
    """clamp(round(x / scale + zp), qmin, qmax) in float32, same shape as x.

    The zero point is added before rounding, as msModelSlim and compressed-tensors do: with an
    integer zero point the two orders agree except for float32 ties at half steps, and matching
    them keeps a saved checkpoint bit-exact with this reference.
    """
    view, grid = _interleaved(x.shape, block_size)
    xb = x.to(torch.float32).reshape(view)
    q = xb / _grid_param(scale, grid, "scale").to(torch.float32)
    if zero_point is not None:
        q = q + _grid_param(zero_point, grid, "zero_point").to(torch.float32)
    return torch.clamp(torch.round(q), qmin, qmax).reshape(x.shape)


def _dequantize_math(
    q: Tensor,
    block_size: Sequence[int],
    scale: Tensor,
    zero_point: Tensor | None,
) -> Tensor:
    """(q - zp) * scale in float32, same shape as q."""
    view, grid = _interleaved(q.shape, block_size)
    qb = q.to(torch.float32).reshape(view)
    if zero_point is not None:
        qb = qb - _grid_param(zero_point, grid, "zero_point").to(torch.float32)
    return (qb * _grid_param(scale, grid, "scale").to(torch.float32)).reshape(q.shape)


# --------------------------------------------------------------------------- ops


@torch.library.custom_op(
    "slimc::choose_qparams_affine",
    mutates_args=(),
    schema=(
        "(Tensor x, int[] block_size, int qmin, int qmax, bool symmetric, "
        "float eps=1.1920928955078125e-07) -> (Tensor scale, Tensor zero_point)"
    ),
)
def choose_qparams_affine(
    x: Tensor,
    block_size: list[int],
    qmin: int,
    qmax: int,
    symmetric: bool,
    eps: float = FP32_EPS,
) -> tuple[Tensor, Tensor]:
    """Per-block min/max -> (scale float32, zero_point int32), both of the block grid shape."""
    view, _ = _interleaved(x.shape, block_size)
    xb = x.detach().to(torch.float32).reshape(view)
    block_dims = tuple(range(1, len(view), 2))
    min_val = torch.amin(xb, dim=block_dims)
    max_val = torch.amax(xb, dim=block_dims)
    scale, zero_point = qparams_from_minmax(min_val, max_val, qmin, qmax, symmetric, eps)
    return scale.contiguous(), zero_point.contiguous()


@choose_qparams_affine.register_fake
def _(x, block_size, qmin, qmax, symmetric, eps=FP32_EPS):
    grid = block_grid_shape(x.shape, block_size)
    return x.new_empty(grid, dtype=torch.float32), x.new_empty(grid, dtype=torch.int32)


@torch.library.custom_op(
    "slimc::quantize_affine",
    mutates_args=(),
    schema=(
        "(Tensor x, int[] block_size, Tensor scale, Tensor? zero_point, int qmin, int qmax, "
        "ScalarType out_dtype) -> Tensor"
    ),
)
def quantize_affine(
    x: Tensor,
    block_size: list[int],
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """q = clamp(round(x / scale + zero_point), qmin, qmax) cast to out_dtype (math in float32)."""
    q = _quantize_math(x, block_size, scale, zero_point, qmin, qmax)
    return q.to(out_dtype).contiguous()


@quantize_affine.register_fake
def _(x, block_size, scale, zero_point, qmin, qmax, out_dtype):
    resolve_block_size(x.shape, block_size)
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op(
    "slimc::dequantize_affine",
    mutates_args=(),
    schema=(
        "(Tensor q, int[] block_size, Tensor scale, Tensor? zero_point, int qmin, int qmax, "
        "ScalarType out_dtype) -> Tensor"
    ),
)
def dequantize_affine(
    q: Tensor,
    block_size: list[int],
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """x = (q - zero_point) * scale in float32, cast to out_dtype (qmin/qmax are metadata only)."""
    return _dequantize_math(q, block_size, scale, zero_point).to(out_dtype).contiguous()


@dequantize_affine.register_fake
def _(q, block_size, scale, zero_point, qmin, qmax, out_dtype):
    resolve_block_size(q.shape, block_size)
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.custom_op(
    "slimc::quantize_per_token",
    mutates_args=(),
    schema="(Tensor x, int qmin=-128, int qmax=127) -> (Tensor q, Tensor scale)",
)
def quantize_per_token(x: Tensor, qmin: int = -128, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization (last dim): q int8 [..., K], scale f32 [..., 1]."""
    xf = x.detach().to(torch.float32)
    scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / float(qmax), min=FP32_EPS)
    q = torch.clamp(torch.round(xf / scale), qmin, qmax).to(torch.int8)
    return q.contiguous(), scale.contiguous()


@quantize_per_token.register_fake
def _(x, qmin=-128, qmax=127):
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty((*x.shape[:-1], 1), dtype=torch.float32),
    )
