"""Conformance of the fused primitives (``promptkit.ops._primitives``) on every compiled backend available.

One test (and its edge cases) per primitive: cosine, segment_stats, xent forward and backward, l2norm forward and
backward, mix, ortho forward and backward. Each runs on cpp (CPU tensors), on triton under TRITON_INTERPRET=1
(CPU tensors, tiny shapes: the interpreter costs milliseconds a program) and on triton and cuda with CUDA tensors
(skipped, with the reason, without a GPU). Each primitive has one oracle below, its definition in plain torch;
backward oracles are torch autograd through it. Accuracy follows the suite's one rule (conftest).

Interpreted cases with a tile of 16 lower ``INTERPRET_MAX_TILE`` so that the loops over column tiles, row tiles
and feature chunks run. Some edge cases need logits chosen entry by entry: ``exact_cosines`` gives image rows and
text rows whose product is a given matrix exactly (the kernels compute img @ txt^T whatever the norms).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from promptkit import abi
from promptkit.ops._primitives import _Primitives, acc_dtype, primitives, saved_shape

from .conftest import CPU_BACKENDS, assert_matches_formula, primitive_params

HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64) + HALF
NAN = float("nan")
MODES = {abi.ORTHO_ABS_SUM: "abs_sum", abi.ORTHO_MEAN_COS: "mean_cos"}


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(rand(*shape, seed=seed), dim=-1)


def on(t: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    return t.to(dtype).to(device)


def exact_cosines(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(img, txt) with img @ txt^T == cos exactly: img = I_B, txt = cos^T (sums of one product and zeros). With
    B = 1 the product holds no zero term either, so cos may hold NaN and infinities."""
    return torch.eye(cos.shape[0], dtype=cos.dtype), cos.T.contiguous()


def prepare(backend: str, tile: int | None, monkeypatch):
    """The backend's primitives; ``tile`` lowers the interpreter's tile size (interpreted cases only)."""
    if tile:
        from promptkit.kernels import _common

        monkeypatch.setattr(_common, "INTERPRET_MAX_TILE", tile)
        assert _common.dot_tiles(19, 37, 35, torch.float32) == (tile,) * 3
    return primitives(backend)


def assert_acc(out: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == acc_dtype(dtype), f"{out.dtype} is not the accumulation dtype of {dtype}"


def grad_of(fn, wrt: torch.Tensor, upstream, *args) -> torch.Tensor:
    """d <upstream, fn(wrt, *args)> / d wrt by torch autograd."""
    leaf = wrt.detach().clone().requires_grad_()
    (fn(leaf, *args) * upstream).sum().backward()
    return leaf.grad


# ---------------------------------------------------------------- the oracles, one per primitive


def cosine_oracle(img, txt, scale):
    return scale * img @ txt.T


def segment_stats_oracle(cos, offsets, scales):
    """(max, min, logsumexp) [B, S] of scales[s] * cos over each segment; an empty segment gives the identities
    (-inf, +inf, -inf), as ``torch.logsumexp`` does over no element."""
    outs = [[], [], []]
    for s, scale in enumerate(scales):
        z = scale * cos[:, offsets[s]:offsets[s + 1]]
        if z.shape[1] == 0:
            stats = [torch.full_like(cos[:, 0], v) for v in (-torch.inf, torch.inf, -torch.inf)]
        else:
            stats = [z.amax(1), z.amin(1), torch.logsumexp(z, 1)]
        for out, stat in zip(outs, stats):
            out.append(stat)
    return [torch.stack(out, 1) for out in outs]


def xent_oracle(cos, scale, kind, labels, targets, group=1):
    """(loss [B], lse [B]) of the xent primitive on z = scale * cos (multilabel: lse is zeros)."""
    z = scale * cos
    N = z.shape[1]
    if kind == abi.XENT_MULTILABEL:
        y = (torch.arange(N) // group == labels[:, None].cpu()).to(z.dtype)
        return F.multilabel_soft_margin_loss(z, y, reduction="none"), torch.zeros_like(z[:, 0])
    if kind == abi.XENT_INDEX:
        w = F.one_hot(labels.cpu(), N).to(z.dtype)
    elif kind == abi.XENT_UNIFORM:
        w = torch.full_like(z, 1.0 / N)
    else:
        w = targets.cpu().to(z.dtype)
    # -sum_n w log_softmax(z)_n == a * lse - sum_n w z, in torch's well-conditioned form
    return -(w * torch.log_softmax(z, 1)).sum(1), torch.logsumexp(z, 1)


def l2norm_oracle(x):
    return F.normalize(x, dim=1, eps=abi.L2NORM_EPS)


def inv_norm_oracle(x):
    return 1 / x.norm(dim=1).clamp_min(abi.L2NORM_EPS)


def mix_oracle(a, b, lam):
    return F.normalize(lam[:, None] * a + (1 - lam[:, None]) * b, dim=1, eps=abi.MIX_EPS)


def ortho_oracle(yn, mode):
    C, K, _ = yn.shape
    gram = yn @ yn.transpose(1, 2)
    if mode == abi.ORTHO_ABS_SUM:
        return torch.triu(gram, diagonal=1).abs().sum()
    off_diagonal = ~torch.eye(K, dtype=torch.bool)
    return gram[:, off_diagonal].sum() / (C * K * (K - 1)) if K > 1 else yn.sum() * 0


# ---------------------------------------------------------------- cosine

# (B, N, D, tile): singletons, then partial row tiles (32), column tiles (64) and feature slices (32) on a GPU
COSINE = [(1, 1, 1, None), (5, 7, 3, None), (70, 150, 65, None)]
INTERPRETED = [(5, 11, 9, None), (19, 37, 35, 16)]  # one tile, and 16-wide tiles along every dim


@pytest.mark.parametrize("scale", [14.3, -2.5])
@pytest.mark.parametrize("backend,device,dtype,case",
                         primitive_params(COSINE, INTERPRETED, ALL_DTYPES, (torch.float32, torch.float64)) +
                         primitive_params([], [(5, 11, 9, None)], (), HALF))
def test_cosine(backend, device, dtype, case, scale, monkeypatch):
    B, N, D, tile = case
    prim = prepare(backend, tile, monkeypatch)
    img, txt = on(unit(B, D, seed=0), dtype, device), on(unit(N, D, seed=1), dtype, device)
    out = prim.cosine(img, txt, scale)
    assert_acc(out, dtype)
    assert_matches_formula(out, lambda a, b: cosine_oracle(a, b, scale), img, txt)


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float32,)))
def test_cosine_nan_stays_in_its_row(backend, device, dtype, case):
    img, txt = unit(4, 6, seed=16), unit(7, 6, seed=17)
    img[2, 3] = NAN
    cos = primitives(backend).cosine(on(img, dtype, device), on(txt, dtype, device), 2.0).cpu()
    assert cos[2].isnan().all() and cos[[0, 1, 3]].isfinite().all()


# ---------------------------------------------------------------- segment_stats

# (B, D, offsets, scales, tile)
SEGMENTS = [
    (1, 1, [0, 1], [1.0], None),                                  # N = 1, S = 1
    (3, 8, [0, 1], [1.0], None),
    (5, 3, [0, 7], [-3.5], None),                                 # negative scale
    (4, 8, [0, 3, 10, 11], [100.0, 0.5, -20.0], None),            # a one-column segment, mixed signs
    (16, 8, [0, 1000, 2500], [100.0, 25.0], None),                # segments longer than a CPU chunk; parallel rows
    (70, 65, [0, 1, 64, 100, 150], [100.0, 20.0, -5.0, 1.0], None),  # segments start inside GPU column tiles
    (4, 5, [0, 2, 2, 6, 6], [1.0, 2.0, -1.0, 3.0], None),         # empty segments, inside and at the end
]
INTERPRETED_SEGMENTS = [
    (5, 9, [0, 11], [1 / 0.07], None), (5, 9, [0, 4, 8, 11], [10.0, -3.5, 2.0], None),
    (19, 35, [0, 37], [1 / 0.07], 16), (19, 35, [0, 4, 34, 37], [10.0, -3.5, 2.0], 16),
    (3, 5, [0, 2, 2, 6], [1.0, 1.0, 1.0], None),
]


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # numpy's log(0) = -inf
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params(SEGMENTS, INTERPRETED_SEGMENTS, ALL_DTYPES,
                                                                        (torch.float32, torch.float64)))
def test_segment_stats(backend, device, dtype, case, monkeypatch):
    B, D, offsets, scales, tile = case
    prim = prepare(backend, tile, monkeypatch)
    img, txt = on(unit(B, D, seed=2), dtype, device), on(unit(offsets[-1], D, seed=3), dtype, device)
    stats = prim.segment_stats(img, txt, offsets, scales)
    live = [s for s in range(len(scales)) if offsets[s + 1] > offsets[s]]
    empty = [s for s in range(len(scales)) if offsets[s + 1] == offsets[s]]
    for i, name in enumerate(["max", "min", "lse"]):
        assert_acc(stats[i], dtype)
        assert_matches_formula(stats[i][:, live].cpu(),
                               lambda a, b: segment_stats_oracle(a @ b.T, offsets, scales)[i][:, live], img, txt,
                               what=name)
        identity = (-torch.inf, torch.inf, -torch.inf)[i]
        assert (stats[i][:, empty] == identity).all(), f"{name} of an empty segment is not {identity}"


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # numpy's inf * 0
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None]))
def test_segment_stats_nan_and_infinities(backend, device, dtype, case):
    prim = primitives(backend)
    # logits chosen entry by entry, one row a call (exact_cosines)
    cos = rand(3, 9, seed=0).to(dtype)
    cos[0, 4] = NAN
    cos[1, :5] = -torch.inf
    cos[2, 6] = torch.inf
    rows = [prim.segment_stats(*(on(t, dtype, device) for t in exact_cosines(cos[b:b + 1])), [0, 5, 9], [1.0, 1.0])
            for b in range(3)]
    mx, mn, lse = (torch.cat([row[i].cpu() for row in rows]) for i in range(3))
    assert torch.isnan(torch.stack([mx[0, 0], mn[0, 0], lse[0, 0]])).all()    # NaN reaches every output
    assert torch.isfinite(torch.stack([mx[0, 1], mn[0, 1], lse[0, 1]])).all()  # the other segment is clean
    assert mx[1, 0] == lse[1, 0] == -torch.inf                                 # all -inf segment
    assert mx[2, 1] == lse[2, 1] == torch.inf                                  # one +inf entry
    for got, want in zip((mx, mn, lse), segment_stats_oracle(cos, [0, 5, 9], [1.0, 1.0])):
        torch.testing.assert_close(got, want.to(got.dtype), equal_nan=True)

    # a NaN image row poisons its row, a NaN text row its segment
    img, txt = unit(4, 6, seed=16), unit(7, 6, seed=17)
    img[2, 3] = NAN
    for stat in prim.segment_stats(on(img, dtype, device), on(txt, dtype, device), [0, 3, 7], [2.0, -2.0]):
        assert stat[2].isnan().all() and stat[[0, 1, 3]].isfinite().all()
    img, txt = unit(3, 6, seed=19), unit(7, 6, seed=20)
    txt[5, 0] = NAN
    for stat in prim.segment_stats(on(img, dtype, device), on(txt, dtype, device), [0, 4, 7], [3.0, 3.0]):
        assert stat[:, 1].isnan().all() and stat[:, 0].isfinite().all()

    # infinite logits: all +inf (lse +inf) and all -inf (lse -inf), not inf - inf = NaN
    img = torch.tensor([[torch.inf, 1.0], [0.6, 0.8]], dtype=torch.float64)
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)  # row 0's cosines are all +inf
    z = img @ txt.T
    for scale in (2.0, -2.0):
        stats = prim.segment_stats(on(img, dtype, device), on(txt, dtype, device), [0, 3], [scale])
        refs = ((scale * z).amax(1), (scale * z).amin(1), torch.logsumexp(scale * z, 1))
        for stat, ref in zip(stats, refs):
            assert stat[0, 0] == ref[0] == scale * torch.inf
            torch.testing.assert_close(stat[1].cpu(), ref[1:].to(stat.dtype))


# ---------------------------------------------------------------- cosine_stats

# (B, D, rows of each text source, scales): raw rows, one segment per source. The cpp fused product
# (csrc/cpu/product.h) has 6-row tiles in blocks of 8, 16-column panels, 256-deep blocks and windows of
# 128 KB / (4 D) columns, so the cases cross each of those edges; the other paths normalise and call
# segment_stats.
COSINE_STATS = [
    (1, 1, [1], [1.0], None),
    (5, 7, [3, 4], [100.0, -5.0], None),
    (13, 17, [33], [1 / 0.07], None),                     # a row past a tile, a column past a panel, D % 8 != 0
    (100, 600, [700, 1, 300], [100.0, 20.0, -3.0], None),  # tile blocks, windows of 48 columns, three depth blocks
    (30, 1030, [40, 0, 25], [1.0, 2.0, 3.0], None),        # an empty source, five depth blocks, one-panel windows
    (50, 64, [300] + [7] * 40, [50.0] * 41, None),         # many segments in one window (NegLabel's shape)
]
INTERPRETED_COSINE_STATS = [(5, 9, [4, 7], [10.0, -3.5], None)]


def text_sources(counts: list[int], D: int, seed: int) -> list[torch.Tensor]:
    """Raw text rows, each source a row-strided view (as LSN's negative sets neg_text[:, k] are)."""
    return [rand(n, 2, D, seed=seed + i, scale=1.5 + i)[:, 1] for i, n in enumerate(counts)]


def assert_cosine_stats(stats_fn, case, dtype, device):
    """stats_fn(image, texts, offsets, scales) against segment_stats_oracle of the normalised rows."""
    B, D, counts, scales, _ = case
    offsets = [sum(counts[:s]) for s in range(len(counts) + 1)]
    image = on(rand(B, D, seed=4, scale=3.0), dtype, device)
    texts = [on(t, dtype, device) for t in text_sources(counts, D, seed=5)]
    stats = stats_fn(image, texts, offsets, scales)
    live = [s for s in range(len(scales)) if offsets[s + 1] > offsets[s]]
    empty = [s for s in range(len(scales)) if offsets[s + 1] == offsets[s]]
    for i, name in enumerate(["max", "min", "lse"]):
        assert_acc(stats[i], dtype)
        assert_matches_formula(
            stats[i][:, live].cpu(),
            lambda a, b: segment_stats_oracle(l2norm_oracle(a) @ l2norm_oracle(b).T, offsets, scales)[i][:, live],
            image, torch.cat(texts), what=name)
        identity = (-torch.inf, torch.inf, -torch.inf)[i]
        assert (stats[i][:, empty] == identity).all(), f"{name} of an empty segment is not {identity}"


def assert_zero_and_nan_rows(stats_fn, dtype, device):
    image, texts = rand(14, 20, seed=6), text_sources([40, 9], 20, seed=7)
    image[3] = 0.0  # clamped at eps: every cosine 0, so max = min = 0 and lse = log(40) in the clean segment
    image[12, 5] = NAN
    texts[1][4, 0] = NAN
    mx, mn, lse = (s.cpu().double() for s in stats_fn(on(image, dtype, device), [on(t, dtype, device) for t in texts],
                                                       [0, 40, 49], [7.0, 7.0]))
    assert mx[3, 0] == 0 and mn[3, 0] == 0
    torch.testing.assert_close(lse[3, 0].item(), torch.tensor(40.0).log().item())
    clean = [r for r in range(14) if r != 12]
    for stat in (mx, mn, lse):
        assert stat[12].isnan().all()                                         # a NaN image row poisons its row
        assert stat[clean, 1].isnan().all() and stat[clean, 0].isfinite().all()  # a NaN text row its segment


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params(COSINE_STATS, INTERPRETED_COSINE_STATS,
                                                                        ALL_DTYPES, (torch.float32, torch.float64)))
def test_cosine_stats(backend, device, dtype, case, monkeypatch):
    prim = prepare(backend, case[-1], monkeypatch)
    assert_cosine_stats(prim.cosine_stats, case, dtype, device)


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None]))
def test_cosine_stats_zero_and_nan_rows(backend, device, dtype, case):
    assert_zero_and_nan_rows(primitives(backend).cosine_stats, dtype, device)


def fused_product():
    """The cpp backend, skipping where the CPU cannot run its fused product."""
    cpp = primitives("cpp")
    if not cpp.C.product_usable_cpu():
        pytest.skip("this CPU has no AVX2 and FMA: the cpp backend has no fused product")
    return cpp


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("case", COSINE_STATS)
def test_fused_product(case):
    """The fused product itself, on every CPU that runs it (cosine_stats picks it on AVX2 CPUs without AVX-512)."""
    assert_cosine_stats(fused_product().fused_cosine_stats, case, torch.float32, "cpu")


def test_fused_product_zero_and_nan_rows():
    assert_zero_and_nan_rows(fused_product().fused_cosine_stats, torch.float32, "cpu")


def cpuinfo_isa() -> str:
    """The vector ISA that /proc/cpuinfo's flags name, by the rule vector_isa_cpu documents."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "portable"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo to name the CPU's ISA")
def test_cpp_cosine_stats_picks_the_fused_product_on_avx2_cpus():
    cpp = primitives("cpp")
    isa = cpuinfo_isa()
    assert cpp.C.vector_isa_cpu() == isa
    assert cpp.C.product_usable_cpu() == (isa != "portable")
    image, texts = rand(20, 24, seed=8).float(), [t.float() for t in text_sources([30, 5], 24, seed=9)]
    unfused = _Primitives.cosine_stats(cpp, image, texts, [0, 30, 35], [2.0, 3.0])
    want = cpp.fused_cosine_stats(image, texts, [0, 30, 35], [2.0, 3.0]) if isa == "avx2" else unfused
    for got, expected in zip(cpp.cosine_stats(image, texts, [0, 30, 35], [2.0, 3.0]), want):
        assert torch.equal(got, expected)
    if isa == "avx2":  # the two paths round differently: the check above can tell them apart
        assert not all(torch.equal(f, u) for f, u in zip(want, unfused))


# ---------------------------------------------------------------- xent (forward and backward)

# (B, N, D, scale, tile)
XENT = [(1, 1, 1, 100.0, None), (5, 7, 3, -7.5, None), (6, 33, 8, 20.0, None), (70, 150, 65, 20.0, None),
        (16, 2100, 8, 100.0, None)]  # 2100 columns: more than one CPU chunk
INTERPRETED_XENT = [(5, 11, 9, None), (19, 37, 35, 16)]
# the scale of the interpreted cases: CLIP's 100 where softplus(z) - z would cancel unless formed stably
INTERPRETED_SCALE = {abi.XENT_INDEX: 1 / 0.07, abi.XENT_UNIFORM: -3.0, abi.XENT_DENSE: 1 / 0.07,
                     abi.XENT_MULTILABEL: 100.0}
# (kind, group): the multilabel groups straddle the CPU chunks and the GPU and interpreter column tiles
KINDS = [(abi.XENT_INDEX, 1), (abi.XENT_UNIFORM, 1), (abi.XENT_DENSE, 1), (abi.XENT_MULTILABEL, 1),
         (abi.XENT_MULTILABEL, 3), (abi.XENT_MULTILABEL, 4)]


def xent_case(B, N, kind, group, device, seed=7):
    """(labels, targets) for a kind; dense targets have a row with no mass (loss 0, gradient 0)."""
    g = torch.Generator().manual_seed(seed)
    labelled = kind in (abi.XENT_INDEX, abi.XENT_MULTILABEL)
    labels = torch.randint(0, N // group, (B,), generator=g).to(device) if labelled else None
    targets = None
    if kind == abi.XENT_DENSE:
        targets = torch.rand(B, N, generator=g, dtype=torch.float64)
        targets[0] = 0
        targets = targets.to(device)
    return labels, targets


def xent_params():
    params = []
    for kind, group in KINDS:
        cases = [(B, N - N % group, D, scale, tile) for B, N, D, scale, tile in XENT if N >= group]
        interpreted = [(B, N - N % group, D, INTERPRETED_SCALE[kind], tile) for B, N, D, tile in INTERPRETED_XENT]
        for p in primitive_params(cases, interpreted, ALL_DTYPES, (torch.float32, torch.float64)):
            params.append(pytest.param(*p.values, kind, group, marks=p.marks, id=f"{p.id}-kind{kind}-group{group}"))
    for p in primitive_params([], [(5, 11, 9, 20.0, None)], (), HALF):
        params.append(pytest.param(*p.values, abi.XENT_INDEX, 1, marks=p.marks, id=f"{p.id}-kind0-group1"))
    return params


@pytest.mark.parametrize("backend,device,dtype,case,kind,group", xent_params())
def test_xent(backend, device, dtype, case, kind, group, monkeypatch):
    B, N, D, scale, tile = case
    prim = prepare(backend, tile, monkeypatch)
    img, txt = on(unit(B, D, seed=6), dtype, device), on(unit(N, D, seed=7), dtype, device)
    labels, targets = xent_case(B, N, kind, group, device)
    targets = None if targets is None else targets.to(acc_dtype(dtype))
    loss, lse, saved = prim.xent(img, txt, scale, kind, labels, targets, group)
    assert saved.shape == saved_shape(backend, B, N)
    assert_acc(loss, dtype)
    assert_matches_formula(loss, lambda a, b: xent_oracle(a @ b.T, scale, kind, labels, targets, group)[0], img, txt,
                           what="loss")
    if kind == abi.XENT_MULTILABEL:
        assert torch.equal(lse, torch.zeros_like(lse))  # no row statistic: the backward recomputes each term
    else:
        assert_matches_formula(lse, lambda a, b: xent_oracle(a @ b.T, scale, kind, labels, targets)[1], img, txt,
                               what="lse")

    grad_rows = on(rand(B, seed=1), acc_dtype(dtype), device)
    dcos = prim.xent_backward(img, txt, scale, kind, labels, targets, lse, grad_rows, saved, group)
    assert_acc(dcos, dtype)

    def autograd_dcos(a, b, g):
        return grad_of(lambda c: xent_oracle(c, scale, kind, labels, targets, group)[0], a @ b.T, g)

    assert_matches_formula(dcos, autograd_dcos, img, txt, grad_rows, what="dcos")


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float64,)))
def test_xent_backward_takes_zero_stride_grad(backend, device, dtype, case):
    """What ``.sum().backward()`` hands down (an expanded scalar), the ops pass on as is."""
    prim = primitives(backend)
    img, txt = on(unit(4, 7, seed=8), dtype, device), on(unit(6, 7, seed=9), dtype, device)
    labels = torch.tensor([5, 0, 2, 2], device=device)
    _, lse, saved = prim.xent(img, txt, 5.0, abi.XENT_INDEX, labels, None)
    grad_rows = torch.ones((), dtype=dtype, device=device).expand(4)
    dcos = prim.xent_backward(img, txt, 5.0, abi.XENT_INDEX, labels, None, lse, grad_rows, saved)
    cos = (img @ txt.T).cpu().requires_grad_()
    F.cross_entropy(5.0 * cos, labels.cpu(), reduction="sum").backward()
    torch.testing.assert_close(dcos.cpu(), cos.grad)


@pytest.mark.parametrize("kind", [abi.XENT_INDEX, abi.XENT_DENSE])
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float32,)))
def test_xent_forward_without_cancellation(backend, device, dtype, case, kind):
    """A confident row (target column at z = 100, the rest 85..95) has lse ~ 100 and a loss ~ 0.01, so
    a * lse - sum_n w z would lose ~ulp(100) = 8e-6 to cancellation; the log-softmax form keeps ~ulp(loss).
    A precision contract: the error must stay below 2e-6, under what the cancellation would cost."""
    B, N = 8, 5
    cos = 0.85 + 0.1 * torch.rand(B, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cos[:, 2] = 1.0
    img, txt = (on(t, dtype, device) for t in exact_cosines(cos.to(dtype)))
    labels = torch.full((B,), 2, device=device) if kind == abi.XENT_INDEX else None
    targets = (F.one_hot(torch.full((B,), 2), N).float() * 0.99 + 0.002).to(device) if kind == abi.XENT_DENSE else None
    loss, _, _ = primitives(backend).xent(img, txt, 100.0, kind, labels, targets)
    truth = xent_oracle(cos.to(dtype).double(), 100.0, kind, labels, targets)[0]
    assert (loss.cpu().double() - truth).abs().max() <= 2e-6


# a precision contract of the host math (csrc/common/xent.h's softplus); GPU exp and log are approximate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_xent_multilabel_keeps_relative_accuracy_of_confident_rows(backend, device, dtype):
    """Group columns at z = 25..35 and the rest at -35..-25: every term softplus(z) - y z is ~e^-|z|, so the loss
    ~1e-12 is kept to a few ulps only if no term is formed as softplus(z) - z (two ~30s that cancel)."""
    B, N, group, scale = 6, 12, 3, 100.0
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, N // group, (B,), generator=g)
    y = (torch.arange(N) // group == labels[:, None]).double()
    cos = ((0.25 + 0.1 * torch.rand(B, N, generator=g, dtype=torch.float64)) * (2 * y - 1)).to(dtype)
    img, txt = exact_cosines(cos)
    loss, _, _ = primitives(backend).xent(img, txt, scale, abi.XENT_MULTILABEL, labels, None, group)
    oracle = xent_oracle(cos.double(), scale, abi.XENT_MULTILABEL, labels, None, group)[0]
    assert oracle.max() < 1e-10
    torch.testing.assert_close(loss.double(), oracle, rtol=8 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("kind", [abi.XENT_INDEX, abi.XENT_UNIFORM, abi.XENT_DENSE])
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None]))
def test_xent_single_column_gradient_is_exactly_zero(backend, device, dtype, case, kind):
    """With N = 1 the softmax is exactly 1: the backward must recompute the forward's z bit for bit."""
    B, scale = 6, -37.3
    prim = primitives(backend)
    img, txt = (on(t, dtype, device) for t in exact_cosines(rand(B, 1).clamp(-1, 1).to(dtype)))
    labels, targets = xent_case(B, 1, kind, 1, device)
    targets = None if targets is None else targets.to(dtype)
    loss, lse, saved = prim.xent(img, txt, scale, kind, labels, targets)
    dcos = prim.xent_backward(img, txt, scale, kind, labels, targets, lse, on(rand(B, seed=3), dtype, device), saved)
    assert torch.equal(dcos, torch.zeros_like(dcos))
    assert torch.equal(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("kind", [abi.XENT_INDEX, abi.XENT_UNIFORM, abi.XENT_DENSE, abi.XENT_MULTILABEL])
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None]))
def test_xent_nan_row_stays_nan(backend, device, dtype, case, kind):
    B, N, group, scale = 4, 9, 3 if kind == abi.XENT_MULTILABEL else 1, 10.0
    prim = primitives(backend)
    img, txt = unit(B, 6, seed=16), unit(N, 6, seed=17)
    img[2, 3] = NAN
    img, txt = on(img, dtype, device), on(txt, dtype, device)
    labels, targets = xent_case(B, N, kind, group, device)
    targets = None if targets is None else targets.to(dtype)
    loss, lse, saved = prim.xent(img, txt, scale, kind, labels, targets, group)
    assert torch.isnan(loss[2]) and (kind == abi.XENT_MULTILABEL or torch.isnan(lse[2]))  # multilabel's lse is 0
    assert torch.isfinite(loss[[0, 1, 3]]).all() and torch.isfinite(lse[[0, 1, 3]]).all()
    dcos = prim.xent_backward(img, txt, scale, kind, labels, targets, lse, torch.ones(B, dtype=dtype, device=device),
                              saved, group)
    assert torch.isnan(dcos[2]).all()
    assert torch.isfinite(dcos[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None]))
def test_xent_multilabel_nan_stays_in_its_column(backend, device, dtype, case):
    """The multilabel terms are independent per column: a NaN logit makes only its column's gradient NaN."""
    prim = primitives(backend)
    cos = rand(1, 9, seed=4).clamp(-1, 1).to(dtype)
    cos[0, 5] = NAN
    img, txt = (on(t, dtype, device) for t in exact_cosines(cos))
    labels = torch.tensor([1], device=device)
    loss, lse, saved = prim.xent(img, txt, 10.0, abi.XENT_MULTILABEL, labels, None, 3)
    assert torch.isnan(loss).all()
    dcos = prim.xent_backward(img, txt, 10.0, abi.XENT_MULTILABEL, labels, None, lse,
                              torch.ones(1, dtype=dtype, device=device), saved, 3)
    assert torch.isnan(dcos[0, 5]) and torch.isfinite(dcos[0, torch.arange(9) != 5]).all()


# ---------------------------------------------------------------- l2norm (forward and backward)

# (R, D, tile)
ROWS = [(1, 1, None), (3, 1, None), (5, 7, None), (9, 7, None), (40, 300, None), (64, 600, None)]
INTERPRETED_ROWS = [(5, 9, None), (19, 35, 16)]


@pytest.mark.parametrize("backend,device,dtype,case",
                         primitive_params(ROWS, INTERPRETED_ROWS, ALL_DTYPES, (torch.float32, torch.float64)) +
                         primitive_params([], [(5, 9, None)], (), HALF))
def test_l2norm(backend, device, dtype, case, monkeypatch):
    R, D, tile = case
    prim = prepare(backend, tile, monkeypatch)
    x = rand(R, D, scale=3.0)
    if R >= 3 and dtype not in HALF:  # (eps is 0 in fp16: torch's own F.normalize of a zero row is NaN there)
        x[0] = 0.0     # zero row and ...
        x[1] *= 1e-14  # ... a row of norm <= 0.73 eps: both clamped, so their gradient is dy / eps
    x, dy = on(x, dtype, device), on(rand(R, D, seed=2), dtype, device)
    y, inv = prim.l2norm(x)
    # y: x's dtype on triton (the products that follow run on its tensor-core path), the accumulation dtype elsewhere
    assert y.dtype == (dtype if backend == "triton" else acc_dtype(dtype))
    assert_acc(inv, dtype)
    assert_matches_formula(y, l2norm_oracle, x, what="y")
    assert_matches_formula(inv, inv_norm_oracle, x, what="inv_norm")
    if y.dtype in HALF:
        return  # triton's fp16 y: its backward is held to the precision contract of the half-rows test below
    dx = prim.l2norm_backward(dy, y, inv)
    assert_acc(dx, dtype)

    def autograd_dx(t, g):
        return grad_of(l2norm_oracle, t, g)

    clamped = 2 if R >= 3 and dtype not in HALF else 0
    torch.testing.assert_close(dx[:clamped].cpu(), autograd_dx(x.cpu().to(dx.dtype), dy.cpu().to(dx.dtype))[:clamped])
    assert_matches_formula(dx[clamped:], lambda t, g: autograd_dx(t, g)[clamped:], x, dy, what="dx")


def tiny_rows(dtype: torch.dtype, device: str) -> torch.Tensor:
    """[5, 7] rows: a normal one, norm 1e-14 and 0.5 eps (clamped at eps), exactly eps (not clamped: torch's
    clamp_min passes the gradient at equality), and zero."""
    direction = unit(5, 7, seed=3).to(dtype)
    eps = torch.tensor(abi.L2NORM_EPS, dtype=dtype)  # eps as the dtype holds it: a one-entry row has norm eps
    x = torch.stack([direction[0] * 3, direction[1] * 1e-14, direction[2] * 0.5 * eps, torch.zeros(7, dtype=dtype),
                     torch.zeros(7, dtype=dtype)])
    x[3, 2] = eps
    return x.to(device)


def assert_rows_match(out: torch.Tensor, fn, *inputs: torch.Tensor, what: str) -> None:
    """out against fn(*inputs) with the suite's rule row by row: a clamped row's gradient is ~1 / eps."""
    for r in range(out.shape[0]):
        assert_matches_formula(out[r], lambda *t: fn(*t)[r], *inputs, what=f"{what}, row {r}")


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None]))
def test_l2norm_of_tiny_rows_matches_normalize(backend, device, dtype, case):
    prim = primitives(backend)
    x = tiny_rows(dtype, device)
    dy = on(rand(*x.shape, seed=4), dtype, device)
    y, inv = prim.l2norm(x)
    assert_rows_match(y, l2norm_oracle, x, what=f"{backend} l2norm")
    assert_rows_match(prim.l2norm_backward(dy, y, inv), lambda t, g: grad_of(l2norm_oracle, t, g), x, dy,
                      what=f"{backend} l2norm_backward")


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float16,)))
def test_l2norm_backward_keeps_the_fp32_gradient_of_half_rows(backend, device, dtype, case):
    """The op layer hands l2norm_backward fp32 gradients (ortho's are ~1e-5); rounding them to the rows' fp16
    would put them among fp16's subnormals (below 6.1e-5), a few percent off. A precision contract, not
    approximate math: the fp32 result must match the fp64 formula on the same inputs to fp32 precision."""
    prim = primitives(backend)
    x = on(rand(6, 16, seed=7) * 0.01, dtype, device)
    dy = on(rand(6, 16, seed=8) * 1e-6, torch.float32, device)
    y, inv = prim.l2norm(x)
    dx = prim.l2norm_backward(dy, y, inv)
    assert dx.dtype == torch.float32
    y64, inv64, dy64 = y.double().cpu(), inv.double().cpu()[:, None], dy.double().cpu()
    expected = inv64 * (dy64 - y64 * (dy64 * y64).sum(1, keepdim=True))
    torch.testing.assert_close(dx.double().cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float64,)))
def test_l2norm_backward_takes_zero_stride_grad(backend, device, dtype, case):
    prim = primitives(backend)
    x = on(rand(3, 4), dtype, device)
    y, inv = prim.l2norm(x)
    dx = prim.l2norm_backward(torch.ones((), dtype=dtype, device=device).expand(3, 4), y, inv)
    torch.testing.assert_close(dx.cpu(), grad_of(l2norm_oracle, x.cpu(), 1.0))


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float32,)))
def test_l2norm_nan_stays_in_its_row(backend, device, dtype, case):
    x = rand(3, 5)
    x[1, 2] = NAN
    y, inv = primitives(backend).l2norm(on(x, dtype, device))
    assert torch.isnan(y[1]).all() and torch.isnan(inv[1]) and torch.isfinite(y[[0, 2]]).all()


# ---------------------------------------------------------------- mix

MIX = [(1, 1, None), (6, 7, None), (9, 7, None), (40, 300, None), (64, 600, None)]


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params(MIX, INTERPRETED_ROWS, ALL_DTYPES,
                                                                        (torch.float32, torch.float64)))
def test_mix(backend, device, dtype, case, monkeypatch):
    B, D, tile = case
    prim = prepare(backend, tile, monkeypatch)
    a, b = on(rand(B, D), dtype, device), on(rand(B, D, seed=1, scale=2.0), dtype, device)
    lam = torch.rand(B, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lam[0] = 1.0
    lam = on(lam, acc_dtype(dtype), device)
    out = prim.mix(a, b, lam)
    assert_acc(out, dtype)
    assert_matches_formula(out, mix_oracle, a, b, lam)


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float32,)))
def test_mix_nan_stays_in_its_row(backend, device, dtype, case):
    a = rand(3, 5)
    a[1, 2] = NAN
    out = primitives(backend).mix(on(a, dtype, device), on(rand(3, 5, seed=1), dtype, device),
                                  torch.full((3,), 0.5, device=device))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


# ---------------------------------------------------------------- ortho (forward and backward)

# (C, K, D, tile)
ORTHO = [(1, 1, 7, None), (3, 2, 7, None), (5, 3, 16, None), (40, 4, 300, None), (70, 3, 300, None)]
# 16-wide tiles: K = 37 takes 3 row tiles and 3 x 3 Gram tiles, D = 35 three chunks
INTERPRETED_ORTHO = [(3, 4, 9, None), (2, 1, 5, None), (2, 3, 35, 16), (2, 37, 35, 16)]


def ortho_inputs(C: int, K: int, D: int) -> torch.Tensor:
    """Unit [C, K, D] rows; with K >= 3, class 0 has rows 0 and 1 equal (cos 1) and row 2 orthogonal to them
    (cos exactly 0, where abs_sum's gradient uses sign(0) = 0)."""
    yn = unit(C, K, D, seed=15)
    if K >= 3:
        half = D // 2
        yn[0, 0, half:] = 0
        yn[0, 2, :half] = 0
        yn[0] = F.normalize(yn[0], dim=-1)
        yn[0, 1] = yn[0, 0]
    return yn


@pytest.mark.parametrize("mode", [abi.ORTHO_ABS_SUM, abi.ORTHO_MEAN_COS])
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params(ORTHO, INTERPRETED_ORTHO, ALL_DTYPES,
                                                                        (torch.float32, torch.float64)))
def test_ortho(backend, device, dtype, case, mode, monkeypatch):
    C, K, D, tile = case
    prim = prepare(backend, tile, monkeypatch)
    yn = on(ortho_inputs(C, K, D), dtype, device)
    loss = prim.ortho(yn, MODES[mode])
    assert loss.shape == ()
    assert_acc(loss, dtype)
    assert_matches_formula(loss, lambda t: ortho_oracle(t, mode), yn, what="loss")
    dyn = prim.ortho_backward(yn, MODES[mode], -1.7)
    assert_acc(dyn, dtype)
    assert_matches_formula(dyn, lambda t: grad_of(lambda u: ortho_oracle(u, mode), t, -1.7), yn, what="dyn")


@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float32,)))
def test_ortho_abs_sum_gradient_of_orthogonal_pair_is_zero(backend, device, dtype, case):
    """sign(0) = 0: exactly orthogonal prompts get no push from |g|."""
    yn = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=dtype, device=device)
    dyn = primitives(backend).ortho_backward(yn, "abs_sum", 1.0)
    assert torch.equal(dyn, torch.zeros_like(dyn))


@pytest.mark.parametrize("mode", [abi.ORTHO_ABS_SUM, abi.ORTHO_MEAN_COS])
@pytest.mark.parametrize("backend,device,dtype,case", primitive_params([None], [None], (torch.float32,)))
def test_ortho_nan(backend, device, dtype, case, mode):
    prim = primitives(backend)
    yn = unit(2, 3, 5, seed=21).to(dtype)
    yn[1, 0, 2] = NAN
    assert prim.ortho(yn.to(device), MODES[mode]).isnan()
    dyn = prim.ortho_backward(yn.to(device), MODES[mode], 1.0).cpu()
    assert dyn[1].isnan().any() and dyn[0].isfinite().all()
    if backend == "triton":
        # triton's NaN entries are torch autograd's; cpp's are others (abs_sum: all of the class's rows, mean_cos:
        # none in the NaN row itself, which takes no part in its own gradient)
        expected = grad_of(lambda u: ortho_oracle(u, mode), yn.double(), 1.0)
        assert torch.equal(dyn.isnan(), expected.isnan())
