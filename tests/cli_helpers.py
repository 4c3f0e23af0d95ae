"""Run the ``promptkit`` command in a fresh process, outside the source tree (so the installed package loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROMPTKIT_CACHE": str(cache), "PYTHONWARNINGS": "ignore"}
    env.pop("PROMPTKIT_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "promptkit", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"promptkit {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
