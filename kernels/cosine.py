"""Scaled cosine logits: scale * img @ txt^T for unit-norm rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launch, acc_dtype, cos_tile, dot_precision, dot_tiles, launch, scalar, upcast_dot


@triton.jit
def _cosine_kernel(img_ptr, txt_ptr, scale_ptr, out_ptr, B, N, D,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    # one grid axis (axes 1 and 2 stop at 65535): row tiles vary fastest, so neighbours share a text tile
    row_tiles = tl.cdiv(B, BLOCK_B)
    rows = (tl.program_id(0) % row_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = (tl.program_id(0) // row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < N
    cos = cos_tile(img_ptr, txt_ptr, rows, cols, row_mask, col_mask, D,
                   BLOCK_B, BLOCK_N, BLOCK_D, ACC, UPCAST, PRECISION)
    z = tl.load(scale_ptr) * cos
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + offs, z, mask=row_mask[:, None] & col_mask[None, :])


def cosine_launch(B: int, N: int, D: int, dtype: torch.dtype) -> Launch:
    """The launch of ``cosine`` for img [B, D] and txt [N, D] in ``dtype``."""
    bb, bn, bd = dot_tiles(B, N, D, dtype)
    return Launch((triton.cdiv(B, bb) * triton.cdiv(N, bn),),
                  dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast_dot(dtype), PRECISION=dot_precision(dtype)))


def cosine(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled cosine logits ``scale * img @ txt.T``.

    Args:
        img: [B, D] unit-norm image features (fp16/bf16/fp32/fp64).
        txt: [N, D] unit-norm text features, same dtype and device as ``img``.
        scale: logit scale (any sign).

    Returns:
        [B, N] logits in the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise).
    """
    img, txt = img.contiguous(), txt.contiguous()
    (B, D), N = img.shape, txt.shape[0]
    acc = acc_dtype(img)
    out = torch.empty((B, N), dtype=acc, device=img.device)
    if B == 0 or N == 0:
        return out
    launch("cosine", _cosine_kernel, cosine_launch(B, N, D, img.dtype),
           img, txt, scalar(scale, acc, img.device), out, B, N, D)
    return out
