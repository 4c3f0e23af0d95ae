"""Test-wide setup: Triton runs in its CPU interpreter when there is no GPU (must be set before it loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    from promptkit.ops import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = []
    for device in devices:
        usable = [name for name, why in available_backends(device).items() if not why]
        lines.append(f"promptkit backends on {device}: {', '.join(usable)}")
    if not torch.cuda.is_available():
        lines.append("no GPU: the triton/cuda cases on CUDA tensors are skipped and tests/ops/test_gpu_ops.py is not "
                     "collected (CPU: cpp, and triton under TRITON_INTERPRET=1)")
    return lines
