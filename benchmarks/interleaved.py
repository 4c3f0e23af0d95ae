"""The op benchmarks' cells timed interleaved: every implementation of a case once per round, in turn, median of
the rounds.

    python benchmarks/interleaved.py scores losses [--rounds 7] [--threads 1] [--baseline OTHER_C.so]

pytest-benchmark times all rounds of one implementation before the next, so on a shared machine a change of load
between them lands in the ratio. Here each round times eager torch, ``torch.compile`` of the reference (compiled
afresh per case, as in conftest), the bare BLAS products (``blas``) and the ``cpp`` backend back to back.
``--baseline`` adds the ``cpp`` backend on another build of ``promptkit._C`` (for example the last commit's,
built in a separate directory), swapped in per call, so before and after share each round's load. With one
thread the clock is the calling thread's CPU time (the kernels then run on that thread), which other jobs on the
machine barely move; with more threads it is the wall clock. Sizes and ops are the suites' (bench_scores.py,
bench_losses.py). Prints one Markdown table row per case.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_losses, bench_scores  # noqa: E402
from benchmarks.conftest import BATCHES, C, D, K, M, CompiledReference, blas_products, features  # noqa: E402
from promptkit.ops._primitives import primitives  # noqa: E402


def _load_module(path: str):
    """A promptkit._C build from another file, under its own name (an extension loads once per name)."""
    loader = importlib.machinery.ExtensionFileLoader("promptkit_baseline._C", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def _score_case(op: str, batch: int) -> dict:
    inputs = [features(batch, D, seed=1), features(C, D, seed=2), features(C, K, D, seed=3), features(M, D, seed=4)]
    fn, compiled = bench_scores.SCORES[op], CompiledReference(bench_scores.SCORES[op])
    return {"eager": lambda: fn("torch", *inputs), "compile": lambda: compiled(*inputs),
            "blas": blas_products(batch, bench_scores.COLUMNS[op]), "cpp": lambda: fn("cpp", *inputs),
            "compiled": compiled}


def _loss_case(op: str, batch: int, passes: str) -> dict:
    image_grad, text_grad = bench_losses.PASSES[passes]
    inputs = [features(batch, D, seed=1, grad=image_grad), features(C, D, seed=2, grad=text_grad),
              features(C, K, D, seed=3, grad=text_grad), bench_losses._labels(batch),
              bench_losses._soft_targets(batch)]
    fn, compiled = bench_losses.LOSSES[op], CompiledReference(bench_losses.LOSSES[op])

    def run(impl: str):
        def once():
            out = compiled(*inputs) if impl == "compile" else fn(impl, *inputs)
            if text_grad:
                out.backward()
                for t in inputs:
                    if isinstance(t, torch.Tensor) and t.grad is not None:
                        t.grad = None
        return once

    return {"eager": run("torch"), "compile": run("compile"),
            "blas": blas_products(batch, bench_losses.COLUMNS[op], image_grad, text_grad), "cpp": run("cpp"),
            "compiled": compiled}


def cases(suites: list[str]):
    for batch in BATCHES:
        if "scores" in suites:
            for op in bench_scores.SCORES:
                yield f"{op} fwd B={batch}", lambda op=op, batch=batch: _score_case(op, batch)
        if "losses" in suites:
            for op in bench_losses.LOSSES:
                for passes in bench_losses.PASSES:
                    yield (f"{op} {passes} B={batch}",
                           lambda op=op, batch=batch, passes=passes: _loss_case(op, batch, passes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+", choices=["scores", "losses"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--baseline", help="another build of promptkit._C to time the cpp backend on as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    cpp = primitives("cpp")
    builds = {"cpp": cpp.C} | ({"baseline": _load_module(args.baseline)} if args.baseline else {})
    impls = ["eager", "compile", "blas", *builds]
    print(f"{args.threads} thread(s), {clock.__name__}, median of {args.rounds} interleaved rounds")
    ratios = [f"{b} vs eager" for b in builds] + [f"{b} vs compile" for b in builds] + [f"{b} / blas" for b in builds]
    print("| op (pass, size) | " + " | ".join(impls + ratios) + " |")
    print("|---" * (1 + len(impls) + len(ratios)) + "|", flush=True)
    for name, make in cases(args.suites):
        fns = make()
        fns["compile"]()
        fns["compiled"].check_compiled()
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for impl in impls:
                cpp.C = builds.get(impl, builds["cpp"])
                start = clock()
                fns[impl if impl in fns else "cpp"]()
                if round_:
                    times[impl].append(clock() - start)
        cpp.C = builds["cpp"]
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        cells = [f"{med[i] * 1e3:.2f} ms" for i in impls]
        cells += [f"{med['eager'] / med[b]:.2f}x" for b in builds] + [f"{med['compile'] / med[b]:.2f}x" for b in builds]
        cells += [f"{med[b] / med['blas']:.2f}" for b in builds]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
