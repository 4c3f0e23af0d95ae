"""Turn a pytest-benchmark JSON into the speed-up table of benchmarks/README.md.

    pytest --benchmark-only benchmarks/ --benchmark-json=bench.json
    python benchmarks/ratios.py bench.json [--stat median|min]

Each row is one benchmark group (op, pass, size); each backend's cell is its median (or minimum) time and its
speed-up over eager torch and over torch.compile of the same reference (x > 1: faster). On a shared machine the
minimum is the steadier statistic: other tenants only ever add time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _impl(name: str) -> str:
    # test names look like test_loss[negprompt_loss-1024-fwd+bwd-cpp]: the implementation is the last part.
    return name.rsplit("-", 1)[-1].rstrip("]")


def table(data: dict, stat: str = "median") -> str:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][_impl(bench["name"])] = bench["stats"][stat]
    impls = [i for i in ("cpp", "triton", "cuda") if any(i in g for g in groups.values())]
    header = "| op (pass, size) | eager | compile | " + " | ".join(
        f"{i} | {i} vs eager | {i} vs compile" for i in impls) + " |"
    lines = [header, "|" + "---|" * (3 + 3 * len(impls))]
    for group in sorted(groups):
        times = groups[group]
        row = [group, _ms(times.get("eager")), _ms(times.get("compile"))]
        for impl in impls:
            t = times.get(impl)
            row += [_ms(t), _ratio(times.get("eager"), t), _ratio(times.get("compile"), t)]
        lines.append("| " + " | ".join(row) + " |")
    machine = data.get("machine_info", {})
    lines.append("")
    lines.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
                 f"{data.get('datetime', '')}; {stat} of the timed rounds.")
    return "\n".join(lines)


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.2f} ms"


def _ratio(reference: float | None, t: float | None) -> str:
    return "-" if reference is None or t is None else f"{reference / t:.2f}x"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="speed-up table of a pytest-benchmark JSON")
    parser.add_argument("json", help="the file --benchmark-json wrote")
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    args = parser.parse_args()
    with open(args.json) as handle:
        print(table(json.load(handle), args.stat))
