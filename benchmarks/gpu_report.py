"""The report of benchmarks/gpu_check.sh: REPORT_DIR/report.md and REPORT_DIR/report.json from what its steps left.

    python benchmarks/gpu_report.py REPORT_DIR

Reads REPORT_DIR/steps.tsv (name, status, exit code, seconds a line), each step's log, lsn_step.jsonl (the lines of
benchmarks/gpu_step.py) and bench.json (pytest-benchmark). Exits 1 unless every step's status is "ok".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def machine() -> dict:
    """The GPU and the versions the run used."""
    import torch

    info: dict = dict(torch=torch.__version__, cuda=torch.version.cuda, gpu=None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", memory_gib=props.total_memory / 2**30)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def read_steps(out: Path) -> list[dict]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, rc, seconds = line.split("\t")
        log = out / f"{name}.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        steps.append(dict(name=name, status=status, rc=int(rc), seconds=float(seconds), log=log.name,
                          log_tail=lines[-1] if lines else ""))
    return steps


def bench_table(out: Path) -> str:
    """benchmarks/ratios.py's speed-up table of the run's bench.json ("" without one)."""
    path = out / "bench.json"
    if not path.exists():
        return ""
    sys.path.insert(0, str(BENCHMARKS))
    import ratios

    return ratios.table([json.loads(path.read_text())])


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def write(out: Path, info: dict) -> bool:
    """Write report.json and report.md; True when every step passed."""
    steps = read_steps(out)
    step_file = out / "lsn_step.jsonl"
    lsn_step = [json.loads(line) for line in step_file.read_text().splitlines() if line.strip()] \
        if step_file.exists() else []
    ok = bool(steps) and all(step["status"] == "ok" for step in steps)
    (out / "report.json").write_text(json.dumps(dict(ok=ok, machine=info, steps=steps, lsn_step=lsn_step,
                                                     benchmarks="bench.json" if (out / "bench.json").exists()
                                                     else None), indent=2))
    gpu = (f"{info['gpu']} ({info['capability']}, {info['memory_gib']:.0f} GiB)" if info.get("gpu")
           else "no GPU visible")
    lines = [f"# promptkit GPU check: {'all steps passed' if ok else 'FAILED'}", "",
             f"{gpu}; torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}.", "",
             "| step | status | seconds | last line of its log |", "|---|---|--:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['log_tail'][:120].replace('|', '/')} |"
              for s in steps]
    if lsn_step:
        lines += ["", "## One LSN negative step (C = 1000, K = 3, random ViT-B-16, bf16 autocast)", "",
                  "| backend | ms / step | peak MiB | first loss | loss matches |", "|---|--:|--:|--:|---|"]
        lines += [f"| {r['backend']} | {r['ms_per_step']:.1f} | {_mib(r['peak_mib'])} | {r['first_loss']:.5f} | "
                  f"{r['loss_matches']} |" for r in lsn_step]
    table = bench_table(out)
    if table:
        lines += ["", "## Op benchmarks (median of the timed rounds)", "", table]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return ok


if __name__ == "__main__":
    report_dir = Path(sys.argv[1])
    passed = write(report_dir, machine())
    print(f"gpu_check: {'ok' if passed else 'FAILED'}; report in {report_dir / 'report.md'} and "
          f"{report_dir / 'report.json'}")
    sys.exit(0 if passed else 1)
