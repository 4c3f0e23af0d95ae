"""Row-wise ops on feature matrices: L2 normalisation (forward and backward) and normalised mixup."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from promptkit.abi import MIX_EPS

from ._common import Launch, acc_dtype, launch, row_tiles, scalar


@triton.jit
def _l2norm_fwd_kernel(x_ptr, eps_ptr, y_ptr, inv_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    ACC: tl.constexpr = inv_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    base = rows.to(tl.int64)[:, None] * D
    sumsq = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + base + d[None, :], mask=row_mask[:, None] & (d < D)[None, :], other=0.0).to(ACC)
        sumsq += tl.sum(x * x, 1)
    inv = 1.0 / tl.maximum(tl.sqrt(sumsq), tl.load(eps_ptr), propagate_nan=tl.PropagateNan.ALL)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        x = tl.load(x_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(y_ptr + base + d[None, :], (x * inv[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(inv_ptr + rows, inv, mask=row_mask)


@triton.jit
def _l2norm_bwd_kernel(dy_ptr, y_ptr, inv_ptr, eps_ptr, dx_ptr, R, D, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    ACC: tl.constexpr = dx_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    base = rows.to(tl.int64)[:, None] * D
    dot = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        dy = tl.load(dy_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        dot += tl.sum(dy * y, 1)
    inv = tl.load(inv_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    # Rows whose norm the forward clamped (|x| <= eps: torch's clamp_min passes no gradient at equality either) have
    # x / eps, whose gradient is dy / eps; their inv is the forward's very 1 / eps (csrc/common/rows.h, l2_was_clamped)
    clamped = (inv >= 1.0 / tl.load(eps_ptr))[:, None]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        dy = tl.load(dy_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        dx = tl.where(clamped, dy * inv[:, None], inv[:, None] * (dy - y * dot[:, None]))
        tl.store(dx_ptr + base + d[None, :], dx, mask=mask)


@triton.jit
def _mix_kernel(a_ptr, b_ptr, lam_ptr, eps_ptr, out_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    base = rows.to(tl.int64)[:, None] * D
    lam = tl.load(lam_ptr + rows, mask=row_mask, other=0.0).to(ACC)[:, None]
    sumsq = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        a = tl.load(a_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        m = lam * a + (1.0 - lam) * b
        sumsq += tl.sum(m * m, 1)
    inv = 1.0 / tl.maximum(tl.sqrt(sumsq), tl.load(eps_ptr), propagate_nan=tl.PropagateNan.ALL)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        a = tl.load(a_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + d[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + base + d[None, :], (lam * a + (1.0 - lam) * b) * inv[:, None], mask=mask)


def rows_launch(R: int, D: int) -> Launch:
    """The launch of the row-wise kernels (l2norm_fwd, l2norm_bwd, mix) on [R, D] rows."""
    br, bd = row_tiles(R, D)
    return Launch((triton.cdiv(R, br),), dict(BLOCK_R=br, BLOCK_D=bd))


def l2norm_fwd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise L2 normalisation ``y = x / max(||x||, eps)``.

    Args:
        x: [R, D] features (fp16/bf16/fp32/fp64).
        eps: floor of the norm (> 0).

    Returns:
        (y [R, D] in x's dtype, inv_norm [R] = 1 / max(||x||, eps) in the accumulation dtype).
    """
    x = x.contiguous()
    R, D = x.shape
    acc = acc_dtype(x)
    y = torch.empty_like(x)
    inv = torch.empty(R, dtype=acc, device=x.device)
    if R == 0:
        return y, inv
    launch("l2norm_fwd", _l2norm_fwd_kernel, rows_launch(R, D), x, scalar(eps, acc, x.device), y, inv, R, D)
    return y, inv


def l2norm_bwd(dy: torch.Tensor, y: torch.Tensor, inv_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient of l2norm_fwd: ``dx = inv_norm * (dy - y * <dy, y>)`` per row, ``dx = dy / eps`` for rows whose
    norm the forward clamped at eps, |x| <= eps (told apart by inv_norm = 1 / eps, as in csrc/common/rows.h).

    Args:
        dy: [R, D] upstream gradient in any float dtype, read in the accumulation dtype (an fp32 gradient of
            fp16 rows keeps its precision); any strides, e.g. zero-stride from ``.sum().backward()``.
        y: [R, D] l2norm_fwd's output.
        inv_norm: [R] l2norm_fwd's inverse norms.
        eps: the eps given to l2norm_fwd.

    Returns:
        dx [R, D] in the accumulation dtype of y.
    """
    dy, y, inv_norm = dy.contiguous(), y.contiguous(), inv_norm.contiguous()
    R, D = y.shape
    dx = torch.empty((R, D), dtype=acc_dtype(y), device=y.device)
    if R == 0:
        return dx
    launch("l2norm_bwd", _l2norm_bwd_kernel, rows_launch(R, D), dy, y, inv_norm, scalar(eps, acc_dtype(y), y.device),
           dx, R, D)
    return dx


def mix(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Normalised mixup ``normalize(lam * a + (1 - lam) * b)`` per row (norm floored at MIX_EPS).

    Args:
        a: [B, D] features (fp16/bf16/fp32/fp64).
        b: [B, D] features, same dtype and device.
        lam: [B] mixing weights (any float dtype).

    Returns:
        [B, D] unit rows in the accumulation dtype.
    """
    a, b, lam = a.contiguous(), b.contiguous(), lam.contiguous()
    R, D = a.shape
    acc = acc_dtype(a)
    out = torch.empty((R, D), dtype=acc, device=a.device)
    if R == 0:
        return out
    launch("mix", _mix_kernel, rows_launch(R, D), a, b, lam, scalar(MIX_EPS, acc, a.device), out, R, D)
    return out
