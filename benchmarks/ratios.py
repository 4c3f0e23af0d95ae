"""Turn pytest-benchmark JSONs into the speed-up table of benchmarks/README.md.

    pytest --benchmark-only benchmarks/ --benchmark-json=bench.json
    python benchmarks/ratios.py bench.json [more.json ...] [--stat median|min]

Each row is one benchmark group (op, pass, size); each backend's cell is its median (or minimum) time and its
speed-up over eager torch and over torch.compile of the same reference (x > 1: faster). Where the run also timed
the bare BLAS products an op contains (implementation "blas": the matmul-bound ops on a CPU), the table adds their
time and each backend's time over it ("cpp / blas", what the op costs on top of its products; the target is at
most 1.1x). On a shared machine the minimum is the steadier statistic: other tenants only ever add time. Given
several runs, a cell is the minimum over all of them (--stat min) or the median of the runs' medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def _impl(name: str) -> str:
    # test names look like test_loss[negprompt_loss-1024-fwd+bwd-cpp]: the implementation is the last part.
    return name.rsplit("-", 1)[-1].rstrip("]")


def table(runs: list[dict], stat: str = "median") -> str:
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for data in runs:
        for bench in data["benchmarks"]:
            samples[bench["group"]][_impl(bench["name"])].append(bench["stats"][stat])
    combine = min if stat == "min" else statistics.median
    groups = {group: {impl: combine(times) for impl, times in impls.items()} for group, impls in samples.items()}
    impls = [i for i in ("cpp", "triton", "cuda") if any(i in g for g in groups.values())]
    products = any("blas" in g for g in groups.values())
    header = "| op (pass, size) | eager | compile | " + " | ".join(
        f"{i} | {i} vs eager | {i} vs compile" for i in impls) + " |"
    if products:
        header += " blas | " + " | ".join(f"{i} / blas" for i in impls) + " |"
    lines = [header, "|" + "---|" * (3 + 3 * len(impls) + (1 + len(impls) if products else 0))]
    for group in sorted(groups):
        times = groups[group]
        row = [group, _ms(times.get("eager")), _ms(times.get("compile"))]
        for impl in impls:
            t = times.get(impl)
            row += [_ms(t), _ratio(times.get("eager"), t), _ratio(times.get("compile"), t)]
        if products:
            blas = times.get("blas")
            row += [_ms(blas)] + [_ratio(times.get(impl), blas) for impl in impls]
        lines.append("| " + " | ".join(row) + " |")
    machine = runs[0].get("machine_info", {})
    lines.append("")
    lines.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
                 f"{', '.join(data.get('datetime', '') for data in runs)}; {stat} of the timed rounds"
                 f"{f' over {len(runs)} runs' if len(runs) > 1 else ''}.")
    return "\n".join(lines)


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.2f} ms"


def _ratio(reference: float | None, t: float | None) -> str:
    return "-" if reference is None or t is None else f"{reference / t:.2f}x"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="speed-up table of a pytest-benchmark JSON")
    parser.add_argument("json", nargs="+", help="files --benchmark-json wrote (runs of the same suite)")
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    args = parser.parse_args()
    runs = []
    for path in args.json:
        with open(path) as handle:
            runs.append(json.load(handle))
    print(table(runs, args.stat))
