"""Orthogonality penalties over each class's K prompt embeddings (LSN Eq. 7, NegPrompt Eq. 6)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_float, dot_precision, gram_tiles, scalar

ORTHO_ABS_SUM = 0  # sum_c sum_{i<j} |<yn_ci, yn_cj>|
ORTHO_MEAN_COS = 1  # mean over c and i != j of <yn_ci, yn_cj>


@triton.jit
def _gram(yn_ptr, base, ks, k_mask, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
          PRECISION: tl.constexpr):
    """[BLOCK_K, BLOCK_K] Gram matrix of one class's rows (padded lanes 0)."""
    gram = tl.zeros((BLOCK_K, BLOCK_K), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = k_mask[:, None] & (d < D)[None, :]
        y = tl.load(yn_ptr + base + ks[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        gram = tl.dot(y, tl.trans(y), gram, input_precision=PRECISION)
    return gram


@triton.jit
def _ortho_fwd_kernel(yn_ptr, part_ptr, K, D, MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    c = tl.program_id(0)
    base = c.to(tl.int64) * K * D
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    gram = _gram(yn_ptr, base, ks, k_mask, K, D, BLOCK_K, BLOCK_D, ACC, PRECISION)
    if MODE == 0:
        pairs = (ks[:, None] < ks[None, :]) & k_mask[None, :]
        part = tl.sum(tl.sum(tl.where(pairs, tl.abs(gram), 0.0), 1), 0)
    else:
        pairs = (ks[:, None] != ks[None, :]) & k_mask[:, None] & k_mask[None, :]
        part = tl.sum(tl.sum(tl.where(pairs, gram, 0.0), 1), 0)
    tl.store(part_ptr + c, part)


@triton.jit
def _ortho_bwd_kernel(yn_ptr, coef_ptr, dyn_ptr, K, D, MODE: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    ACC: tl.constexpr = dyn_ptr.dtype.element_ty
    c = tl.program_id(0)
    base = c.to(tl.int64) * K * D
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    pairs = (ks[:, None] != ks[None, :]) & k_mask[:, None] & k_mask[None, :]
    coef = tl.load(coef_ptr)
    if MODE == 0:
        gram = _gram(yn_ptr, base, ks, k_mask, K, D, BLOCK_K, BLOCK_D, ACC, PRECISION)
        # sign as torch.sign (0 and NaN give 0); a NaN row of yn still reaches dyn through the product below
        sign = tl.where(gram > 0, 1.0, tl.where(gram < 0, -1.0, 0.0))
        weight = tl.where(pairs, coef * sign, 0.0)
    else:
        weight = tl.where(pairs, coef, 0.0)
    # dyn_c = weight @ yn_c, one BLOCK_D slice at a time
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = k_mask[:, None] & (d < D)[None, :]
        offs = base + ks[:, None] * D + d[None, :]
        y = tl.load(yn_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(dyn_ptr + offs, tl.dot(weight, y, input_precision=PRECISION), mask=mask)


def _check(fn: str, yn: torch.Tensor, mode: int) -> torch.Tensor:
    yn = check_float(fn, "yn", yn, 3)
    if mode not in (ORTHO_ABS_SUM, ORTHO_MEAN_COS):
        raise ValueError(f"{fn}: mode must be 0 (abs_sum) or 1 (mean_cos), got {mode}")
    return yn


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
    yn = _check("ortho_fwd", yn, mode)
    C, K, D = yn.shape
    acc = acc_dtype(yn)
    if C == 0 or K < 2:
        return torch.zeros((), dtype=acc, device=yn.device)
    part = torch.empty(C, dtype=acc, device=yn.device)
    bk, bd, warps = gram_tiles(K, D)
    _ortho_fwd_kernel[(C,)](yn, part, K, D, MODE=mode, BLOCK_K=bk, BLOCK_D=bd,
                            PRECISION=dot_precision(acc), num_warps=warps)
    # per-class partials summed by torch: deterministic, unlike atomics
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
    yn = _check("ortho_bwd", yn, mode)
    C, K, D = yn.shape
    acc = acc_dtype(yn)
    if C == 0 or K < 2:
        return torch.zeros((C, K, D), dtype=acc, device=yn.device)
    dyn = torch.empty((C, K, D), dtype=acc, device=yn.device)
    coef = float(grad) if mode == ORTHO_ABS_SUM else 2.0 * float(grad) / (C * K * (K - 1))
    bk, bd, warps = gram_tiles(K, D)
    _ortho_bwd_kernel[(C,)](yn, scalar(coef, acc, yn.device), dyn, K, D, MODE=mode, BLOCK_K=bk, BLOCK_D=bd,
                            PRECISION=dot_precision(acc), num_warps=warps)
    return dyn
