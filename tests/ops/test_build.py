"""The compiled module promptkit._C: its build report and what only the raw bindings show.

The primitives' math on every backend is in test_primitives.py, the kernel constants in test_abi.py. Here: the
CPU kernels' own vectorised exp, the argument checks the bindings keep (csrc/common/
checks.h: the invariants that protect memory when a kernel is called without the ops layer), and the raw CUDA
bindings' handling of CPU memory and of labels out of range. These tests call the bindings directly (addresses
from ``data_ptr()``).
"""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit import _C
from promptkit import abi
from promptkit.abi import XENT_DENSE, XENT_INDEX, XENT_MULTILABEL, XENT_UNIFORM

DTYPES = [torch.float32, torch.float64]
CODE = {getattr(torch, name): code for name, code in abi.DTYPE_CODES.items()}
CUDA_FUNCTIONS = ["cosine_cuda", "segment_stats_cuda", "xent_fwd_cuda", "xent_bwd_cuda", "l2norm_fwd_cuda",
                  "l2norm_bwd_cuda", "mix_cuda", "ortho_fwd_cuda", "ortho_bwd_cuda"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the raw CUDA bindings need a GPU")


def p(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).float().cuda()


# ---------------------------------------------------------------- the build


def test_module_is_the_compiled_extension():
    # An editable install keeps _C in site-packages and the Python files in the checkout, so only the module's
    # identity is checked here, not its folder.
    assert _C.__name__ == "promptkit._C"
    assert any(_C.__file__.endswith(suffix) for suffix in EXTENSION_SUFFIXES), _C.__file__


def test_build_info_is_consistent():
    info = _C.build_info()
    assert set(info) == {"version", "openmp", "openmp_threads", "cuda", "cuda_version", "cuda_archs", "compiler",
                         "why_no_cuda"}
    assert info["version"] == promptkit.__version__
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)
    assert info["openmp_threads"] >= 1
    assert info["compiler"]
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"] and info["why_no_cuda"] == ""
        assert all(hasattr(_C, name) for name in CUDA_FUNCTIONS)
    else:
        assert info["why_no_cuda"] and info["cuda_version"] == "" and info["cuda_archs"] == ""
        assert not any(hasattr(_C, name) for name in CUDA_FUNCTIONS)


def test_cuda_build_when_ci_expects_it():
    """CI has nvcc, so it sets PROMPTKIT_EXPECT_CUDA_BUILD=1 and a CPU-only build is a failure there."""
    if os.environ.get("PROMPTKIT_EXPECT_CUDA_BUILD") != "1":
        info = _C.build_info()
        assert info["cuda"] == (info["why_no_cuda"] == "")
        return
    info = _C.build_info()
    assert info["cuda"], f"expected a CUDA build: {info['why_no_cuda']}"
    archs = {arch.split("-")[0] for arch in info["cuda_archs"].split(",")}
    assert {"80", "90"} <= archs, info["cuda_archs"]


# ---------------------------------------------------------------- the CPU kernels' host math


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_matches_torch_over_its_whole_range(dtype):
    """The CPU kernels' vectorised exp, read out through xent_bwd: dense targets with all mass on column 0 and
    lse = 0, grad = scale = 1 give dcos[:, n] = exp(cos[:, n]) for n >= 1."""
    hi = 88.0 if dtype == torch.float32 else 709.0
    lo = -103.0 if dtype == torch.float32 else -745.0
    x = torch.cat([torch.linspace(lo, hi, 20001, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), float("-inf"), float("nan"), 2 * hi,
                                 2 * lo], dtype=torch.float64)]).to(dtype)
    N = x.numel() + 1
    cos = torch.cat([torch.zeros(1, dtype=dtype), x])[None]
    targets = torch.zeros(1, N, dtype=dtype)
    targets[0, 0] = 1
    zero, one = torch.zeros(1, dtype=dtype), torch.ones(1, dtype=dtype)
    dcos = torch.empty(1, N, dtype=dtype)
    _C.xent_bwd_cpu(p(cos), 1, N, 1.0, XENT_DENSE, 0, p(targets), p(zero), p(one), p(dcos), CODE[dtype])
    got, want = dcos[0, 1:].double(), torch.exp(x.double())
    want = torch.where(want > torch.finfo(dtype).max, float("inf"), want)  # overflow in dtype
    normal = (want >= torch.finfo(dtype).tiny) & torch.isfinite(want)
    rel = ((got - want) / want)[normal].abs().max().item()
    assert rel <= 4 * torch.finfo(dtype).eps, f"exp relative error {rel:.3g}"
    assert (got - want)[want < torch.finfo(dtype).tiny].abs().max() <= torch.finfo(dtype).tiny  # underflow
    torch.testing.assert_close(got[~normal], want[~normal], equal_nan=True, rtol=0, atol=torch.finfo(dtype).tiny)


# ---------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_value_error():
    # Every array stays referenced here: a temporary's address would dangle before the call.
    cos, out, dcos = torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3)
    off, short_off, falling_off = torch.tensor([0, 3]), torch.tensor([0, 2]), torch.tensor([0, 4, 3])
    sc, sc2 = torch.ones(1), torch.ones(2)
    stats, stats2 = [torch.zeros(2, 1) for _ in range(3)], [torch.zeros(2, 2) for _ in range(3)]
    labels, bad_labels = torch.tensor([0, 1]), torch.tensor([0, 3])
    cases = [
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 3, 1.0, XENT_MULTILABEL, p(labels), 0, p(out), p(out), 0, 3),
         r"labels\[1\] = 1 is outside \[0, N / group = 1\)"),
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 3, 1.0, XENT_MULTILABEL, p(labels), 0, p(out), p(out), 0, 2),
         "N = 3 is not a multiple of group = 2"),
        (lambda: _C.xent_bwd_cpu(p(cos), 2, 3, 1.0, XENT_MULTILABEL, 0, 0, p(out), p(out), p(dcos), 0, 3),
         "labels is a null pointer"),
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 3, 1.0, XENT_UNIFORM, 0, 0, p(out), p(out), 0, 0), "group must be >= 1"),
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 3, 1.0, 0, p(labels), 0, p(out), p(out), 2),
         r"dtype code 2 \(float16\) is not supported on CPU"),
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 3, 1.0, 5, 0, 0, p(out), p(out), 0), "kind must be 0"),
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 3, 1.0, 0, p(bad_labels), 0, p(out), p(out), 0),
         r"labels\[1\] = 3 is outside \[0, N = 3\)"),
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 3, 1.0, 0, 0, 0, p(out), p(out), 0), "labels is a null pointer"),
        (lambda: _C.xent_bwd_cpu(p(cos), 2, 3, 1.0, 2, 0, 0, p(out), p(out), p(dcos), 0), "targets is a null pointer"),
        (lambda: _C.xent_fwd_cpu(p(cos), 2, 0, 1.0, 1, 0, 0, p(out), p(out), 0), "N must be >= 1"),
        (lambda: _C.segment_stats_cpu(p(cos), 2, 3, p(short_off), p(sc), 1, *map(p, stats), 0), "end at N = 3"),
        (lambda: _C.segment_stats_cpu(p(cos), 2, 3, p(falling_off), p(sc2), 2, *map(p, stats2), 0),
         "must not decrease"),
        (lambda: _C.segment_stats_cpu(p(cos), 2, 3, p(off), p(sc), 1, *map(p, stats), 3), "bfloat16"),
        (lambda: _C.l2norm_fwd_cpu(p(cos), 2, 3, 0.0, p(dcos), p(out), 0), "eps must be > 0"),
        (lambda: _C.mix_cpu(p(cos), p(cos), 0, 2, 3, p(dcos), 0), "lam is a null pointer"),
        (lambda: _C.ortho_fwd_cpu(p(cos), 1, 2, 3, 2, p(out), 0), "mode must be 0"),
        (lambda: _C.ortho_bwd_cpu(p(cos), 1, 0, 3, 0, 1.0, p(dcos), 1), "K must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.skipif(not _C.build_info()["cuda"] or torch.cuda.is_available(),
                    reason="checks the error of a CUDA build on a machine without a GPU")
def test_cuda_binding_without_gpu_raises_a_clear_error():
    x, y, inv = torch.zeros(4, 8), torch.empty(4, 8), torch.empty(4)
    with pytest.raises(RuntimeError, match="l2norm_fwd_cuda"):
        _C.l2norm_fwd_cuda(p(x), 4, 8, 1e-12, p(y), p(inv), 0, 0)
    with pytest.raises(ValueError, match="dtype code 9"):
        _C.l2norm_fwd_cuda(p(x), 4, 8, 1e-12, p(y), p(inv), 9, 0)


@needs_gpu
def test_cuda_binding_rejects_cpu_memory():
    x, y, inv = torch.zeros(4, 8), torch.empty(4, 8), torch.empty(4)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        _C.l2norm_fwd_cuda(p(x), 4, 8, 1e-12, p(y), p(inv), 0, stream())


@needs_gpu
def test_cuda_xent_nan_and_bad_label_rows():
    B, N, D = 4, 9, 5
    img, txt = unit_rows(B, D, 0), unit_rows(N, D, 1)
    img[1, 2] = float("nan")
    labels = torch.tensor([0, 1, 9, 3], device="cuda")  # row 2: label out of range
    loss, lse = torch.empty(B, device="cuda"), torch.empty(B, device="cuda")
    _C.xent_fwd_cuda(p(img), p(txt), B, N, D, 10.0, XENT_INDEX, p(labels), 0, p(loss), p(lse), 0, stream())
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(lse[1]) and torch.isfinite(lse[[0, 2, 3]]).all()


@needs_gpu
def test_cuda_xent_multilabel_nan_and_bad_label_rows():
    B, N, D, group = 4, 9, 5, 3
    img, txt = unit_rows(B, D, 0), unit_rows(N, D, 1)
    img[1, 2] = float("nan")
    labels = torch.tensor([0, 1, 3, 2], device="cuda")  # row 2: label outside [0, N / group)
    loss, lse = torch.empty(B, device="cuda"), torch.empty(B, device="cuda")
    _C.xent_fwd_cuda(p(img), p(txt), B, N, D, 10.0, XENT_MULTILABEL, p(labels), 0, p(loss), p(lse), 0, stream(),
                     group)
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.equal(lse, torch.zeros_like(lse))
    dcos, grad_loss = torch.empty(B, N, device="cuda"), torch.ones(B, device="cuda")
    _C.xent_bwd_cuda(p(img), p(txt), B, N, D, 10.0, XENT_MULTILABEL, p(labels), 0, p(lse), p(grad_loss), p(dcos),
                     0, stream(), group)
    assert torch.isnan(dcos[[1, 2]]).all() and torch.isfinite(dcos[[0, 3]]).all()
    with pytest.raises(ValueError, match="N = 9 is not a multiple of group = 2"):
        _C.xent_fwd_cuda(p(img), p(txt), B, N, D, 10.0, XENT_MULTILABEL, p(labels), 0, p(loss), p(lse), 0, stream(),
                         2)
