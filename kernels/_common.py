"""Shared host helpers (dtype rules, tile sizes, launches) and device helpers (cosine tiles, NaN-aware
reductions)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# The interpreter pays per program, not per element, so it gets one big tile; tests lower this to exercise
# the tile loops (online logsumexp across column tiles, several feature-dim chunks).
INTERPRET_MAX_TILE = 128


def interpreting() -> bool:
    """True when kernels run under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation (and output) dtype for an input dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor holding ``value``: Triton passes Python floats as fp32, which would round fp64 math."""
    return torch.full((1,), float(value), dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 only when torch itself allows it for CUDA matmuls, else exact."""
    return "tf32" if dtype == torch.float32 and cuda_matmul_allows_tf32() else "ieee"


def cuda_matmul_allows_tf32() -> bool:
    """torch's switch for fp32 CUDA matmuls: ``torch.backends.cuda.matmul.fp32_precision`` ("none" defers to
    ``torch.backends.fp32_precision``); older torch only has ``get_float32_matmul_precision``, which the new API
    makes raise once both are used, so the new one is read where it exists."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:
        return torch.get_float32_matmul_precision() != "highest"
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's half-precision tl.dot is unreliable (bf16 gives garbage): compute it in fp32 there."""
    return interpreting() and dtype in (torch.float16, torch.bfloat16)


def _fma_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot on ``dtype`` runs on FMA units (fp32 at full precision) instead of tensor cores; its operand
    fragments then sit in registers, so its tiles must be smaller."""
    return dtype == torch.float32 and dot_precision(dtype) == "ieee"


def dot_tiles(rows: int, cols: int, depth: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Tile sizes (BLOCK_rows, BLOCK_cols, BLOCK_depth) for a tl.dot loop over inputs of ``dtype``, powers of two
    >= 16 (tl.dot's minimum).

    On a GPU the tiles are sized so that no kernel spills registers (tests/ops/test_gpu_compile.py): fp64 and
    full-precision fp32 get smaller ones than the tensor-core dtypes.
    """
    if interpreting():
        caps = (INTERPRET_MAX_TILE,) * 3
    elif dtype == torch.float64:
        caps = (32, 32, 16)
    elif _fma_dot(dtype):
        caps = (32, 64, 16)
    else:
        caps = (64, 64, 32)
    return tuple(min(cap, max(16, triton.next_power_of_2(max(n, 1)))) for n, cap in zip((rows, cols, depth), caps))


# Elements a row-wise program holds per tensor on a GPU: 8 a thread at 4 warps, few enough registers for rows
# whose length is no multiple of 16 (every element then has its own address).
ROW_TILE = 1024


def row_tiles(rows: int, depth: int) -> tuple[int, int]:
    """Tile sizes (BLOCK_R, BLOCK_D) for row-wise kernels that loop over the feature dim."""
    cap_d, tile = (INTERPRET_MAX_TILE, INTERPRET_MAX_TILE**2) if interpreting() else (ROW_TILE, ROW_TILE)
    block_d = min(cap_d, triton.next_power_of_2(max(depth, 1)))
    # whole rows up to D = 1024 in one chunk, several rows a program when they are shorter
    block_r = min(max(1, tile // block_d), triton.next_power_of_2(max(rows, 1)))
    return block_r, block_d


def gram_tiles(K: int, D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D) for per-class K x K Gram matrices of ``dtype`` rows, walked in BLOCK_K x BLOCK_K tiles.

    On a GPU BLOCK_K is capped so that any K fits shared memory and registers (at the default 4 warps).
    """
    if interpreting():
        cap_k = cap_d = INTERPRET_MAX_TILE
    else:
        cap_k, cap_d = 32, 16 if _fma_dot(dtype) else 32
    block_k = min(cap_k, max(16, triton.next_power_of_2(max(K, 1))))
    block_d = min(cap_d, max(16, triton.next_power_of_2(max(D, 1))))
    return block_k, block_d


# CUDA's grid limits: 2^31 - 1 blocks on axis 0, 65535 on axes 1 and 2. Every launch below uses axis 0 only.
MAX_GRID = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Launch:
    """How a kernel is launched, worked out from the problem's sizes alone (tested without a GPU).

    grid: programs per axis; constants: the kernel's ``tl.constexpr`` arguments; options: compile options
    (num_warps, enable_fp_fusion).
    """

    grid: tuple[int, ...]
    constants: dict[str, object]
    options: dict[str, object] = field(default_factory=dict)


def check_grid(fn: str, grid: tuple[int, ...]) -> None:
    """Raise a ValueError when a grid exceeds CUDA's limits (the launch would fail with an opaque error)."""
    if len(grid) > 3 or any(not 1 <= g <= limit for g, limit in zip(grid, MAX_GRID)):
        raise ValueError(f"{fn}: grid {grid} exceeds CUDA's limits {MAX_GRID[:len(grid)]}; the problem is too large "
                         "for one launch")


def device_of(t: torch.Tensor):
    """A context that makes ``t``'s GPU current: Triton launches on torch's current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def launch(fn: str, kernel, plan: Launch, *args) -> None:
    """Launch ``kernel(*args)`` with ``plan`` on the device of its first argument, a tensor (every Triton launch
    goes through here)."""
    check_grid(fn, plan.grid)
    with device_of(args[0]):
        kernel[plan.grid](*args, **plan.constants, **plan.options)


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    # Pinned memory and non_blocking: the copy is queued on the stream instead of synchronising the host.
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def constants_on(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant array (segment offsets, scales) on ``device``, built on the host once per distinct value.

    The result is shared between calls: read it, never write to it.
    """
    return _on_device(tuple(values), dtype, torch.device(device))


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
