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
        lines.append("no GPU: the triton/cuda tests on CUDA tensors, tests/ops/test_cuda_bindings.py and "
                     "tests/ops/test_gpu_ops.py are not collected (CPU: cpp, and triton under TRITON_INTERPRET=1)")
    return lines
