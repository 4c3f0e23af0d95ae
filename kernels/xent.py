"""Cross-entropy over scaled cosine logits with index, uniform or dense targets, and the multi-label soft margin,
fused with the cosine tiles."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from promptkit.abi import XENT_DENSE, XENT_INDEX, XENT_MULTILABEL, XENT_UNIFORM

from ._common import (Launch, acc_dtype, cos_tile, dot_precision, dot_tiles, launch, online_lse_step, scalar,
                      upcast_dot)

# The kinds as the kernels read them: module globals only as constexpr
_INDEX = tl.constexpr(XENT_INDEX)
_UNIFORM = tl.constexpr(XENT_UNIFORM)
_DENSE = tl.constexpr(XENT_DENSE)
_MULTILABEL = tl.constexpr(XENT_MULTILABEL)


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), with log1p(e) = log(u) * e / (u - 1), u = 1 + e (exact where u
    rounds to 1): no overflow, no cancellation, and no log1p needed from the backend."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x > 0, x, 0.0) + log1p


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^-x) from e^-|x|, so that neither sign overflows."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x < 0, e, 1.0) / (1.0 + e)


@triton.jit
def _xent_fwd_kernel(img_ptr, txt_ptr, scale_ptr, labels_ptr, targets_ptr, loss_ptr, lse_ptr, B, N, D, GROUP,
                     KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale = tl.load(scale_ptr)
    if KIND == _INDEX or KIND == _MULTILABEL:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    run_max = tl.full((BLOCK_B,), float("-inf"), ACC)
    total = tl.zeros((BLOCK_B,), ACC)
    # sum_n w[b, n] (z[b, n] - shift(run_max)), moved along as the running max grows (csrc/common/xent.h's
    # XentState): the loss mass * log(total) - weighted then has no cancellation between two terms ~ lse;
    # multilabel: sum_n softplus(z) - y z
    weighted = tl.zeros((BLOCK_B,), ACC)
    weight = tl.zeros((BLOCK_B,), ACC)  # sum_n w[b, n] so far
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        z = scale * cos_tile(img_ptr, txt_ptr, rows, cols, row_mask, col_mask, D,
                             BLOCK_B, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
        if KIND == _MULTILABEL:
            z = tl.where(col_mask[None, :], z, 0.0)
            # softplus(z) - y z = softplus(-z) where y = 1: no cancellation
            in_group = (cols[None, :] // GROUP) == labels[:, None]
            terms = _softplus(tl.where(in_group, -z, z))
            weighted += tl.sum(tl.where(col_mask[None, :], terms, 0.0), 1)
        else:
            old_shift = tl.where(tl.abs(run_max) < float("inf"), run_max, 0.0)
            run_max, total = online_lse_step(run_max, total, tl.where(col_mask[None, :], z, float("-inf")))
            shift = tl.where(tl.abs(run_max) < float("inf"), run_max, 0.0)
            if KIND == _INDEX:
                w = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0).to(ACC)
            elif KIND == _UNIFORM:
                w = tl.where(col_mask[None, :], 1.0 / tl.cast(N, ACC), 0.0).to(ACC)
            else:
                w_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
                w = tl.load(targets_ptr + w_offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(ACC)
            weighted = weighted + weight * (old_shift - shift) + tl.sum(w * (z - shift[:, None]), 1)
            weight += tl.sum(w, 1)
    if KIND == _MULTILABEL:
        lse = tl.zeros((BLOCK_B,), ACC)  # the multilabel backward needs no row statistic
        loss = weighted / tl.cast(N, ACC)
    else:
        lse = run_max + tl.log(total)
        # a[b]: exactly 1 for one-hot and uniform targets, the summed row of a dense one
        mass = weight if KIND == _DENSE else tl.full((BLOCK_B,), 1.0, ACC)
        loss = mass * tl.log(total) - weighted
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _xent_bwd_kernel(img_ptr, txt_ptr, scale_ptr, labels_ptr, targets_ptr, mass_ptr, lse_ptr, grad_ptr, dcos_ptr,
                     B, N, D, GROUP, KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC: tl.constexpr = dcos_ptr.dtype.element_ty
    # one grid axis (axes 1 and 2 stop at 65535): row tiles vary fastest, so neighbours share a text tile
    row_tiles = tl.cdiv(B, BLOCK_B)
    rows = (tl.program_id(0) % row_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = (tl.program_id(0) // row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    scale = tl.load(scale_ptr)
    z = scale * cos_tile(img_ptr, txt_ptr, rows, cols, row_mask, col_mask, D,
                         BLOCK_B, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if KIND == _MULTILABEL:
        # sigmoid(z) - y = s * sigmoid(s z) with s = 1 - 2 y, exact for large |z| on either side
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        sign = tl.where((cols[None, :] // GROUP) == labels[:, None], -1.0, 1.0)
        d = sign * _sigmoid(sign * z) / tl.cast(N, ACC)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        prob = tl.exp(z - lse[:, None])
        if KIND == _INDEX:
            labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
            d = prob - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        elif KIND == _UNIFORM:
            d = prob - 1.0 / tl.cast(N, ACC)
        else:
            w = tl.load(targets_ptr + offs, mask=mask, other=0.0).to(ACC)
            mass = tl.load(mass_ptr + rows, mask=row_mask, other=0.0)
            d = mass[:, None] * prob - w
    tl.store(dcos_ptr + offs, (grad * scale)[:, None] * d, mask=mask)


def _contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.contiguous() for t in tensors)


def xent_launch(B: int, N: int, D: int, dtype: torch.dtype, kind: int, backward: bool) -> Launch:
    """The launch of ``xent_fwd`` (one program a row tile) or ``xent_bwd`` (one a [row, column] tile).

    No fused multiply-add: the forward and the backward must round z = scale * cos alike (and alike the other
    backends), or exp(z - lse) drifts from 1 where the softmax is one-hot.
    """
    bb, bn, bd = dot_tiles(B, N, D, dtype)
    grid = (triton.cdiv(B, bb) * triton.cdiv(N, bn),) if backward else (triton.cdiv(B, bb),)
    # 8 warps: the forward's running row statistics (and the dense kind's target tile) fit beside the cosine tile
    # without spilling; the backward takes the same tiles and warps, so its cosines sum in the forward's order
    return Launch(grid, dict(KIND=kind, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast_dot(dtype),
                             PRECISION=dot_precision(dtype)), dict(num_warps=8, enable_fp_fusion=False))


def xent_fwd(img: torch.Tensor, txt: torch.Tensor, scale: float, kind: int, labels: torch.Tensor | None = None,
             targets: torch.Tensor | None = None, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy over ``z = scale * img @ txt.T`` without writing z.

    ``loss[b] = a[b] * lse[b] - sum_n w[b, n] z[b, n]`` with ``a[b] = sum_n w[b, n]`` and w set by ``kind``:
    0 index (``labels``), 1 uniform 1/N, 2 dense (``targets``). Kind 3 is the multi-label soft margin
    ``loss[b] = (1/N) sum_n softplus(z[b, n]) - y[b, n] z[b, n]`` with ``y[b, n] = 1`` iff
    ``n // group == labels[b]``.

    Args:
        img: [B, D] unit-norm image features (fp16/bf16/fp32/fp64).
        txt: [N, D] unit-norm text features, same dtype and device, N >= 1.
        scale: logit scale.
        kind: XENT_INDEX, XENT_UNIFORM, XENT_DENSE or XENT_MULTILABEL.
        labels: [B] int64 class indices, in [0, N) for kind 0 and in [0, N // group) for kind 3, else None.
        targets: [B, N] float weights for kind 2, else None.
        group: columns per label group for kind 3 (N must be a multiple); ignored by the other kinds.

    Returns:
        (loss [B], lse [B]) in the accumulation dtype; lse is what xent_bwd needs (zeros for kind 3, whose
        backward needs no row statistic).
    """
    img, txt, labels, targets = _contiguous(img, txt, labels, targets)
    (B, D), N = img.shape, txt.shape[0]
    acc = acc_dtype(img)
    loss = torch.empty(B, dtype=acc, device=img.device)
    lse = torch.empty(B, dtype=acc, device=img.device)
    if B == 0:
        return loss, lse
    launch("xent_fwd", _xent_fwd_kernel, xent_launch(B, N, D, img.dtype, kind, backward=False),
           img, txt, scalar(scale, acc, img.device), labels if labels is not None else img,
           targets if targets is not None else img, loss, lse, B, N, D, group)
    return loss, lse


def xent_bwd(img: torch.Tensor, txt: torch.Tensor, scale: float, kind: int, labels: torch.Tensor | None,
             targets: torch.Tensor | None, lse: torch.Tensor, grad_loss: torch.Tensor,
             group: int = 1) -> torch.Tensor:
    """Gradient of xent_fwd's loss with respect to the cosines, recomputing the cosine tiles.

    ``dcos[b, n] = grad_loss[b] * scale * (a[b] * exp(z[b, n] - lse[b]) - w[b, n])`` (kind 3:
    ``grad_loss[b] * scale * (sigmoid(z[b, n]) - y[b, n]) / N``); the caller turns it into feature gradients with
    two matmuls.

    Args:
        img, txt, scale, kind, labels, targets, group: as given to xent_fwd.
        lse: [B] from xent_fwd.
        grad_loss: [B] upstream gradient of the per-row loss (any strides).

    Returns:
        dcos [B, N] in the accumulation dtype.
    """
    img, txt, labels, targets = _contiguous(img, txt, labels, targets)
    lse, grad_loss = lse.contiguous(), grad_loss.contiguous()
    (B, D), N = img.shape, txt.shape[0]
    acc = acc_dtype(img)
    dcos = torch.empty((B, N), dtype=acc, device=img.device)
    if B == 0:
        return dcos
    mass = targets.to(acc).sum(1) if targets is not None else img
    launch("xent_bwd", _xent_bwd_kernel, xent_launch(B, N, D, img.dtype, kind, backward=True),
           img, txt, scalar(scale, acc, img.device), labels if labels is not None else img,
           targets if targets is not None else img, mass, lse, grad_loss, dcos, B, N, D, group)
    return dcos
