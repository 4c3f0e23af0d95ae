"""The raw CUDA bindings of promptkit._C on a GPU, against plain torch formulas.

Collected only where a GPU exists (tests/ops/conftest.py; a build without CUDA then fails, as it should);
``pytest`` reports it in its header.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptkit import _C

from .test_build import (XENT_INDEX, XENT_KINDS, XENT_MULTILABEL, check, ortho_oracle, p, rand, segment_oracle,
                         xent_case, xent_group, xent_oracle)

# ---------------------------------------------------------------- CUDA bindings

GPU_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CUDA_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# (B, N, D): singletons, then sizes that leave partial row tiles (32), column tiles (64) and feature slices (32).
CUDA_SHAPES = [(1, 1, 1), (5, 7, 3), (70, 150, 65)]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def unit_rows(n, d, dtype, seed):
    return F.normalize(rand(n, d, dtype=torch.float64, seed=seed), dim=-1).to(dtype).cuda()


def test_cuda_binding_rejects_cpu_memory():
    x, y, inv = torch.zeros(4, 8), torch.empty(4, 8), torch.empty(4)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        _C.l2norm_fwd_cuda(p(x), 4, 8, 1e-12, p(y), p(inv), 0, stream())


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("B,N,D", CUDA_SHAPES)
def test_cuda_cosine(dtype, B, N, D):
    img, txt = unit_rows(B, D, dtype, 0), unit_rows(N, D, dtype, 1)
    out = torch.empty(B, N, dtype=acc_of(dtype), device="cuda")
    _C.cosine_cuda(p(img), p(txt), B, N, D, -3.0, p(out), CUDA_CODE[dtype], stream())
    check(out.cpu(), lambda i, t: -3.0 * i @ t.T, img.cpu(), txt.cpu())


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("B,D,offsets,scales", [
    (1, 1, [0, 1], [1.0]),
    (5, 3, [0, 7], [-3.5]),
    (70, 65, [0, 1, 64, 100, 150], [100.0, 20.0, -5.0, 1.0]),  # segments start inside column tiles
])
def test_cuda_segment_stats(dtype, B, D, offsets, scales):
    N, S = offsets[-1], len(scales)
    img, txt = unit_rows(B, D, dtype, 0), unit_rows(N, D, dtype, 1)
    acc = acc_of(dtype)
    off = torch.tensor(offsets, dtype=torch.int64, device="cuda")
    sc = torch.tensor(scales, dtype=acc, device="cuda")
    out = [torch.empty(B, S, dtype=acc, device="cuda") for _ in range(3)]
    _C.segment_stats_cuda(p(img), p(txt), B, N, D, p(off), p(sc), S, *(p(o) for o in out), CUDA_CODE[dtype],
                          stream())
    for i, name in enumerate(["max", "min", "lse"]):
        check(out[i].cpu(), lambda a, b: segment_oracle(offsets, scales)(a @ b.T)[i], img.cpu(), txt.cpu(), what=name)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind", XENT_KINDS)
@pytest.mark.parametrize("B,N,D", CUDA_SHAPES)
def test_cuda_xent_forward_and_backward(dtype, kind, B, N, D):
    scale, acc = 20.0, acc_of(dtype)
    group = xent_group(kind, N)
    img, txt = unit_rows(B, D, dtype, 0), unit_rows(N, D, dtype, 1)
    _, labels, targets = xent_case(B, N, kind, acc)
    labels = None if labels is None else labels.cuda()
    targets = None if targets is None else targets.cuda()
    loss, lse = torch.empty(B, dtype=acc, device="cuda"), torch.empty(B, dtype=acc, device="cuda")
    _C.xent_fwd_cuda(p(img), p(txt), B, N, D, scale, kind, p(labels), p(targets), p(loss), p(lse),
                     CUDA_CODE[dtype], stream(), group)
    cpu_labels = None if labels is None else labels.cpu()
    oracle = xent_oracle(scale, kind, cpu_labels, None if targets is None else targets.cpu(), group)
    check(loss.cpu(), lambda a, b: oracle(a @ b.T)[0], img.cpu(), txt.cpu(), what="loss")
    check(lse.cpu(), lambda a, b: oracle(a @ b.T)[1], img.cpu(), txt.cpu(), what="lse")

    grad_loss = rand(B, dtype=acc, seed=1).cuda()
    dcos = torch.empty(B, N, dtype=acc, device="cuda")
    _C.xent_bwd_cuda(p(img), p(txt), B, N, D, scale, kind, p(labels), p(targets), p(lse), p(grad_loss), p(dcos),
                     CUDA_CODE[dtype], stream(), group)

    def autograd_dcos(a, b, g):
        c = (a @ b.T).detach().requires_grad_()
        (oracle(c)[0] * g).sum().backward()
        return c.grad

    check(dcos.cpu(), autograd_dcos, img.cpu(), txt.cpu(), grad_loss.cpu(), what="dcos")


def test_cuda_xent_nan_and_bad_label_rows():
    B, N, D = 4, 9, 5
    img, txt = unit_rows(B, D, torch.float32, 0), unit_rows(N, D, torch.float32, 1)
    img[1, 2] = float("nan")
    labels = torch.tensor([0, 1, 9, 3], device="cuda")  # row 2: label out of range
    loss, lse = torch.empty(B, device="cuda"), torch.empty(B, device="cuda")
    _C.xent_fwd_cuda(p(img), p(txt), B, N, D, 10.0, XENT_INDEX, p(labels), 0, p(loss), p(lse), 0, stream())
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(lse[1]) and torch.isfinite(lse[[0, 2, 3]]).all()


def test_cuda_xent_multilabel_nan_and_bad_label_rows():
    B, N, D, group = 4, 9, 5, 3
    img, txt = unit_rows(B, D, torch.float32, 0), unit_rows(N, D, torch.float32, 1)
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


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("R,D", [(1, 1), (9, 7), (40, 300)])
def test_cuda_row_kernels(dtype, R, D):
    acc = acc_of(dtype)
    x = rand(R, D, dtype=dtype, scale=3.0).cuda()
    y, inv = torch.empty(R, D, dtype=acc, device="cuda"), torch.empty(R, dtype=acc, device="cuda")
    _C.l2norm_fwd_cuda(p(x), R, D, 1e-12, p(y), p(inv), CUDA_CODE[dtype], stream())
    check(y.cpu(), lambda t: F.normalize(t, dim=1, eps=1e-12), x.cpu(), what="y")
    check(inv.cpu(), lambda t: 1 / t.norm(dim=1), x.cpu(), what="inv_norm")

    unit, dy = y.to(dtype), rand(R, D, dtype=dtype, seed=2).cuda()
    dx = torch.empty(R, D, dtype=acc, device="cuda")
    _C.l2norm_bwd_cuda(p(dy), p(unit), p(inv), R, D, 1e-12, p(dx), CUDA_CODE[dtype], stream())
    check(dx.cpu(), lambda g, u, s: s[:, None] * (g - u * (g * u).sum(1, keepdim=True)), dy.cpu(), unit.cpu(),
          inv.cpu(), what="dx")

    b = rand(R, D, dtype=dtype, seed=3).cuda()
    lam = torch.rand(R, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(acc).cuda()
    out = torch.empty(R, D, dtype=acc, device="cuda")
    _C.mix_cuda(p(x), p(b), p(lam), R, D, p(out), CUDA_CODE[dtype], stream())
    check(out.cpu(), lambda a, b, lam: F.normalize(lam[:, None] * a + (1 - lam[:, None]) * b, dim=1), x.cpu(),
          b.cpu(), lam.cpu(), what="mix")


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("C,K,D", [(1, 1, 7), (3, 2, 7), (70, 3, 300)])
def test_cuda_ortho(dtype, mode, C, K, D):
    acc = acc_of(dtype)
    yn = F.normalize(rand(C, K, D, dtype=torch.float64), dim=-1).to(dtype).cuda()
    loss = torch.full((), 5.0, dtype=acc, device="cuda")
    _C.ortho_fwd_cuda(p(yn), C, K, D, mode, p(loss), CUDA_CODE[dtype], stream())
    check(loss.cpu(), ortho_oracle(mode), yn.cpu(), what="loss")
    dyn = torch.empty(C, K, D, dtype=acc, device="cuda")
    _C.ortho_bwd_cuda(p(yn), C, K, D, mode, -1.7, p(dyn), CUDA_CODE[dtype], stream())

    def autograd_dyn(t):
        t = t.detach().requires_grad_()
        (ortho_oracle(mode)(t) * -1.7).backward()
        return t.grad

    check(dyn.cpu(), autograd_dyn, yn.cpu(), what="dyn")
