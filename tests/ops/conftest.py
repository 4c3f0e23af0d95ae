"""Backends under test and the accuracy rule every kernel test uses.

Tolerance policy (one rule for all approximate math, GPU kernels, TF32 and tensor-core products included): a
kernel's error against the fp64 oracle may be at most twice eager torch's own error in the same dtype on the same
inputs, plus a per-dtype floor (``FLOOR``) scaled by the result's magnitude, for results torch computes exactly.
This is flash-attention's rule: it follows each op's conditioning instead of a hand-tuned tolerance per test.
``assert_matches_reference`` implements it (``assert_matches_formula`` applies it to a formula evaluated by torch);
a test that checks a precision contract rather than approximate math (a gradient that must stay fp32, an identity
that must hold exactly) says so and states its own bound.
"""

from __future__ import annotations

import os

import pytest
import torch

# The ops' opcheck on CUDA needs a GPU; elsewhere it is not collected (the header says so).
collect_ignore = [] if torch.cuda.is_available() else ["test_gpu_ops.py"]

# Compiled backends tested on each device. The cpp and triton (interpreted) backends must be usable on the CPU:
# a missing promptkit._C or triton makes these tests fail, not skip. CUDA runs wherever a GPU exists. With a GPU,
# Triton runs compiled and CPU tensors are not its own: triton on the CPU is then tested by a run with
# TRITON_INTERPRET=1 (benchmarks/gpu_check.sh).
CPU_BACKENDS = [("cpp", "cpu")] + ([("triton", "cpu")] if os.environ.get("TRITON_INTERPRET") == "1" else [])
GPU_BACKENDS = [("triton", "cuda"), ("cuda", "cuda")] if torch.cuda.is_available() else []
ALL_BACKENDS = CPU_BACKENDS + GPU_BACKENDS
NO_GPU = "no GPU: the triton and cuda backends on CUDA tensors need one"

# Shapes (B, C, K, D): odd sizes, singletons, and N = C * (1 + K) not a multiple of any block size.
SHAPES = [(1, 1, 1, 7), (5, 3, 2, 7), (4, 17, 1, 16), (33, 10, 3, 64)]
# The Triton interpreter costs milliseconds a program: it gets the small shapes only.
INTERPRETED_SHAPES = SHAPES[:3]

# Absolute floor of the allowed error, per dtype: covers results that torch computes exactly in that dtype.
FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def shapes_for(backend: str, device: str):
    return INTERPRETED_SHAPES if (backend, device) == ("triton", "cpu") else SHAPES


def backend_params(dtypes=(torch.float32, torch.float64)):
    """pytest params over (backend, device, dtype, shape)."""
    params = []
    for backend, device in ALL_BACKENDS:
        for dtype in dtypes:
            for shape in shapes_for(backend, device):
                params.append(pytest.param(backend, device, dtype, shape, id=f"{backend}-{device}-{str(dtype)[6:]}-{shape}"))
    return params


def primitive_params(full_cases, interpreted_cases, dtypes=(torch.float32, torch.float64),
                     interpreted_dtypes=None):
    """pytest params (backend, device, dtype, case) over every compiled backend, for the primitive tests.

    The interpreted Triton backend gets ``interpreted_cases`` (tiny: it costs milliseconds a program) in
    ``interpreted_dtypes`` (default: ``dtypes``); the others get ``full_cases``. The GPU backends are always listed
    and skipped, with the reason, where no GPU exists.
    """
    params = []
    for backend, device in CPU_BACKENDS + [("triton", "cuda"), ("cuda", "cuda")]:
        interpreted = (backend, device) == ("triton", "cpu")
        marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)] if device == "cuda" else []
        for dtype in (interpreted_dtypes or dtypes) if interpreted else dtypes:
            for case in interpreted_cases if interpreted else full_cases:
                params.append(pytest.param(backend, device, dtype, case, marks=marks,
                                           id=f"{backend}-{device}-{str(dtype)[6:]}-{case}"))
    return params


def _assert_error_within(out, same, truth, what):
    """The rule: |out - truth| <= 2 |same - truth| + FLOOR[out.dtype] * max(1, |truth|), everywhere."""
    truth = truth.double().cpu()
    kernel_error = (out.double().cpu() - truth).abs().max().item()
    torch_error = (same.double().cpu() - truth).abs().max().item()
    scale = max(1.0, truth.abs().max().item())
    allowed = 2 * torch_error + FLOOR[out.dtype] * scale
    assert kernel_error <= allowed, f"{what}: error {kernel_error:.3g} > allowed {allowed:.3g} (torch {torch_error:.3g})"


def assert_matches_reference(out, ref_same_dtype, ref_fp64, what="output"):
    """Kernel error against the fp64 oracle must be at most 2x torch's own error in the same dtype (plus a floor).

    This is the flash-attention rule: it adapts to the conditioning of each op instead of a magic tolerance.
    """
    assert out.shape == ref_fp64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    assert out.dtype == ref_same_dtype.dtype, f"{what}: dtype {out.dtype} != {ref_same_dtype.dtype}"
    _assert_error_within(out, ref_same_dtype, ref_fp64, what)


def assert_matches_formula(out, formula, *inputs, what="output"):
    """``out`` against ``formula(*inputs)`` (torch code), with the rule of ``assert_matches_reference``.

    The formula runs on the CPU in fp64 (the truth) and in ``out``'s dtype (eager torch's own error) on the same
    inputs: a kernel that reads fp16 rows and accumulates in fp32 is held to torch's fp32 error on those rows.
    """
    def run(dtype):
        return formula(*(t.cpu().to(dtype) if t.is_floating_point() else t.cpu() for t in inputs))

    truth = run(torch.float64)
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(truth).all(), f"{what}: the oracle itself is not finite"
    _assert_error_within(out, run(out.dtype), truth, what)


def make_inputs(shape, dtype, device, seed=0):
    """Raw (unnormalised) image [B, D], positive text [C, D], negatives [C, K, D] and labels [B]."""
    B, C, K, D = shape
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, D, generator=g, dtype=torch.float64) * 3
    pos = torch.randn(C, D, generator=g, dtype=torch.float64)
    neg = torch.randn(C, K, D, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, C, (B,), generator=g)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(image), cast(pos), cast(neg), labels.to(device)
