"""benchmarks/gpu_check.sh is safe to run anywhere, and benchmarks/gpu_report.py reports what its steps left."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", BENCHMARKS / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the whole check")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    report_dir = tmp_path / "report"
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), str(report_dir)], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [done.stdout.strip()] and "no CUDA GPU" in done.stdout
    assert not report_dir.exists()


INFO = dict(torch="2.x", cuda="13.0", triton="3.x", gpu="NVIDIA H100", capability="sm_90", memory_gib=80.0)


def _steps(tmp_path: Path, rows: list[tuple[str, str, int, float]]) -> None:
    (tmp_path / "steps.tsv").write_text("".join(f"{n}\t{s}\t{rc}\t{sec}\n" for n, s, rc, sec in rows))
    for name, *_ in rows:
        (tmp_path / f"{name}.log").write_text(f"{name} log\n3 passed in 1.0s\n")


def test_report_lists_every_step_and_fails_on_a_timeout(tmp_path):
    _steps(tmp_path, [("build", "ok", 0, 61.2), ("benchmarks", "timeout", 124, 120.0)])
    lsn = [dict(backend="triton", ms_per_step=12.5, peak_mib=2048.0, first_loss=6.9, loss_matches=True),
           dict(backend="cpu-like", ms_per_step=50.0, peak_mib=None, first_loss=6.9, loss_matches=True)]
    (tmp_path / "lsn_step.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lsn))
    assert not _report_module().write(tmp_path, INFO)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and [s["status"] for s in report["steps"]] == ["ok", "timeout"]
    assert report["steps"][1]["log_tail"] == "3 passed in 1.0s" and report["lsn_step"] == lsn
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# promptkit GPU check: FAILED")
    assert "| benchmarks | timeout | 120.0 | 3 passed in 1.0s |" in markdown
    assert "| triton | 12.5 | 2048 | 6.90000 | True |" in markdown and "| cpu-like | 50.0 | - |" in markdown


def test_report_passes_when_every_step_did(tmp_path):
    _steps(tmp_path, [("build", "ok", 0, 61.2), ("cuda_tests", "ok", 0, 40.0)])
    bench = [{"group": "mix_features fwd B=1024", "name": f"test_mix_features[1024-{impl}]",
              "stats": {"median": t, "min": t}} for impl, t in (("eager", 2e-3), ("compile", 1e-3), ("triton", 5e-4))]
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": bench}))
    assert _report_module().write(tmp_path, INFO)
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True
    markdown = (tmp_path / "report.md").read_text()
    assert "all steps passed" in markdown
    assert "| mix_features fwd B=1024 | 2.00 ms | 1.00 ms | 0.50 ms | 4.00x | 2.00x |" in markdown
