"""promptkit.kernels (Triton) against plain-torch formulas, run by the Triton interpreter on the CPU.

Every oracle below is written from the op's definition in fp64 on the same (dtype-rounded) inputs; backward
oracles come from torch autograd through those formulas. Two tilings are exercised: one tile per program, and
16-wide tiles (INTERPRET_MAX_TILE lowered) so the loops over column tiles, row tiles and feature chunks run.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton (or the kernels) is first imported

import pytest
import torch
import torch.nn.functional as F

from promptkit import kernels as K
from promptkit.kernels import _common
from promptkit.kernels.cosine import _cosine_kernel

# On a GPU machine pytest's header imports promptkit.kernels before this module runs, with the JIT: these CPU
# tests then need a run of their own with TRITON_INTERPRET=1 set from the start (benchmarks/gpu_check.sh does it).
pytestmark = pytest.mark.skipif(type(_cosine_kernel).__name__ != "InterpretedFunction",
                                reason="promptkit.kernels was imported with Triton's JIT (a GPU machine): run this "
                                       "file alone with TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
NAN = float("nan")


@pytest.fixture(params=["one_tile", "many_tiles"])
def shape(request, monkeypatch):
    """(B, N, D): one tile under the default tiling, or several 16-wide tiles along every dim."""
    if request.param == "one_tile":
        return 5, 11, 9
    monkeypatch.setattr(_common, "INTERPRET_MAX_TILE", 16)
    assert _common.dot_tiles(19, 37, 35, torch.float32) == (16, 16, 16)  # 2 row tiles, 3 column tiles, 3 chunks
    return 19, 37, 35


def unit(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """The output has the accumulation dtype and matches the fp64 oracle to that dtype's precision, relative to
    the largest magnitude in the tensor (rounding error scales with the logits, not with each entry)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert actual.dtype == acc
    expected = expected.double()
    magnitude = max(1.0, expected[expected.isfinite()].abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=TOL[acc], atol=TOL[acc] * magnitude)


def xent_weights(kind: int, B: int, N: int, dtype: torch.dtype, seed: int = 7):
    """(labels, targets, w [B, N] fp64) for an xent kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == K.XENT_INDEX:
        labels = torch.randint(0, N, (B,), generator=g)
        return labels, None, F.one_hot(labels, N).double()
    if kind == K.XENT_UNIFORM:
        return None, None, torch.full((B, N), 1.0 / N, dtype=torch.float64)
    targets = torch.rand(B, N, generator=g, dtype=torch.float64).to(dtype)
    targets[0] = 0  # a row with no target mass: loss 0, gradient 0
    return None, targets, targets.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [14.3, -2.5])
def test_cosine(shape, dtype, scale):
    B, N, D = shape
    img, txt = unit(B, D, dtype=dtype, seed=0), unit(N, D, dtype=dtype, seed=1)
    close(K.cosine(img, txt, scale), scale * img.double() @ txt.double().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segments", ["one", "three"])
def test_segment_stats(shape, dtype, segments):
    B, N, D = shape
    img, txt = unit(B, D, dtype=dtype, seed=2), unit(N, D, dtype=dtype, seed=3)
    offsets, scales = ([0, N], [1 / 0.07]) if segments == "one" else ([0, 4, N - 3, N], [10.0, -3.5, 2.0])
    mx, mn, lse = K.segment_stats(img, txt, offsets, scales)
    cos = img.double() @ txt.double().T
    for s, scale in enumerate(scales):
        z = scale * cos[:, offsets[s]:offsets[s + 1]]
        close(mx[:, s], z.amax(1), dtype)
        close(mn[:, s], z.amin(1), dtype)
        close(lse[:, s], torch.logsumexp(z, 1), dtype)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # numpy's log(0) = -inf
def test_segment_stats_empty_segment():
    img, txt = unit(3, 5, dtype=torch.float32, seed=4), unit(6, 5, dtype=torch.float32, seed=5)
    mx, mn, lse = K.segment_stats(img, txt, [0, 2, 2, 6], [1.0, 1.0, 1.0])
    assert torch.all(mx[:, 1] == -torch.inf) and torch.all(mn[:, 1] == torch.inf) and torch.all(lse[:, 1] == -torch.inf)
    close(lse[:, 2], torch.logsumexp(img.double() @ txt.double()[2:].T, 1), torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # numpy's inf * 0
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_segment_stats_infinite_logits_follow_logsumexp():
    img = torch.tensor([[torch.inf, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]])  # positive entries: row 0's cosines are all +inf
    z = img.double() @ txt.double().T
    for scale in (2.0, -2.0):  # all +inf (lse +inf) and all -inf (lse -inf), not inf - inf = NaN
        stats = K.segment_stats(img, txt, [0, 3], [scale])
        for stat, ref in zip(stats, ((scale * z).amax(1), (scale * z).amin(1), torch.logsumexp(scale * z, 1))):
            assert stat[0, 0] == ref[0] == scale * torch.inf
            close(stat[1], ref[1:], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [K.XENT_INDEX, K.XENT_UNIFORM, K.XENT_DENSE])
def test_xent(shape, dtype, kind):
    B, N, D = shape
    scale = -3.0 if kind == K.XENT_UNIFORM else 1 / 0.07
    img, txt = unit(B, D, dtype=dtype, seed=6), unit(N, D, dtype=dtype, seed=7)
    labels, targets, w = xent_weights(kind, B, N, dtype)
    loss, lse = K.xent_fwd(img, txt, scale, kind, labels, targets)

    cos = (img.double() @ txt.double().T).requires_grad_()
    z = scale * cos
    ref_lse = torch.logsumexp(z, 1)
    ref_loss = w.sum(1) * ref_lse - (w * z).sum(1)
    close(loss, ref_loss.detach(), dtype)
    close(lse, ref_lse.detach(), dtype)

    grad_loss = torch.linspace(-1.0, 2.0, B, dtype=dtype)
    ref_loss.backward(grad_loss.double())
    close(K.xent_bwd(img, txt, scale, kind, labels, targets, lse, grad_loss), cos.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_xent_multilabel(shape, dtype, group):
    B, N, D = shape
    N -= N % group  # 11 -> 11/9/8 and 37 -> 37/36/36 columns: groups straddle the 16-wide column tiles
    scale = 1 / 0.01  # CLIP's logit scale: |z| up to 100, where softplus(z) - z cancels unless formed stably
    img, txt = unit(B, D, dtype=dtype, seed=6), unit(N, D, dtype=dtype, seed=7)
    labels = torch.randint(0, N // group, (B,), generator=torch.Generator().manual_seed(7))
    loss, lse = K.xent_fwd(img, txt, scale, K.XENT_MULTILABEL, labels, None, group)

    cos = (img.double() @ txt.double().T).requires_grad_()
    y = (torch.arange(N) // group == labels[:, None]).double()
    ref_loss = F.multilabel_soft_margin_loss(scale * cos, y, reduction="none")
    close(loss, ref_loss.detach(), dtype)
    assert torch.equal(lse, torch.zeros_like(lse))  # no row statistic: the backward recomputes each term

    grad_loss = torch.linspace(-1.0, 2.0, B, dtype=dtype)
    ref_loss.backward(grad_loss.double())
    close(K.xent_bwd(img, txt, scale, K.XENT_MULTILABEL, labels, None, lse, grad_loss, group), cos.grad, dtype)


def test_xent_multilabel_nan_stays_in_its_row():
    img, txt = unit(4, 6, dtype=torch.float32, seed=16), unit(6, 6, dtype=torch.float32, seed=17)
    img[2, 3] = NAN
    labels = torch.tensor([0, 2, 1, 2])
    loss, lse = K.xent_fwd(img, txt, 2.0, K.XENT_MULTILABEL, labels, None, 2)
    assert loss[2].isnan() and loss[[0, 1, 3]].isfinite().all()
    dcos = K.xent_bwd(img, txt, 2.0, K.XENT_MULTILABEL, labels, None, lse, torch.ones(4), 2)
    assert dcos[2].isnan().all() and dcos[[0, 1, 3]].isfinite().all()


def test_xent_bwd_zero_stride_grad():
    img, txt = unit(4, 7, dtype=torch.float64, seed=8), unit(6, 7, dtype=torch.float64, seed=9)
    labels = torch.tensor([5, 0, 2, 2])
    _, lse = K.xent_fwd(img, txt, 5.0, K.XENT_INDEX, labels, None)
    grad_loss = torch.ones((), dtype=torch.float64).expand(4)  # what .sum().backward() hands down
    cos = (img @ txt.T).requires_grad_()
    F.cross_entropy(5.0 * cos, labels, reduction="sum").backward()
    close(K.xent_bwd(img, txt, 5.0, K.XENT_INDEX, labels, None, lse, grad_loss), cos.grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    img, txt = unit(5, 9, dtype=dtype, seed=10), unit(11, 9, dtype=dtype, seed=11)
    cos = img.double() @ txt.double().T
    close(K.cosine(img, txt, 20.0), 20.0 * cos, dtype)
    labels = torch.tensor([0, 3, 10, 7, 7])
    loss, lse = K.xent_fwd(img, txt, 20.0, K.XENT_INDEX, labels, None)
    close(loss, F.cross_entropy(20.0 * cos, labels, reduction="none"), dtype)
    y, _ = K.l2norm_fwd(img * 3, 1e-6)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.normalize(img.float() * 3, dim=1).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2norm(shape, dtype):
    R, _, D = shape
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(R, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[1] = 0  # norm below eps: y = 0 and dx = dy / eps
    dy = torch.randn(R, D, generator=g, dtype=torch.float64).to(dtype)
    eps = 1e-6
    y, inv = K.l2norm_fwd(x, eps)
    assert y.dtype == dtype
    x64 = x.double().requires_grad_()
    norm = x64.norm(dim=1, keepdim=True).clamp_min(eps)
    (x64 / norm).backward(dy.double())
    torch.testing.assert_close(y.double(), (x64 / norm).detach(), rtol=TOL[dtype], atol=TOL[dtype])
    close(inv, 1 / norm.detach().squeeze(1), dtype)
    dx = K.l2norm_bwd(dy, y, inv, eps)
    close(dx[1], x64.grad[1], dtype)  # ~dy / eps: checked apart so its size does not loosen the other rows
    keep = torch.arange(R) != 1
    close(dx[keep], x64.grad[keep], dtype)


def test_l2norm_bwd_zero_stride_grad():
    x = torch.randn(3, 4, dtype=torch.float64)
    y, inv = K.l2norm_fwd(x, 1e-12)
    x64 = x.clone().requires_grad_()
    F.normalize(x64, dim=1).sum().backward()
    close(K.l2norm_bwd(torch.ones((), dtype=torch.float64).expand(3, 4), y, inv, 1e-12), x64.grad, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mix(shape, dtype):
    B, _, D = shape
    a, b = unit(B, D, dtype=dtype, seed=13), unit(B, D, dtype=dtype, seed=14)
    lam = torch.linspace(0.0, 1.0, B, dtype=dtype)
    lam64 = lam.double()[:, None]
    close(K.mix(a, b, lam), F.normalize(lam64 * a.double() + (1 - lam64) * b.double(), dim=1), dtype)


def ortho_oracle(yn: torch.Tensor, mode: int) -> torch.Tensor:
    C, Kp, _ = yn.shape
    gram = yn @ yn.transpose(1, 2)
    if mode == K.ORTHO_ABS_SUM:
        return gram.triu(1).abs().sum()
    off_diagonal = ~torch.eye(Kp, dtype=torch.bool)
    return gram[:, off_diagonal].sum() / (C * Kp * (Kp - 1)) if Kp > 1 else yn.sum() * 0


def ortho_inputs(C: int, Kp: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """Unit [C, K, D] rows; with K >= 3, class 0 has rows 0 and 1 equal (cos 1) and row 2 orthogonal to them
    (cos exactly 0, where abs_sum's gradient uses sign(0) = 0)."""
    yn = unit(C, Kp, D, dtype=torch.float64, seed=15)
    if Kp >= 3:
        half = D // 2
        yn[0, 0, half:] = 0
        yn[0, 2, :half] = 0
        yn[0] = F.normalize(yn[0], dim=-1)
        yn[0, 1] = yn[0, 0]
    return yn.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [K.ORTHO_ABS_SUM, K.ORTHO_MEAN_COS])
@pytest.mark.parametrize("ckd", [(3, 4, 9), (2, 1, 5), (2, 3, 35), (2, 37, 35)])
def test_ortho(dtype, mode, ckd, monkeypatch):
    if ckd[2] > 16:  # 16-wide tiles: K = 37 takes 3 row tiles and 3 x 3 Gram tiles, D = 35 three chunks
        monkeypatch.setattr(_common, "INTERPRET_MAX_TILE", 16)
    yn = ortho_inputs(*ckd, dtype)
    y64 = yn.double().requires_grad_()
    ref = ortho_oracle(y64, mode)
    out = K.ortho_fwd(yn, mode)
    assert out.shape == ()
    close(out, ref.detach(), dtype)
    ref.backward(torch.tensor(-1.5, dtype=torch.float64))
    close(K.ortho_bwd(yn, mode, -1.5), y64.grad, dtype)


def test_nan_propagates_and_stays_in_its_row():
    img, txt = unit(4, 6, dtype=torch.float32, seed=16), unit(7, 6, dtype=torch.float32, seed=17)
    img[2, 3] = NAN
    finite = [0, 1, 3]
    cos = K.cosine(img, txt, 2.0)
    assert cos[2].isnan().all() and cos[finite].isfinite().all()
    for stat in K.segment_stats(img, txt, [0, 3, 7], [2.0, -2.0]):
        assert stat[2].isnan().all() and stat[finite].isfinite().all()
    for kind in (K.XENT_INDEX, K.XENT_UNIFORM, K.XENT_DENSE):
        labels, targets, _ = xent_weights(kind, 4, 7, torch.float32)
        loss, lse = K.xent_fwd(img, txt, 2.0, kind, labels, targets)
        assert loss[2].isnan() and lse[2].isnan() and loss[finite].isfinite().all()
        dcos = K.xent_bwd(img, txt, 2.0, kind, labels, targets, lse, torch.ones(4))
        assert dcos[2].isnan().all() and dcos[finite].isfinite().all()
    y, inv = K.l2norm_fwd(img, 1e-12)
    assert y[2].isnan().all() and inv[2].isnan() and y[finite].isfinite().all()
    mixed = K.mix(img, unit(4, 6, dtype=torch.float32, seed=18), torch.full((4,), 0.5))
    assert mixed[2].isnan().all() and mixed[finite].isfinite().all()


def test_nan_in_one_text_row_poisons_only_its_segment():
    img, txt = unit(3, 6, dtype=torch.float64, seed=19), unit(7, 6, dtype=torch.float64, seed=20)
    txt[5, 0] = NAN
    for stat in K.segment_stats(img, txt, [0, 4, 7], [3.0, 3.0]):
        assert stat[:, 1].isnan().all() and stat[:, 0].isfinite().all()


@pytest.mark.parametrize("mode", [K.ORTHO_ABS_SUM, K.ORTHO_MEAN_COS])
def test_ortho_nan(mode):
    yn = unit(2, 3, 5, dtype=torch.float32, seed=21)
    yn[1, 0, 2] = NAN
    assert K.ortho_fwd(yn, mode).isnan()
    y64 = yn.double().requires_grad_()
    ortho_oracle(y64, mode).backward()
    dyn = K.ortho_bwd(yn, mode, 1.0)
    assert torch.equal(dyn.isnan(), y64.grad.isnan()) and dyn[0].isfinite().all()


IMG, TXT = torch.zeros(2, 3), torch.zeros(4, 3)  # B = 2, N = 4, D = 3


@pytest.mark.parametrize("call, message", [
    (lambda: K.cosine(IMG, TXT.double(), 1.0), "txt has dtype torch.float64"),
    (lambda: K.cosine(IMG, torch.zeros(4, 5), 1.0), "feature dims differ"),
    (lambda: K.cosine(IMG.long(), TXT, 1.0), "img must be float16"),
    (lambda: K.cosine(IMG[..., None], TXT, 1.0), "img must have 2 dims"),
    (lambda: K.segment_stats(IMG, TXT, [0, 4], [1.0, 2.0]), "S \\+ 1 offsets"),
    (lambda: K.segment_stats(IMG, TXT, [0, 3, 2, 4], [1.0] * 3), "non-decreasing within \\[0, 4\\]"),
    (lambda: K.segment_stats(IMG, TXT, [0, 5], [1.0]), "non-decreasing within \\[0, 4\\]"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, 4), "kind must be 0"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_MULTILABEL), "kind 3 takes labels, got neither"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_MULTILABEL, torch.tensor([0, 2]), None, 2),
     "labels must lie in \\[0, 2\\)"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_MULTILABEL, torch.tensor([0, 0]), None, 3),
     "N = 4 is not a multiple of group = 3"),
    (lambda: K.xent_bwd(IMG, TXT, 1.0, K.XENT_UNIFORM, None, None, torch.zeros(2), torch.zeros(2), 0),
     "group must be an int >= 1"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_INDEX), "kind 0 takes labels, got neither"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_UNIFORM, targets=torch.zeros(2, 4)), "kind 1 takes neither"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_INDEX, torch.tensor([0, 4])), "labels must lie in \\[0, 4\\)"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_INDEX, torch.tensor([0.0, 1.0])), "labels must be an int64"),
    (lambda: K.xent_fwd(IMG, TXT, 1.0, K.XENT_DENSE, None, torch.zeros(2, 5)), "targets must have shape \\(2, 4\\)"),
    (lambda: K.xent_fwd(IMG, TXT[:0], 1.0, K.XENT_UNIFORM), "at least one class"),
    (lambda: K.xent_bwd(IMG, TXT, 1.0, K.XENT_UNIFORM, None, None, torch.zeros(3), torch.zeros(2)),
     "lse must have shape \\(2,\\)"),
    (lambda: K.l2norm_fwd(IMG, 0.0), "eps must be > 0"),
    (lambda: K.l2norm_bwd(torch.zeros(2, 4), IMG, torch.zeros(2), 1e-12), "dy must have shape \\(2, 3\\)"),
    (lambda: K.l2norm_bwd(IMG, IMG, torch.zeros(2), 0.0), "eps must be > 0"),
    (lambda: K.mix(IMG, IMG, torch.zeros(3)), "lam must have shape \\(2,\\)"),
    (lambda: K.ortho_fwd(torch.zeros(2, 3, 4), 2), "mode must be 0"),
    (lambda: K.ortho_bwd(IMG, 0, 1.0), "yn must have 3 dims"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
