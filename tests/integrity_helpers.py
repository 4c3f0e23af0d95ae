"""Damage files the way a failing disk or a stray write does, for the integrity tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def flip_tensor_byte(path: Path, name: str, index: int = 0) -> None:
    """Invert one byte of tensor ``name``'s data inside the safetensors file ``path`` (header left intact)."""
    raw = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_size])
    raw[8 + header_size + header[name]["data_offsets"][0] + index] ^= 0xFF
    path.write_bytes(bytes(raw))
