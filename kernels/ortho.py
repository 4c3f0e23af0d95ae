"""Orthogonality penalties over each class's K prompt embeddings (LSN Eq. 7, NegPrompt Eq. 6)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from promptkit.abi import ORTHO_ABS_SUM, ORTHO_MEAN_COS

from ._common import Launch, acc_dtype, cos_tile, dot_precision, gram_tiles, launch, scalar, upcast_dot

_ABS_SUM = tl.constexpr(ORTHO_ABS_SUM)  # kernels read module globals only as constexpr


@triton.jit
def _class_tile(K, BLOCK_K: tl.constexpr):
    """(class c, first row i0) of this program: program p owns row tile p % tiles of class p // tiles."""
    tiles = tl.cdiv(K, BLOCK_K)
    return tl.program_id(0) // tiles, (tl.program_id(0) % tiles) * BLOCK_K


@triton.jit
def _ortho_fwd_kernel(yn_ptr, part_ptr, K, D, MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """part[p] = sum over pairs i < j of its class with i in row tile p of |g_ij| (mode 0) or 2 g_ij (mode 1)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    c, i0 = _class_tile(K, BLOCK_K)
    ki = i0 + tl.arange(0, BLOCK_K)
    i_mask = ki < K
    yc = yn_ptr + c.to(tl.int64) * K * D
    part = tl.zeros((BLOCK_K,), ACC)
    # Gram tiles [ki, kj] on and right of the diagonal, so each pair i < j is met once.
    for j0 in range(i0, K, BLOCK_K):
        kj = j0 + tl.arange(0, BLOCK_K)
        j_mask = kj < K
        gram = cos_tile(yc, yc, ki, kj, i_mask, j_mask, D, BLOCK_K, BLOCK_K, BLOCK_D, ACC, UPCAST, PRECISION)
        pairs = (ki[:, None] < kj[None, :]) & i_mask[:, None] & j_mask[None, :]
        term = tl.abs(gram) if MODE == _ABS_SUM else 2.0 * gram
        part += tl.sum(tl.where(pairs, term, 0.0), 1)
    tl.store(part_ptr + tl.program_id(0), tl.sum(part, 0))


@triton.jit
def _ortho_bwd_kernel(yn_ptr, coef_ptr, dyn_ptr, K, D, MODE: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dyn[c, i] = coef * sum_{j != i} w_ij yn[c, j] for the rows i of this program's tile, w_ij = sign(g_ij) (mode 0)
    or 1 (mode 1), accumulated over the column tiles j in dyn itself (a K x D row block fits no register file)."""
    ACC: tl.constexpr = dyn_ptr.dtype.element_ty
    c, i0 = _class_tile(K, BLOCK_K)
    ki = i0 + tl.arange(0, BLOCK_K)
    i_mask = ki < K
    yc = yn_ptr + c.to(tl.int64) * K * D
    dc = dyn_ptr + c.to(tl.int64) * K * D
    coef = tl.load(coef_ptr)
    for j0 in range(0, K, BLOCK_K):
        kj = j0 + tl.arange(0, BLOCK_K)
        j_mask = kj < K
        pairs = (ki[:, None] != kj[None, :]) & i_mask[:, None] & j_mask[None, :]
        if MODE == _ABS_SUM:
            gram = cos_tile(yc, yc, ki, kj, i_mask, j_mask, D, BLOCK_K, BLOCK_K, BLOCK_D, ACC, UPCAST, PRECISION)
            # sign as torch.sign (0 and NaN give 0); a NaN row of yn still reaches dyn through the product below
            weight = tl.where(pairs, tl.where(gram > 0, 1.0, tl.where(gram < 0, -1.0, 0.0)), 0.0)
        else:
            weight = tl.where(pairs, 1.0, 0.0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            y = tl.load(yc + kj.to(tl.int64)[:, None] * D + d[None, :], mask=j_mask[:, None] & d_mask[None, :],
                        other=0.0)
            if UPCAST:
                y = y.to(tl.float32)
            # weights of +-1 and 0 are exact in y's dtype: the product runs on y's own (tensor core) path, and the
            # small coef (2 / (C K (K-1)) for mean_cos) is applied in the accumulation dtype
            step = coef * tl.dot(weight.to(y.dtype), y, input_precision=PRECISION).to(ACC)
            out = dc + ki.to(tl.int64)[:, None] * D + d[None, :]
            out_mask = i_mask[:, None] & d_mask[None, :]
            step += tl.load(out, mask=out_mask & (j0 > 0), other=0.0)
            tl.store(out, step, mask=out_mask)
        # the next column tile reads what this one stored, possibly in other threads of the program
        tl.debug_barrier()


def ortho_launch(C: int, K: int, D: int, dtype: torch.dtype, mode: int) -> Launch:
    """The launch of ``ortho_fwd`` and ``ortho_bwd`` for yn [C, K, D] in ``dtype``: one program per row tile of a
    class, C * cdiv(K, BLOCK_K) in all."""
    bk, bd = gram_tiles(K, D, dtype)
    return Launch((C * triton.cdiv(K, bk),),
                  dict(MODE=mode, BLOCK_K=bk, BLOCK_D=bd, UPCAST=upcast_dot(dtype), PRECISION=dot_precision(dtype)))


def ortho_fwd(yn: torch.Tensor, mode: int) -> torch.Tensor:
    """Orthogonality penalty of unit prompt embeddings, per class over its K rows.

    mode 0 (abs_sum): ``sum_c sum_{i<j} |<yn_ci, yn_cj>|``; mode 1 (mean_cos):
    ``sum_c sum_{i!=j} <yn_ci, yn_cj> / (C K (K-1))``, 0 when K == 1.

    Args:
        yn: [C, K, D] unit-norm embeddings (fp16/bf16/fp32/fp64).
        mode: ORTHO_ABS_SUM or ORTHO_MEAN_COS.

    Returns:
        0-dim tensor in the accumulation dtype.
    """
    yn = yn.contiguous()
    C, K, D = yn.shape
    acc = acc_dtype(yn)
    if C == 0 or K < 2:
        return torch.zeros((), dtype=acc, device=yn.device)
    plan = ortho_launch(C, K, D, yn.dtype, mode)
    part = torch.empty(plan.grid[0], dtype=acc, device=yn.device)
    launch("ortho_fwd", _ortho_fwd_kernel, plan, yn, part, K, D)
    # per-tile partials summed by torch: deterministic, unlike atomics
    total = part.sum()
    return total / (C * K * (K - 1)) if mode == ORTHO_MEAN_COS else total


def ortho_bwd(yn: torch.Tensor, mode: int, grad: float) -> torch.Tensor:
    """Gradient of ortho_fwd times ``grad``.

    abs_sum: ``dyn_ci = grad * sum_{j!=i} sign(<yn_ci, yn_cj>) yn_cj`` (sign(0) = 0);
    mean_cos: ``dyn_ci = grad * 2 / (C K (K-1)) * sum_{j!=i} yn_cj``.

    Args:
        yn: [C, K, D] as given to ortho_fwd.
        mode: ORTHO_ABS_SUM or ORTHO_MEAN_COS.
        grad: upstream gradient of the scalar penalty.

    Returns:
        dyn [C, K, D] in the accumulation dtype.
    """
    yn = yn.contiguous()
    C, K, D = yn.shape
    acc = acc_dtype(yn)
    if C == 0 or K < 2:
        return torch.zeros((C, K, D), dtype=acc, device=yn.device)
    dyn = torch.empty((C, K, D), dtype=acc, device=yn.device)
    coef = float(grad) if mode == ORTHO_ABS_SUM else 2.0 * float(grad) / (C * K * (K - 1))
    launch("ortho_bwd", _ortho_bwd_kernel, ortho_launch(C, K, D, yn.dtype, mode),
           yn, scalar(coef, acc, yn.device), dyn, K, D)
    return dyn
