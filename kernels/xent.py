"""Cross-entropy over scaled cosine logits with index, uniform or dense targets, fused with the cosine tiles."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, check_features, check_float, check_same, cos_tile, dot_precision, dot_tiles,
                      online_lse_step, scalar, upcast_dot)

XENT_INDEX = 0  # w[b, n] = 1 if n == labels[b]
XENT_UNIFORM = 1  # w[b, n] = 1 / N
XENT_DENSE = 2  # w = targets [B, N]


@triton.jit
def _xent_fwd_kernel(img_ptr, txt_ptr, scale_ptr, labels_ptr, targets_ptr, loss_ptr, lse_ptr, B, N, D,
                     KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    scale = tl.load(scale_ptr)
    if KIND == 0:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    run_max = tl.full((BLOCK_B,), float("-inf"), ACC)
    total = tl.zeros((BLOCK_B,), ACC)
    weighted = tl.zeros((BLOCK_B,), ACC)  # sum_n w[b, n] z[b, n]
    mass = tl.zeros((BLOCK_B,), ACC)  # a[b] = sum_n w[b, n], accumulated for dense targets only
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        z = scale * cos_tile(img_ptr, txt_ptr, rows, cols, row_mask, col_mask, D,
                             BLOCK_B, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
        run_max, total = online_lse_step(run_max, total, tl.where(col_mask[None, :], z, float("-inf")))
        z = tl.where(col_mask[None, :], z, 0.0)
        if KIND == 0:
            weighted += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        elif KIND == 1:
            weighted += tl.sum(z, 1)
        else:
            w_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            w = tl.load(targets_ptr + w_offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(ACC)
            weighted += tl.sum(w * z, 1)
            mass += tl.sum(w, 1)
    lse = run_max + tl.log(total)
    if KIND == 0:
        loss = lse - weighted
    elif KIND == 1:
        loss = lse - weighted / tl.cast(N, ACC)
    else:
        loss = mass * lse - weighted
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _xent_bwd_kernel(img_ptr, txt_ptr, scale_ptr, labels_ptr, targets_ptr, mass_ptr, lse_ptr, grad_ptr, dcos_ptr,
                     B, N, D, KIND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC: tl.constexpr = dcos_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    scale = tl.load(scale_ptr)
    z = scale * cos_tile(img_ptr, txt_ptr, rows, cols, row_mask, col_mask, D,
                         BLOCK_B, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    prob = tl.exp(z - lse[:, None])
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if KIND == 0:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        d = prob - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    elif KIND == 1:
        d = prob - 1.0 / tl.cast(N, ACC)
    else:
        w = tl.load(targets_ptr + offs, mask=mask, other=0.0).to(ACC)
        mass = tl.load(mass_ptr + rows, mask=row_mask, other=0.0)
        d = mass[:, None] * prob - w
    tl.store(dcos_ptr + offs, (grad * scale)[:, None] * d, mask=mask)


def _check_weights(fn: str, img: torch.Tensor, N: int, kind: int, labels: torch.Tensor | None,
                   targets: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate the target arguments for ``kind`` and return them contiguous."""
    B = img.shape[0]
    if kind not in (XENT_INDEX, XENT_UNIFORM, XENT_DENSE):
        raise ValueError(f"{fn}: kind must be 0 (index), 1 (uniform) or 2 (dense), got {kind}")
    if N == 0:
        raise ValueError(f"{fn}: txt has no rows: cross-entropy needs at least one class")
    if (labels is not None) != (kind == XENT_INDEX) or (targets is not None) != (kind == XENT_DENSE):
        wanted = ("labels", "neither labels nor targets", "targets")[kind]
        given = [name for name, t in (("labels", labels), ("targets", targets)) if t is not None]
        raise ValueError(f"{fn}: kind {kind} takes {wanted}, got {' and '.join(given) or 'neither'}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{fn}: labels must be an int64 or int32 tensor")
        check_same(fn, "img", img, "labels", labels, shape=(B,), same_dtype=False)
        if B and bool(((labels < 0) | (labels >= N)).any()):
            lo, hi = int(labels.min()), int(labels.max())
            raise ValueError(f"{fn}: labels must lie in [0, {N}), got values in [{lo}, {hi}]")
        labels = labels.contiguous()
    if targets is not None:
        targets = check_float(fn, "targets", targets, 2)
        check_same(fn, "img", img, "targets", targets, shape=(B, N), same_dtype=False)
    return labels, targets


def xent_fwd(img: torch.Tensor, txt: torch.Tensor, scale: float, kind: int, labels: torch.Tensor | None = None,
             targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy over ``z = scale * img @ txt.T`` without writing z.

    ``loss[b] = a[b] * lse[b] - sum_n w[b, n] z[b, n]`` with ``a[b] = sum_n w[b, n]`` and w set by ``kind``:
    0 index (``labels``), 1 uniform 1/N, 2 dense (``targets``).

    Args:
        img: [B, D] unit-norm image features (fp16/bf16/fp32/fp64).
        txt: [N, D] unit-norm text features, same dtype and device, N >= 1.
        scale: logit scale.
        kind: XENT_INDEX, XENT_UNIFORM or XENT_DENSE.
        labels: [B] int64 class indices in [0, N) for kind 0, else None.
        targets: [B, N] float weights for kind 2, else None.

    Returns:
        (loss [B], lse [B]) in the accumulation dtype; lse is what xent_bwd needs.
    """
    img, txt = check_features("xent_fwd", img, txt)
    (B, D), N = img.shape, txt.shape[0]
    labels, targets = _check_weights("xent_fwd", img, N, kind, labels, targets)
    acc = acc_dtype(img)
    loss = torch.empty(B, dtype=acc, device=img.device)
    lse = torch.empty(B, dtype=acc, device=img.device)
    if B == 0:
        return loss, lse
    bb, bn, bd = dot_tiles(B, N, D, acc)
    _xent_fwd_kernel[(triton.cdiv(B, bb),)](img, txt, scalar(scale, acc, img.device),
                                            labels if labels is not None else img,
                                            targets if targets is not None else img,
                                            loss, lse, B, N, D, KIND=kind, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd,
                                            UPCAST=upcast_dot(img.dtype), PRECISION=dot_precision(img.dtype))
    return loss, lse


def xent_bwd(img: torch.Tensor, txt: torch.Tensor, scale: float, kind: int, labels: torch.Tensor | None,
             targets: torch.Tensor | None, lse: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """Gradient of xent_fwd's loss with respect to the cosines, recomputing the cosine tiles.

    ``dcos[b, n] = grad_loss[b] * scale * (a[b] * exp(z[b, n] - lse[b]) - w[b, n])``; the caller turns it into
    feature gradients with two matmuls.

    Args:
        img, txt, scale, kind, labels, targets: as given to xent_fwd.
        lse: [B] from xent_fwd.
        grad_loss: [B] upstream gradient of the per-row loss (any strides).

    Returns:
        dcos [B, N] in the accumulation dtype.
    """
    img, txt = check_features("xent_bwd", img, txt)
    (B, D), N = img.shape, txt.shape[0]
    labels, targets = _check_weights("xent_bwd", img, N, kind, labels, targets)
    lse = check_float("xent_bwd", "lse", lse, 1)
    grad_loss = check_float("xent_bwd", "grad_loss", grad_loss, 1)
    check_same("xent_bwd", "img", img, "lse", lse, shape=(B,), same_dtype=False)
    check_same("xent_bwd", "img", img, "grad_loss", grad_loss, shape=(B,), same_dtype=False)
    acc = acc_dtype(img)
    dcos = torch.empty((B, N), dtype=acc, device=img.device)
    if B == 0:
        return dcos
    mass = targets.to(acc).sum(1) if targets is not None else img
    bb, bn, bd = dot_tiles(B, N, D, acc)
    _xent_bwd_kernel[(triton.cdiv(B, bb), triton.cdiv(N, bn))](
        img, txt, scalar(scale, acc, img.device), labels if labels is not None else img,
        targets if targets is not None else img, mass, lse, grad_loss, dcos, B, N, D,
        KIND=kind, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd,
        UPCAST=upcast_dot(img.dtype), PRECISION=dot_precision(img.dtype))
    return dcos
