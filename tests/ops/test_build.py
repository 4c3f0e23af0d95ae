"""The compiled module promptkit._C: its build report and each raw CPU binding against plain torch formulas.

These tests call the bindings directly (addresses from ``data_ptr()``); the op-level tests cover the Python
wrappers. The oracle is the same formula in plain torch, in float64 and in the kernel's dtype: the kernel's error
against float64 may be at most twice torch's own error in that dtype plus a small floor.
"""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES

import pytest
import torch
import torch.nn.functional as F

import promptkit
from promptkit import _C

DTYPES = [torch.float32, torch.float64]
CODE = {torch.float32: 0, torch.float64: 1}
FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12}
XENT_INDEX, XENT_UNIFORM, XENT_DENSE, XENT_MULTILABEL = 0, 1, 2, 3
XENT_KINDS = [XENT_INDEX, XENT_UNIFORM, XENT_DENSE, XENT_MULTILABEL]
CUDA_FUNCTIONS = ["cosine_cuda", "segment_stats_cuda", "xent_fwd_cuda", "xent_bwd_cuda", "l2norm_fwd_cuda",
                  "l2norm_bwd_cuda", "mix_cuda", "ortho_fwd_cuda", "ortho_bwd_cuda"]


def p(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def check(out: torch.Tensor, formula, *inputs: torch.Tensor, what: str = "output") -> None:
    """Compare a kernel output with formula(*inputs) evaluated by torch in float64 and in out's dtype."""
    truth = formula(*(t.double() if t.is_floating_point() else t for t in inputs)).double()
    same = formula(*(t.to(out.dtype) if t.is_floating_point() else t for t in inputs)).double()
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(truth).all(), f"{what}: the oracle itself is not finite"
    error = (out.double() - truth).abs().max().item()
    allowed = 2 * (same - truth).abs().max().item() + FLOOR[out.dtype] * max(1.0, truth.abs().max().item())
    assert error <= allowed, f"{what}: error {error:.3g} > allowed {allowed:.3g}"


def rand(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


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


# ---------------------------------------------------------------- segment_stats


def segment_oracle(offsets, scales):
    def formula(cos):
        outs = [[], [], []]
        for s, scale in enumerate(scales):
            z = scale * cos[:, offsets[s]:offsets[s + 1]]
            outs[0].append(z.amax(1))
            outs[1].append(z.amin(1))
            outs[2].append(torch.logsumexp(z, 1))
        return [torch.stack(o, 1) for o in outs]
    return formula


def run_segment_stats(cos, offsets, scales):
    B, N = cos.shape
    off = torch.tensor(offsets, dtype=torch.int64)
    sc = torch.tensor(scales, dtype=cos.dtype)
    out = [torch.full((B, len(scales)), 7.0, dtype=cos.dtype) for _ in range(3)]
    _C.segment_stats_cpu(p(cos), B, N, p(off), p(sc), len(scales), *(p(o) for o in out), CODE[cos.dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,offsets,scales", [
    (3, [0, 1], [1.0]),                              # N = 1, S = 1
    (5, [0, 7], [-3.5]),                             # negative scale
    (4, [0, 3, 10, 11], [100.0, 0.5, -20.0]),        # a one-column segment, mixed signs
    (16, [0, 1000, 2500], [100.0, 25.0]),            # segments longer than a chunk; parallel rows
])
def test_segment_stats(dtype, B, offsets, scales):
    cos = rand(B, offsets[-1], dtype=dtype).clamp(-1, 1)
    out = run_segment_stats(cos, offsets, scales)
    for i, name in enumerate(["max", "min", "lse"]):
        check(out[i], lambda c: segment_oracle(offsets, scales)(c)[i], cos, what=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_stats_nan_and_infinities(dtype):
    cos = rand(3, 9, dtype=dtype)
    cos[0, 4] = float("nan")
    cos[1, :5] = float("-inf")
    cos[2, 6] = float("inf")
    mx, mn, lse = run_segment_stats(cos, [0, 5, 9], [1.0, 1.0])
    assert torch.isnan(torch.stack([mx[0, 0], mn[0, 0], lse[0, 0]])).all()   # NaN reaches every output
    assert torch.isfinite(torch.stack([mx[0, 1], mn[0, 1], lse[0, 1]])).all()  # the other segment is clean
    assert mx[1, 0] == lse[1, 0] == float("-inf")                             # all -inf segment
    assert mx[2, 1] == lse[2, 1] == float("inf")                              # one +inf entry
    ref = segment_oracle([0, 5, 9], [1.0, 1.0])(cos)
    for got, want in zip((mx, mn, lse), ref):
        torch.testing.assert_close(got, want, equal_nan=True)


# ---------------------------------------------------------------- xent


def xent_group(kind, N):
    """Columns per label group of the multilabel kind: 3 where N allows (groups then straddle the CPU chunks and
    the CUDA column tiles), else 1; the other kinds ignore it."""
    return 3 if kind == XENT_MULTILABEL and N % 3 == 0 else 1


def xent_oracle(scale, kind, labels, targets, group=1):
    def loss_and_lse(cos):
        z = scale * cos
        N = z.shape[1]
        if kind == XENT_MULTILABEL:
            # torch's multi-label soft margin; the kernel's lse output is zeros (its backward needs none)
            y = (torch.arange(N) // group == labels[:, None]).to(z.dtype)
            return F.multilabel_soft_margin_loss(z, y, reduction="none"), torch.zeros_like(z[:, 0])
        if kind == XENT_INDEX:
            w = F.one_hot(labels, N).to(z.dtype)
        elif kind == XENT_UNIFORM:
            w = torch.full_like(z, 1.0 / N)
        else:
            w = targets.to(z.dtype)
        # -sum_n w log_softmax(z)_n == a * lse - sum_n w z, in torch's well-conditioned form.
        return -(w * torch.log_softmax(z, 1)).sum(1), torch.logsumexp(z, 1)
    return loss_and_lse


def xent_case(B, N, kind, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos = rand(B, N, dtype=dtype, seed=seed).clamp(-1, 1)
    classes = N // xent_group(kind, N)
    labels = torch.randint(0, classes, (B,), generator=g) if kind in (XENT_INDEX, XENT_MULTILABEL) else None
    targets = torch.rand(B, N, generator=g, dtype=torch.float64).to(dtype) if kind == XENT_DENSE else None
    return cos, labels, targets


XENT_CASES = [(1, 1, 100.0), (5, 7, -7.5), (6, 33, 20.0), (16, 2100, 100.0)]  # 2100 > one CPU chunk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", XENT_KINDS)
@pytest.mark.parametrize("B,N,scale", XENT_CASES)
def test_xent_forward(dtype, kind, B, N, scale):
    cos, labels, targets = xent_case(B, N, kind, dtype)
    group = xent_group(kind, N)
    loss, lse = torch.empty(B, dtype=dtype), torch.empty(B, dtype=dtype)
    _C.xent_fwd_cpu(p(cos), B, N, scale, kind, p(labels), p(targets), p(loss), p(lse), CODE[dtype], group)
    oracle = xent_oracle(scale, kind, labels, targets, group)
    check(loss, lambda c: oracle(c)[0], cos, what="loss")
    check(lse, lambda c: oracle(c)[1], cos, what="lse")


@pytest.mark.parametrize("kind", [XENT_INDEX, XENT_DENSE])
def test_xent_forward_without_cancellation(kind):
    """A confident row (target column at z = 100, the rest 85..95) has lse ~ 100 and a loss ~ 0.01, so
    a * lse - sum_n w z would lose ~ulp(100) = 8e-6 to cancellation; the log-softmax form keeps ~ulp(loss)."""
    B, N = 8, 5
    cos = 0.85 + 0.1 * torch.rand(B, N, generator=torch.Generator().manual_seed(5))
    cos[:, 2] = 1.0
    labels = torch.full((B,), 2) if kind == XENT_INDEX else None
    targets = F.one_hot(torch.full((B,), 2), N).float() * 0.99 + 0.002 if kind == XENT_DENSE else None
    loss, lse = torch.empty(B), torch.empty(B)
    _C.xent_fwd_cpu(p(cos), B, N, 100.0, kind, p(labels), p(targets), p(loss), p(lse), 0)
    check(loss, lambda c: xent_oracle(100.0, kind, labels, targets)(c)[0], cos, what="loss")


@pytest.mark.parametrize("dtype", DTYPES)
def test_xent_multilabel_keeps_relative_accuracy_of_confident_rows(dtype):
    """Group columns at z = 25..35 and the rest at -35..-25: every term softplus(z) - y z is ~e^-|z|, so the loss
    ~1e-12 is kept to a few ulps only if no term is formed as softplus(z) - z (two ~30s that cancel)."""
    B, N, group, scale = 6, 12, 3, 100.0
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, N // group, (B,), generator=g)
    y = (torch.arange(N) // group == labels[:, None]).double()
    cos = ((0.25 + 0.1 * torch.rand(B, N, generator=g, dtype=torch.float64)) * (2 * y - 1)).to(dtype)
    loss, lse = torch.empty(B, dtype=dtype), torch.empty(B, dtype=dtype)
    _C.xent_fwd_cpu(p(cos), B, N, scale, XENT_MULTILABEL, p(labels), 0, p(loss), p(lse), CODE[dtype], group)
    oracle = xent_oracle(scale, XENT_MULTILABEL, labels, None, group)(cos.double())[0]
    assert oracle.max() < 1e-10
    torch.testing.assert_close(loss.double(), oracle, rtol=8 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", XENT_KINDS)
@pytest.mark.parametrize("B,N,scale", XENT_CASES)
def test_xent_backward_matches_autograd(dtype, kind, B, N, scale):
    cos, labels, targets = xent_case(B, N, kind, dtype)
    group = xent_group(kind, N)
    grad_loss = rand(B, dtype=dtype, seed=1)
    oracle = xent_oracle(scale, kind, labels, targets, group)
    lse = oracle(cos)[1].contiguous()
    dcos = torch.empty(B, N, dtype=dtype)
    _C.xent_bwd_cpu(p(cos), B, N, scale, kind, p(labels), p(targets), p(lse), p(grad_loss), p(dcos), CODE[dtype],
                    group)

    def autograd_dcos(c, g):
        c = c.detach().requires_grad_()
        (oracle(c)[0] * g).sum().backward()
        return c.grad

    check(dcos, autograd_dcos, cos, grad_loss, what="dcos")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [XENT_INDEX, XENT_UNIFORM, XENT_DENSE])
def test_xent_single_column_gradient_is_exactly_zero(dtype, kind):
    """With N = 1 the softmax is exactly 1: the backward must recompute the forward's z bit for bit."""
    B, scale = 6, -37.3
    cos, labels, targets = xent_case(B, 1, kind, dtype)
    loss, lse = torch.empty(B, dtype=dtype), torch.empty(B, dtype=dtype)
    _C.xent_fwd_cpu(p(cos), B, 1, scale, kind, p(labels), p(targets), p(loss), p(lse), CODE[dtype])
    dcos, grad_loss = torch.empty(B, 1, dtype=dtype), rand(B, dtype=dtype, seed=3)
    _C.xent_bwd_cpu(p(cos), B, 1, scale, kind, p(labels), p(targets), p(lse), p(grad_loss), p(dcos), CODE[dtype])
    assert torch.equal(dcos, torch.zeros_like(dcos))
    assert torch.equal(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", XENT_KINDS)
def test_xent_nan_row_stays_nan(dtype, kind):
    B, N, scale = 4, 9, 10.0
    cos, labels, targets = xent_case(B, N, kind, dtype)
    group = xent_group(kind, N)
    cos[2, 5] = float("nan")
    loss, lse = torch.empty(B, dtype=dtype), torch.empty(B, dtype=dtype)
    _C.xent_fwd_cpu(p(cos), B, N, scale, kind, p(labels), p(targets), p(loss), p(lse), CODE[dtype], group)
    assert torch.isnan(loss[2]) and (kind == XENT_MULTILABEL or torch.isnan(lse[2]))  # multilabel's lse is 0
    assert torch.isfinite(loss[[0, 1, 3]]).all() and torch.isfinite(lse[[0, 1, 3]]).all()
    dcos, grad_loss = torch.empty(B, N, dtype=dtype), torch.ones(B, dtype=dtype)
    _C.xent_bwd_cpu(p(cos), B, N, scale, kind, p(labels), p(targets), p(lse), p(grad_loss), p(dcos), CODE[dtype],
                    group)
    # the multilabel terms are independent per column: only the NaN column's gradient is NaN, as in autograd
    assert torch.isnan(dcos[2, 5:6] if kind == XENT_MULTILABEL else dcos[2]).all()
    assert torch.isfinite(dcos[[0, 1, 3]]).all()


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


# ---------------------------------------------------------------- l2norm, mix


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,D", [(3, 1), (5, 7), (64, 600)])
def test_l2norm_forward_and_backward(dtype, R, D):
    eps = 1e-12
    x = rand(R, D, dtype=dtype, scale=3.0)
    x[0] = 0.0     # zero row and ...
    x[1] *= 1e-14  # ... a row of norm <= 0.73 eps: both clamped, so their gradient is dy / eps
    y, inv = torch.empty(R, D, dtype=dtype), torch.empty(R, dtype=dtype)
    _C.l2norm_fwd_cpu(p(x), R, D, eps, p(y), p(inv), CODE[dtype])
    check(y, lambda t: F.normalize(t, dim=1, eps=eps), x, what="y")
    check(inv, lambda t: 1 / t.norm(dim=1).clamp_min(eps), x, what="inv_norm")

    dy = rand(R, D, dtype=dtype, seed=2)
    dx = torch.empty(R, D, dtype=dtype)
    _C.l2norm_bwd_cpu(p(dy), p(y), p(inv), R, D, eps, p(dx), CODE[dtype])

    def autograd_dx(t, g):
        t = t.detach().requires_grad_()
        (F.normalize(t, dim=1, eps=eps) * g).sum().backward()
        return t.grad

    torch.testing.assert_close(dx[:2], autograd_dx(x, dy)[:2])  # ~1e12: compared on their own
    check(dx[2:], lambda t, g: autograd_dx(t, g)[2:], x, dy, what="dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D", [(1, 1), (6, 7), (64, 600)])
def test_mix(dtype, B, D):
    a, b = rand(B, D, dtype=dtype), rand(B, D, dtype=dtype, seed=1, scale=2.0)
    lam = torch.rand(B, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    lam[0] = 1.0
    out = torch.empty(B, D, dtype=dtype)
    _C.mix_cpu(p(a), p(b), p(lam), B, D, p(out), CODE[dtype])
    check(out, lambda a, b, lam: F.normalize(lam[:, None] * a + (1 - lam[:, None]) * b, dim=1), a, b, lam)


def test_row_kernels_propagate_nan():
    x = rand(3, 5, dtype=torch.float32)
    x[1, 2] = float("nan")
    y, inv = torch.empty(3, 5), torch.empty(3)
    _C.l2norm_fwd_cpu(p(x), 3, 5, 1e-12, p(y), p(inv), 0)
    assert torch.isnan(y[1]).all() and torch.isnan(inv[1]) and torch.isfinite(y[[0, 2]]).all()
    other, lam, out = rand(3, 5, dtype=torch.float32, seed=1), torch.full((3,), 0.5), torch.empty(3, 5)
    _C.mix_cpu(p(x), p(other), p(lam), 3, 5, p(out), 0)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


# ---------------------------------------------------------------- orthogonality


def ortho_oracle(mode):
    def loss(yn):
        C, K, _ = yn.shape
        gram = yn @ yn.transpose(1, 2)
        if mode == 0:
            return torch.triu(gram, diagonal=1).abs().sum()
        off = gram.sum() - gram.diagonal(dim1=1, dim2=2).sum()
        return off / (C * K * (K - 1)) if K > 1 else off * 0
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("C,K,D", [(1, 1, 7), (3, 2, 7), (5, 3, 16), (40, 4, 300)])
def test_ortho_forward_and_backward(dtype, mode, C, K, D):
    yn = F.normalize(rand(C, K, D, dtype=torch.float64), dim=-1).to(dtype)
    loss = torch.full((), 5.0, dtype=dtype)
    _C.ortho_fwd_cpu(p(yn), C, K, D, mode, p(loss), CODE[dtype])
    check(loss, ortho_oracle(mode), yn, what="loss")

    grad = -1.7
    dyn = torch.empty(C, K, D, dtype=dtype)
    _C.ortho_bwd_cpu(p(yn), C, K, D, mode, grad, p(dyn), CODE[dtype])

    def autograd_dyn(t):
        t = t.detach().requires_grad_()
        (ortho_oracle(mode)(t) * grad).backward()
        return t.grad

    check(dyn, autograd_dyn, yn, what="dyn")


def test_ortho_abs_sum_gradient_of_orthogonal_pair_is_zero():
    """sign(0) = 0: exactly orthogonal prompts get no push from |g|."""
    yn = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    dyn = torch.full_like(yn, 9.0)
    _C.ortho_bwd_cpu(p(yn), 1, 2, 3, 0, 1.0, p(dyn), 0)
    assert torch.equal(dyn, torch.zeros_like(yn))


# ---------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_value_error():
    # Every array stays referenced here: a temporary's address would dangle before the call.
    cos, out, dcos = torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3)
    off, short_off, empty_off = torch.tensor([0, 3]), torch.tensor([0, 2]), torch.tensor([0, 0, 3])
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
        (lambda: _C.segment_stats_cpu(p(cos), 2, 3, p(empty_off), p(sc2), 2, *map(p, stats2), 0),
         "increase strictly"),
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


