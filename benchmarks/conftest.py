"""Benchmark sizes and the implementations every op benchmark compares in one run.

Each op is timed as eager torch (the reference), ``torch.compile`` of the reference, and every compiled backend
usable on the device, in one pytest-benchmark group per (op, pass, size) so the ratios are read off one table
(``python benchmarks/ratios.py`` turns a saved run into the ratio table of benchmarks/README.md).
PROMPTKIT_BENCH_QUICK=1 shrinks every size for a smoke run in CI.
"""

from __future__ import annotations

import os

import pytest
import torch

QUICK = os.environ.get("PROMPTKIT_BENCH_QUICK") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The realistic sizes: C = 1000 classes, K = 3 negatives per class, M = 10000 negative labels, D = 512.
C, K, M, D = (20, 3, 200, 64) if QUICK else (1000, 3, 10000, 512)
BATCHES = [16] if QUICK else [1024, 4096]
# The quick smoke run leaves out torch.compile: compiling every op takes minutes on a small CPU, and
# tests/ops/test_compile.py already checks that the ops compile.
IMPLEMENTATIONS = ["eager"] + ([] if QUICK else ["compile"]) + (["triton", "cuda"] if DEVICE == "cuda" else ["cpp"])
# On the CPU the matmul-bound benchmarks also time the bare BLAS products their op contains ("blas"): the cpp
# backend's target is at most 1.1x of them.
WITH_PRODUCTS = IMPLEMENTATIONS + (["blas"] if DEVICE == "cpu" else [])


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def features(*shape: int, seed: int = 0, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(DEVICE)
    return x.requires_grad_(grad)


def implementation(fn_of_backend, impl: str):
    """The callable to time: the reference (eager or compiled) or the op on a compiled backend."""
    if impl == "eager":
        return lambda *a: fn_of_backend("torch", *a)
    if impl == "compile":
        return CompiledReference(fn_of_backend)
    return lambda *a: fn_of_backend(impl, *a)


class CompiledReference:
    """torch.compile of the reference, compiled afresh for one benchmark case and proven to stay compiled.

    Every case compiles the same code object (the lambda below): without ``torch._dynamo.reset()`` its cache would
    fill after ``recompile_limit`` (8) cases, each new shape or op a recompile, and dynamo would then run the later
    cases eager without an error. So each case starts from an empty cache (one static-shape compile), the warm-up
    call fails on a recompile-limit hit instead of falling back, ``check_compiled`` asserts that the warm-up
    compiled graphs, and the timed calls fail on any recompile (the only way dynamo falls back to eager).
    """

    def __init__(self, fn_of_backend) -> None:
        torch._dynamo.reset()
        self.graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self.fn = torch.compile(lambda *a: fn_of_backend("torch", *a))
        self.warm = False

    def __call__(self, *args):
        flags = {"error_on_recompile": True} if self.warm else {"fail_on_recompile_limit_hit": True}
        with torch._dynamo.config.patch(**flags):
            return self.fn(*args)

    def check_compiled(self) -> None:
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.graphs_before
        assert graphs > 0, "torch.compile produced no graph: the compile baseline would be eager torch"
        self.warm = True


def blas_products(batch: int, cols: int, image_grad: bool = False, text_grad: bool = False):
    """The bare BLAS products of an op over [batch, cols] cosines, on the same shapes and dtype: the forward's
    unit_image @ unit_text.T, and for a backward dcos @ unit_text (the image gradient) and dcos.T @ unit_image (the
    text gradient). Each product allocates its result, as the op's products do. The ``cpp`` backend leaves these
    products to torch's BLAS, so the op's time over theirs is what its own passes cost."""
    image, text = features(batch, D, seed=1), features(cols, D, seed=2)
    dcos = features(batch, cols, seed=3) if image_grad or text_grad else None

    def products():
        out = [image @ text.T]
        if image_grad:
            out.append(dcos @ text)
        if text_grad:
            out.append(dcos.T @ image)
        return out

    return products


def run_benchmark(benchmark, fn, inputs, backward: bool):
    """Time fn(*inputs) (and its backward when ``backward``), warmed up once, synchronised on GPUs."""

    def once():
        out = fn(*inputs)
        if backward:
            out.backward()
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.grad is not None:
                    t.grad = None
        synchronize()

    once()  # compile / autotune outside the timing
    if isinstance(fn, CompiledReference):
        fn.check_compiled()
    benchmark.pedantic(once, rounds=3 if QUICK else 20, warmup_rounds=1 if not QUICK else 0, iterations=1)


@pytest.fixture
def bench(benchmark):
    return benchmark
