"""Tensor files that carry their own checksum: cache entries, saved prompts and collected features.

``save_tensors`` records, in the safetensors metadata under ``"sha256"``, a digest over every tensor's name,
dtype, shape and bytes in sorted name order; ``load_tensors`` recomputes it, so a flipped byte anywhere in the
data (or a header edited to another shape or dtype) is caught on load instead of giving silently wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from promptkit.data.atomic import OutputError, atomic_write
from promptkit.data.errors import DataError

CHECKSUM_KEY = "sha256"


class IntegrityError(DataError):
    """A tensor file without a checksum, or whose tensors no longer match the one it records."""


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """The hex sha256 over each tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor],
                 metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` (moved to the CPU, made contiguous) atomically with their checksum; returns the checksum."""
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    digest = tensors_digest(cpu)
    with atomic_write(path) as tmp:
        try:
            save_file(cpu, str(tmp), metadata={**(metadata or {}), CHECKSUM_KEY: digest})
        except SafetensorError as error:  # safetensors reports a full disk as "I/O error: ... (os error 28)"
            code = re.search(r"os error (\d+)", str(error))
            if code is None:
                raise
            raise OutputError(path, os.strerror(int(code.group(1)))) from error
    return digest


def load_tensors(path: str | os.PathLike[str], *, require_checksum: bool = True
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of ``path``, verified against the checksum the file records.

    ``require_checksum=False`` accepts a file that records no checksum (one another tool wrote), unverified; a
    file that records one is always verified.

    Raises:
        IntegrityError: a mismatch (a corrupt file), or no checksum recorded (a file from an older promptkit)
            while ``require_checksum`` is set.
        OSError, SafetensorError: the file is missing, truncated or not a safetensors file.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is None:
        if not require_checksum:
            return tensors, metadata
        raise IntegrityError(f"{Path(path)}: no checksum recorded (written by an older promptkit)")
    actual = tensors_digest(tensors)
    if actual != recorded:
        raise IntegrityError(f"{Path(path)}: checksum mismatch, the file is corrupt (recorded sha256 "
                             f"{recorded[:12]}..., contents {actual[:12]}...)")
    return tensors, metadata
