"""The optional extras: pyproject.toml declares what `promptkit info` describes, and info says which are there."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from promptkit import info

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_info_describes_every_user_extra() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert set(info.EXTRAS) == set(declared) - {"test", "bench"}
    for extra, (modules, _) in info.EXTRAS.items():
        packages = {requirement.split(">")[0].split("=")[0].strip() for requirement in declared[extra]}
        assert set(modules) == packages, extra


def test_report_lists_extras_and_tower_rules() -> None:
    text = info.report()
    lines = text.splitlines()
    start = lines.index("extras:")
    for extra, (modules, enables) in info.EXTRAS.items():
        line = next(line for line in lines[start:] if line.split()[0] == extra)
        installed = all(importlib.util.find_spec(m) is not None for m in modules)
        assert line.split()[1] == ("yes" if installed else "no"), line
        assert enables in line and (installed or f'pip install "promptkit[{extra}]"' in line)
    assert "SigLIP, SigLIP2" in text and "full context" in text and "truncated after the last [EOS]" in text


def test_package_version_is_the_one_pyproject_declares() -> None:
    from promptkit.version import __version__

    assert tomllib.loads(PYPROJECT.read_text())["project"]["version"] == __version__
