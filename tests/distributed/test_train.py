"""DDP-style training under torchrun (2 CPU processes, gloo) equals single-process training on the same batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file



def test_two_rank_training_matches_one_process(tmp_path: Path, torchrun, worker) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK")}
    subprocess.run([sys.executable, worker("train_worker.py"), str(single)], cwd=tmp_path, check=True, timeout=300,
                   env={**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, capture_output=True)
    torchrun(2, [worker("train_worker.py"), str(double)], cwd=tmp_path)

    for method in ("coop", "lsn", "negprompt"):
        one, two = load_file(single / f"{method}.safetensors"), load_file(double / f"{method}.safetensors")
        assert set(one) == set(two)
        for name in one:  # learned contexts and every epoch's mean loss
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{method} {name}")
        assert len(set(one["losses"].tolist())) == len(one["losses"])  # the prompts moved between epochs

    # Each rank ran the text encoder on its slice of the 5 classes (3 and 2), so on fewer prompts than one process.
    rows = json.loads((single / "rows.0.json").read_text())
    rank_rows = [json.loads((double / f"rows.{r}.json").read_text()) for r in (0, 1)]
    for method, total in rows.items():
        assert rank_rows[0][method] + rank_rows[1][method] == total
        assert rank_rows[0][method] * 5 == total * 3 and rank_rows[1][method] * 5 == total * 2
