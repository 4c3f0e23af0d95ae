"""Run the ``promptkit`` command in a fresh process, outside the source tree (so the installed package loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def run_cli(*args: str, cwd: Path, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROMPTKIT_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    env.pop("PROMPTKIT_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "promptkit", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"promptkit {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def image_folder(root: Path, classes=("a", "b"), per_class: int = 2) -> Path:
    """An ImageFolder tree of random 28x28 gray PNGs, ``per_class`` per class folder (seeded)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root
