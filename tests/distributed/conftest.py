"""Launch helpers for the distributed tests: real ``torchrun`` runs of 2 CPU processes on the gloo backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _torchrun(nproc: int, target: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node NPROC TARGET...`` from ``cwd`` (outside the repo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROMPTKIT_DEBUG")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", *target]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(target)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def torchrun():
    return _torchrun


@pytest.fixture
def worker():
    """The path of a worker script in this folder (run by torchrun, not collected by pytest)."""
    return lambda name: str(HERE / name)
