"""Per-segment max, min and logsumexp of scaled cosine logits, without materialising the [B, N] logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (Launch, acc_dtype, constants_on, cos_tile, dot_precision, dot_tiles, launch, nan_of,
                      online_lse_step, upcast_dot)


@triton.jit
def _segment_stats_kernel(img_ptr, txt_ptr, offsets_ptr, scales_ptr, max_ptr, min_ptr, lse_ptr, B, D, S,
                          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC: tl.constexpr = max_ptr.dtype.element_ty
    # one grid axis (S can pass axis 1's 65535): row tiles vary fastest, so neighbours share a segment's text
    row_tiles = tl.cdiv(B, BLOCK_B)
    seg = tl.program_id(0) // row_tiles
    rows = (tl.program_id(0) % row_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    scale = tl.load(scales_ptr + seg)
    run_max = tl.full((BLOCK_B,), float("-inf"), ACC)
    run_min = tl.full((BLOCK_B,), float("inf"), ACC)
    total = tl.zeros((BLOCK_B,), ACC)
    nan = tl.zeros((BLOCK_B,), ACC)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        z = scale * cos_tile(img_ptr, txt_ptr, rows, cols, row_mask, col_mask, D,
                             BLOCK_B, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
        z_hi = tl.where(col_mask[None, :], z, float("-inf"))  # padded lanes may hold inf * 0 = NaN
        nan += nan_of(z_hi, 1)
        z_lo = tl.where(col_mask[None, :], z, float("inf"))
        run_min = tl.minimum(run_min, tl.min(z_lo, 1))
        run_max, total = online_lse_step(run_max, total, z_hi)
    out = rows.to(tl.int64) * S + seg
    tl.store(max_ptr + out, run_max + nan, mask=row_mask)
    tl.store(min_ptr + out, run_min + nan, mask=row_mask)
    tl.store(lse_ptr + out, run_max + tl.log(total), mask=row_mask)


def segment_stats_launch(B: int, widest: int, D: int, S: int, dtype: torch.dtype) -> Launch:
    """The launch of ``segment_stats`` for img [B, D] in ``dtype`` and S segments of at most ``widest`` columns.

    No fused multiply-add: z = scale * cos must round as on the other backends, where the max term of the
    logsumexp is exp(0) = 1 exactly (an FMA would give exp of scale * cos's rounding error).
    """
    bb, bn, bd = dot_tiles(B, widest, D, dtype)
    return Launch((triton.cdiv(B, bb) * S,),
                  dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast_dot(dtype), PRECISION=dot_precision(dtype)),
                  dict(enable_fp_fusion=False))


def segment_stats(img: torch.Tensor, txt: torch.Tensor, seg_offsets: Sequence[int],
                  seg_scales: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max, min and logsumexp of ``z = seg_scales[s] * img @ txt[seg_offsets[s]:seg_offsets[s+1]].T`` per segment.

    One launch covers all segments; the [B, N] logits are never written.

    Args:
        img: [B, D] unit-norm image features (fp16/bf16/fp32/fp64).
        txt: [N, D] unit-norm text features, same dtype and device as ``img``.
        seg_offsets: S + 1 non-decreasing column offsets from 0 to N.
        seg_scales: S >= 1 logit scales (any sign; max and min are of the scaled logits).

    Returns:
        (max, min, lse), each [B, S] in the accumulation dtype. An empty segment gives (-inf, +inf, -inf).
    """
    img, txt = img.contiguous(), txt.contiguous()
    B, D = img.shape
    offsets, scales = [int(o) for o in seg_offsets], [float(s) for s in seg_scales]
    S = len(scales)
    acc = acc_dtype(img)
    stats = tuple(torch.empty((B, S), dtype=acc, device=img.device) for _ in range(3))
    if B == 0:
        return stats
    widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
    offsets_t = constants_on(offsets, torch.int32, img.device)
    scales_t = constants_on(scales, acc, img.device)
    launch("segment_stats", _segment_stats_kernel, segment_stats_launch(B, widest, D, S, img.dtype),
           img, txt, offsets_t, scales_t, *stats, B, D, S)
    return stats
