"""Shared host helpers (dtype rules, tile sizes, checks) and device helpers (cosine tiles, NaN-aware reductions)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The interpreter pays per program, not per element, so it gets one big tile; tests lower this to exercise
# the tile loops (online logsumexp across column tiles, several feature-dim chunks).
INTERPRET_MAX_TILE = 128


def interpreting() -> bool:
    """True when kernels run under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation (and output) dtype for an input dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_float(fn: str, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Validate a floating tensor argument and return it contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{fn}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    return t.contiguous()


def check_same(fn: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor,
               shape: tuple[int, ...] | None = None, same_dtype: bool = True) -> None:
    """Require ``t`` to live on ``ref``'s device, optionally with ``ref``'s dtype and a given shape."""
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise ValueError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")


def check_features(fn: str, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an (img [B,D], txt [N,D]) pair and return both contiguous."""
    img = check_float(fn, "img", img, 2)
    txt = check_float(fn, "txt", txt, 2)
    check_same(fn, "img", img, "txt", txt)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"{fn}: img is {tuple(img.shape)} and txt is {tuple(txt.shape)}: feature dims differ")
    return img, txt


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor holding ``value``: Triton passes Python floats as fp32, which would round fp64 math."""
    return torch.full((1,), float(value), dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 only when torch itself allows it for matmuls, else exact."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's half-precision tl.dot is unreliable (bf16 gives garbage): compute it in fp32 there."""
    return interpreting() and dtype in (torch.float16, torch.bfloat16)


def dot_tiles(rows: int, cols: int, depth: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Tile sizes (BLOCK_rows, BLOCK_cols, BLOCK_depth) for a tl.dot loop, powers of two >= 16 (tl.dot's minimum).

    On a GPU the tiles are sized for registers (fp64 needs twice the space).
    """
    if interpreting():
        caps = (INTERPRET_MAX_TILE,) * 3
    elif dtype == torch.float64:
        caps = (32, 32, 16)
    else:
        caps = (64, 64, 32)
    return tuple(min(cap, max(16, triton.next_power_of_2(max(n, 1)))) for n, cap in zip((rows, cols, depth), caps))


def row_tiles(rows: int, depth: int) -> tuple[int, int]:
    """Tile sizes (BLOCK_R, BLOCK_D) for row-wise kernels that loop over the feature dim."""
    cap_d, cap_r = (INTERPRET_MAX_TILE, INTERPRET_MAX_TILE) if interpreting() else (1024, 4096)
    block_d = min(cap_d, triton.next_power_of_2(max(depth, 1)))
    # about 4096 elements a tile on a GPU: whole rows up to D = 1024, several rows a program
    block_r = min(cap_r, max(1, 4096 // block_d), triton.next_power_of_2(max(rows, 1)))
    return block_r, block_d


def gram_tiles(K: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps) for per-class K x K Gram matrices: one tile holds all K rows."""
    block_k = max(16, triton.next_power_of_2(K))
    block_d = min(INTERPRET_MAX_TILE if interpreting() else 64, max(16, triton.next_power_of_2(D)))
    return block_k, block_d, 8 if block_k >= 128 else 4


@triton.jit
def cos_tile(img_ptr, txt_ptr, rows, cols, row_mask, col_mask, D,
             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_B, BLOCK_N] tile of img[rows] @ txt[cols]^T in ACC, looping over D; masked lanes are 0."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
    row_base = rows.to(tl.int64) * D
    col_base = cols.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        a = tl.load(img_ptr + row_base[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        bt = tl.load(txt_ptr + col_base[None, :] + d[:, None], mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def nan_of(x, axis: tl.constexpr):
    """0 where a slice of x has no NaN, NaN where it has one (tl.max/tl.min silently drop NaN)."""
    return tl.sum(tl.where(x == x, 0.0, x), axis)


@triton.jit
def online_lse_step(m, total, z):
    """Fold a tile z [R, C] (masked lanes -inf) into a running max m [R] and total [R] = sum exp(z - shift(m)).

    shift(m) is m, or 0 where m is infinite, so that lse = m + log(total) is -inf for all -inf rows and +inf for
    rows holding +inf instead of inf - inf = NaN. A NaN in z (which tl.max drops) reaches total through exp.
    """
    m_new = tl.maximum(m, tl.max(z, 1))
    shift = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
    total = total * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
    return m_new, total
