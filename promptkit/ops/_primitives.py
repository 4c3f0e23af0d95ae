"""The fused primitives every op is built from, one implementation per compiled backend (``primitives``).

Every backend offers the same primitives with the same semantics (``csrc/`` and ``kernels/`` document them;
``tests/ops/test_primitives.py`` checks each on every backend available). The kernels trust their arguments:
the public ops validate the user's inputs (``_checks``) before any primitive runs.

- ``l2norm(x, overwrite=False) -> (unit rows, 1 / norms)`` and ``l2norm_backward``; ``overwrite=True`` says x
  is a temporary of the caller's, which a backend may normalise in place (the cpp backend does: on a CPU each
  pass over a [N, D] text matrix costs memory traffic);
- ``cosine(img, txt, scale) -> [B, N]`` on unit rows;
- ``segment_stats(img, txt, offsets, scales) -> (max, min, logsumexp)`` of scale_s * cos over column segments
  (non-decreasing offsets from 0 to N; an empty segment gives -inf, +inf, -inf: the identities of max, min and
  logsumexp, as ``torch.logsumexp`` gives over no element);
- ``cosine_stats(image, texts, offsets, scales)``: ``segment_stats`` of the raw image rows against the raw rows of
  ``texts`` stacked in order, both normalised as ``l2norm`` does (what the scores need). The GPU backends and the
  cpp backend's fp64 path normalise, concatenate and call ``segment_stats``; on AVX2 CPUs without AVX-512 the cpp
  backend runs fp32 on its own blocked product (``csrc/cpu/product.h``), normalising while it packs the operands;
- ``xent(img, txt, scale, kind, labels, targets, group) -> (loss rows, logsumexp rows, saved)`` and
  ``xent_backward(..., lse, grad_rows, saved, group) -> dcos``: loss_b = a_b * lse_b(z) - sum_n w_bn z_bn with
  z = scale * cos and targets w given by ``kind`` (``abi.XENT_INDEX``: index ``labels``, ``XENT_UNIFORM``: uniform
  over all columns, ``XENT_DENSE``: dense ``targets``; a_b = sum_n w_bn). ``XENT_MULTILABEL`` is the multi-label
  soft margin loss_b = (1/N) sum_n softplus(z_bn) - y_bn z_bn with y_bn = 1 iff n // group == labels[b]; its
  backward needs no row statistic, so its "logsumexp rows" are zeros. ``saved`` is what the backward reuses: the
  cpp backend keeps the [B, N] cosines its BLAS product made (on a CPU the product is the cost, memory is not),
  the GPU backends keep nothing (an empty tensor) and recompute the cosine tiles;
- ``mix``, ``ortho`` and ``ortho_backward``.

The CPU (``cpp``) backend leaves the matrix product to torch's BLAS and fuses the passes over the [B, N]
logits; the GPU backends compute the cosine tiles inside the kernel so no [B, N] matrix exists in the forward.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from promptkit import abi
from promptkit.ops._backends import compiled_module, triton_module

_DTYPE_CODES = {getattr(torch, name): code for name, code in abi.DTYPE_CODES.items()}
KEEPS_COSINES = frozenset({"cpp"})  # backends whose xent forward saves the [B, N] cosines for the backward


def saved_shape(backend: str, rows: int, cols: int) -> tuple[int, ...]:
    """Shape of the ``saved`` tensor that ``xent`` returns on ``backend``."""
    return (rows, cols) if backend in KEEPS_COSINES else (0,)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and output) dtype of the kernels for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@functools.lru_cache(maxsize=64)
def _cached_constants(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    # Pinned memory and non_blocking: the copy is queued on the stream instead of synchronising the host.
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _constants_on(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant array (segment offsets, scales) on ``device``, built on the host once per distinct value
    (shared between calls: never written to)."""
    return _cached_constants(tuple(values), dtype, torch.device(device))


class _Primitives:
    """What every backend derives from its own primitives."""

    def cosine_stats(self, image: Tensor, texts: list[Tensor], offsets: list[int], scales: list[float]):
        """segment_stats of image [B, D] against the rows of ``texts`` ([n_i, D] each) stacked in order, all rows
        normalised here."""
        unit_image, _ = self.l2norm(image)
        unit_text, _ = self.l2norm(torch.cat(texts), overwrite=True)  # one copy of the text rows, normalised in place
        return self.segment_stats(unit_image, unit_text, offsets, scales)


class _Compiled(_Primitives):
    """Shared pointer plumbing of the C++ (CPU) and CUDA backends of ``promptkit._C``."""

    suffix = ""
    normalises_in_place = False  # the CUDA kernels declare x and y __restrict__

    def __init__(self) -> None:
        module, why = compiled_module()
        if module is None:
            raise RuntimeError(why)
        self.C = module

    def _fn(self, name: str):
        return getattr(self.C, f"{name}_{self.suffix}")

    def _extra(self, t: Tensor) -> tuple:
        return ()

    def _prep(self, t: Tensor) -> Tensor:
        return t.contiguous()

    def l2norm(self, x: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor]:
        x = self._prep(x)
        acc = acc_dtype(x.dtype)  # the kernels write their outputs in the accumulation dtype
        in_place = overwrite and self.normalises_in_place and x.dtype == acc
        y = x if in_place else torch.empty(x.shape, dtype=acc, device=x.device)
        inv = x.new_empty(x.shape[0], dtype=acc)
        self._fn("l2norm_fwd")(x.data_ptr(), x.shape[0], x.shape[1], abi.L2NORM_EPS, y.data_ptr(), inv.data_ptr(),
                               _DTYPE_CODES[x.dtype], *self._extra(x))
        return y, inv

    def l2norm_backward(self, dy: Tensor, y: Tensor, inv: Tensor) -> Tensor:
        dy, y = self._prep(dy.to(y.dtype)), self._prep(y)
        inv = inv.to(acc_dtype(y.dtype)).contiguous()
        dx = torch.empty(y.shape, dtype=acc_dtype(y.dtype), device=y.device)
        self._fn("l2norm_bwd")(dy.data_ptr(), y.data_ptr(), inv.data_ptr(), y.shape[0], y.shape[1], abi.L2NORM_EPS,
                               dx.data_ptr(), _DTYPE_CODES[y.dtype], *self._extra(y))
        return dx

    def mix(self, a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
        a, b = self._prep(a), self._prep(b.to(a.dtype))
        lam = lam.to(acc_dtype(a.dtype)).contiguous()
        out = torch.empty(a.shape, dtype=acc_dtype(a.dtype), device=a.device)
        self._fn("mix")(a.data_ptr(), b.data_ptr(), lam.data_ptr(), a.shape[0], a.shape[1], out.data_ptr(),
                        _DTYPE_CODES[a.dtype], *self._extra(a))
        return out

    def ortho(self, unit: Tensor, mode: str) -> Tensor:
        unit = self._prep(unit)
        out = unit.new_zeros((), dtype=acc_dtype(unit.dtype))
        C, K, D = unit.shape
        self._fn("ortho_fwd")(unit.data_ptr(), C, K, D, abi.ORTHO_MODES[mode], out.data_ptr(),
                              _DTYPE_CODES[unit.dtype], *self._extra(unit))
        return out

    def ortho_backward(self, unit: Tensor, mode: str, grad: float) -> Tensor:
        unit = self._prep(unit)
        out = torch.empty(unit.shape, dtype=acc_dtype(unit.dtype), device=unit.device)
        C, K, D = unit.shape
        self._fn("ortho_bwd")(unit.data_ptr(), C, K, D, abi.ORTHO_MODES[mode], float(grad), out.data_ptr(),
                              _DTYPE_CODES[unit.dtype], *self._extra(unit))
        return out

    def _segments(self, offsets: list[int], scales: list[float], like: Tensor) -> tuple[Tensor, Tensor]:
        return (_constants_on(offsets, torch.int64, like.device),
                _constants_on(scales, acc_dtype(like.dtype), like.device))


BLOCK_BYTES = 16 << 20  # the largest [rows, N] product block of CppPrimitives.segment_stats


class CppPrimitives(_Compiled):
    """C++/OpenMP kernels on CPU tensors (fp32, fp64; fp16/bf16 are computed in fp32)."""

    suffix = "cpu"
    normalises_in_place = True  # each row's norm is taken before the row is written

    def _prep(self, t: Tensor) -> Tensor:
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        return t.contiguous()

    def cosine(self, img: Tensor, txt: Tensor, scale: float) -> Tensor:
        return scale * (self._prep(img) @ self._prep(txt).T)

    def segment_stats(self, img: Tensor, txt: Tensor, offsets: list[int], scales: list[float]):
        img, txt = self._prep(img), self._prep(txt)
        B, N, S = img.shape[0], txt.shape[0], len(scales)
        seg_offsets, seg_scales = self._segments(offsets, scales, img)
        out = [img.new_empty(B, S) for _ in range(3)]
        # The product in row blocks of at most BLOCK_BYTES, into one buffer reused across blocks: a fresh [B, N]
        # result above glibc's mmap threshold is page-faulted in on every call (about a fifth of the product's
        # time at B = 4096); smaller results are faster in one piece.
        rows = B if B * N * img.element_size() <= BLOCK_BYTES else max(1, BLOCK_BYTES // (N * img.element_size()))
        buffer = img.new_empty(min(rows, B), N)
        for r0 in range(0, B, rows):
            r1 = min(B, r0 + rows)
            cos = torch.mm(img[r0:r1], txt.T, out=buffer[:r1 - r0])
            self.C.segment_stats_cpu(cos.data_ptr(), r1 - r0, N, seg_offsets.data_ptr(), seg_scales.data_ptr(), S,
                                     *(o[r0:r1].data_ptr() for o in out), _DTYPE_CODES[cos.dtype])
        return tuple(out)

    def fused_product(self) -> bool:
        """Whether fp32 ``cosine_stats`` runs the fused product: on AVX2 CPUs without AVX-512, where MKL's product
        reaches about 64 % of the FMA peak and ours more (benchmarks/README.md). AVX-512 CPUs keep MKL and the
        separate passes: there MKL is within 5 % of a hand-written product."""
        return self.C.vector_isa_cpu() == "avx2"

    def cosine_stats(self, image, texts, offsets, scales):
        image = image.float() if image.dtype in (torch.float16, torch.bfloat16) else image
        texts = [t.to(image.dtype) for t in texts]
        if image.dtype != torch.float32 or not self.fused_product():
            return super().cosine_stats(image, texts, offsets, scales)
        return self.fused_cosine_stats(image, texts, offsets, scales)

    def fused_cosine_stats(self, image: Tensor, texts: list[Tensor], offsets: list[int], scales: list[float]):
        """``cosine_stats`` by the fused product (fp32; needs ``C.product_usable_cpu()``)."""
        image = image.contiguous()
        # row-strided views (LSN's negative sets neg_text[:, k]) are read in place
        texts = [t if t.stride(-1) == 1 else t.contiguous() for t in texts]
        B, S = image.shape[0], len(scales)
        seg_offsets, seg_scales = self._segments(offsets, scales, image)
        out = [image.new_empty(B, S) for _ in range(3)]
        self.C.cosine_segment_stats_cpu(image.data_ptr(), B, image.shape[1],
                                        [(t.data_ptr(), t.shape[0], t.stride(0)) for t in texts], abi.L2NORM_EPS,
                                        seg_offsets.data_ptr(), seg_scales.data_ptr(), S,
                                        *(o.data_ptr() for o in out))
        return tuple(out)

    def xent(self, img, txt, scale, kind, labels=None, targets=None, group=1):
        cos = self._prep(img) @ self._prep(txt).T
        labels = None if labels is None else labels.contiguous()
        targets = None if targets is None else targets.to(cos.dtype).contiguous()
        loss, lse = cos.new_empty(cos.shape[0]), cos.new_empty(cos.shape[0])
        self.C.xent_fwd_cpu(cos.data_ptr(), cos.shape[0], cos.shape[1], float(scale), kind, _ptr(labels),
                            _ptr(targets), loss.data_ptr(), lse.data_ptr(), _DTYPE_CODES[cos.dtype], group)
        return loss, lse, cos

    def xent_backward(self, img, txt, scale, kind, labels, targets, lse, grad_rows, saved, group=1):
        cos = saved.contiguous() if saved.numel() else self._prep(img) @ self._prep(txt).T
        labels = None if labels is None else labels.contiguous()
        targets = None if targets is None else targets.to(cos.dtype).contiguous()
        # Bind every converted tensor to a name: a temporary would be freed before the kernel reads it.
        lse, grad_rows = lse.to(cos.dtype).contiguous(), grad_rows.to(cos.dtype).contiguous()
        dcos = torch.empty_like(cos)
        self.C.xent_bwd_cpu(cos.data_ptr(), cos.shape[0], cos.shape[1], float(scale), kind, _ptr(labels),
                            _ptr(targets), lse.data_ptr(), grad_rows.data_ptr(), dcos.data_ptr(),
                            _DTYPE_CODES[cos.dtype], group)
        return dcos


class CudaPrimitives(_Compiled):
    """Hand-written CUDA kernels (fp32, fp64, fp16, bf16) on CUDA tensors."""

    suffix = "cuda"

    def _extra(self, t: Tensor) -> tuple:
        return (torch.cuda.current_stream(t.device).cuda_stream,)

    def cosine(self, img: Tensor, txt: Tensor, scale: float) -> Tensor:
        img, txt = img.contiguous(), txt.to(img.dtype).contiguous()
        out = img.new_empty(img.shape[0], txt.shape[0], dtype=acc_dtype(img.dtype))
        self.C.cosine_cuda(img.data_ptr(), txt.data_ptr(), img.shape[0], txt.shape[0], img.shape[1], float(scale),
                           out.data_ptr(), _DTYPE_CODES[img.dtype], *self._extra(img))
        return out

    def segment_stats(self, img, txt, offsets, scales):
        img, txt = img.contiguous(), txt.to(img.dtype).contiguous()
        B, S = img.shape[0], len(scales)
        seg_offsets, seg_scales = self._segments(offsets, scales, img)
        out = [img.new_empty(B, S, dtype=acc_dtype(img.dtype)) for _ in range(3)]
        self.C.segment_stats_cuda(img.data_ptr(), txt.data_ptr(), B, txt.shape[0], img.shape[1],
                                  seg_offsets.data_ptr(), seg_scales.data_ptr(), S, *(o.data_ptr() for o in out),
                                  _DTYPE_CODES[img.dtype], *self._extra(img))
        return tuple(out)

    def xent(self, img, txt, scale, kind, labels=None, targets=None, group=1):
        img, txt = img.contiguous(), txt.to(img.dtype).contiguous()
        acc = acc_dtype(img.dtype)
        labels = None if labels is None else labels.contiguous()
        targets = None if targets is None else targets.to(acc).contiguous()
        loss, lse = img.new_empty(img.shape[0], dtype=acc), img.new_empty(img.shape[0], dtype=acc)
        self.C.xent_fwd_cuda(img.data_ptr(), txt.data_ptr(), img.shape[0], txt.shape[0], img.shape[1], float(scale),
                             kind, _ptr(labels), _ptr(targets), loss.data_ptr(), lse.data_ptr(),
                             _DTYPE_CODES[img.dtype], *self._extra(img), group)
        return loss, lse, img.new_empty(0)

    def xent_backward(self, img, txt, scale, kind, labels, targets, lse, grad_rows, saved, group=1):
        img, txt = img.contiguous(), txt.to(img.dtype).contiguous()
        acc = acc_dtype(img.dtype)
        labels = None if labels is None else labels.contiguous()
        targets = None if targets is None else targets.to(acc).contiguous()
        lse, grad_rows = lse.to(acc).contiguous(), grad_rows.to(acc).contiguous()
        dcos = img.new_empty(img.shape[0], txt.shape[0], dtype=acc)
        self.C.xent_bwd_cuda(img.data_ptr(), txt.data_ptr(), img.shape[0], txt.shape[0], img.shape[1], float(scale),
                             kind, _ptr(labels), _ptr(targets), lse.data_ptr(), grad_rows.data_ptr(),
                             dcos.data_ptr(), _DTYPE_CODES[img.dtype],
                             *self._extra(img), group)
        return dcos


class TritonPrimitives(_Primitives):
    """Triton kernels (``promptkit.kernels``) on CUDA tensors, or on CPU under TRITON_INTERPRET=1."""

    def __init__(self) -> None:
        module, why = triton_module()
        if module is None:
            raise RuntimeError(why)
        self.K = module

    def l2norm(self, x, overwrite=False):
        return self.K.l2norm_fwd(x.contiguous(), abi.L2NORM_EPS)

    def l2norm_backward(self, dy, y, inv):
        # dy stays in its own (fp32) dtype: fp16 y would round small gradients (ortho's ~1e-5) to subnormals
        return self.K.l2norm_bwd(dy.contiguous(), y.contiguous(), inv.contiguous(), abi.L2NORM_EPS)

    def mix(self, a, b, lam):
        return self.K.mix(a.contiguous(), b.to(a.dtype).contiguous(), lam.to(acc_dtype(a.dtype)).contiguous())

    def ortho(self, unit, mode):
        return self.K.ortho_fwd(unit.contiguous(), abi.ORTHO_MODES[mode])

    def ortho_backward(self, unit, mode, grad):
        return self.K.ortho_bwd(unit.contiguous(), abi.ORTHO_MODES[mode], float(grad))

    def cosine(self, img, txt, scale):
        return self.K.cosine(img.contiguous(), txt.to(img.dtype).contiguous(), float(scale))

    def segment_stats(self, img, txt, offsets, scales):
        return self.K.segment_stats(img.contiguous(), txt.to(img.dtype).contiguous(), list(offsets),
                                    [float(s) for s in scales])

    def xent(self, img, txt, scale, kind, labels=None, targets=None, group=1):
        targets = None if targets is None else targets.contiguous()
        loss, lse = self.K.xent_fwd(img.contiguous(), txt.to(img.dtype).contiguous(), float(scale), kind, labels,
                                    targets, group)
        return loss, lse, img.new_empty(0)

    def xent_backward(self, img, txt, scale, kind, labels, targets, lse, grad_rows, saved, group=1):
        targets = None if targets is None else targets.contiguous()
        return self.K.xent_bwd(img.contiguous(), txt.to(img.dtype).contiguous(), float(scale), kind, labels, targets,
                               lse.contiguous(), grad_rows.contiguous(), group)


_IMPLEMENTATIONS = {"cpp": CppPrimitives, "cuda": CudaPrimitives, "triton": TritonPrimitives}
_instances: dict[str, object] = {}


def primitives(backend: str):
    """The primitive implementation of a compiled backend ("cpp", "cuda" or "triton")."""
    if backend not in _instances:
        _instances[backend] = _IMPLEMENTATIONS[backend]()
    return _instances[backend]
