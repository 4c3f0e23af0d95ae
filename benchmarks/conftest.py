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
        compiled = torch.compile(lambda *a: fn_of_backend("torch", *a))
        return compiled
    return lambda *a: fn_of_backend(impl, *a)


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
    benchmark.pedantic(once, rounds=3 if QUICK else 20, warmup_rounds=1 if not QUICK else 0, iterations=1)


@pytest.fixture
def bench(benchmark):
    return benchmark
