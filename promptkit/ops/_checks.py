"""Input validation shared by the public ops: every problem is one ValueError naming the argument.

This is the one place the user's inputs are checked: the primitives (``_primitives``) and the kernels behind them
trust their arguments. The compiled kernels keep only the checks that protect memory (csrc/common/checks.h).
"""

from __future__ import annotations

import torch
from torch import Tensor

from promptkit.ops._backends import resolve_backend


def _values_checkable() -> bool:
    """Value checks (NaN, label range) need data; inside torch.compile tracing only shapes are checked."""
    return not torch.compiler.is_compiling()


def _host_readable(x: Tensor) -> bool:
    """Whether reading values of ``x`` back is free: on a GPU it would stall the host every training step."""
    return x.device.type == "cpu"


def features(name: str, x: Tensor, ndim: int | tuple[int, ...], dim: int | None = None) -> None:
    """Check a floating feature tensor: its rank, non-empty sizes and the feature size (values: see ``finite``)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if any(size == 0 for size in x.shape):
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); it needs at least one row per class/sample")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has feature size {x.shape[-1]} but the image features have {dim}")


def finite(result: Tensor, **inputs: Tensor | float | None) -> Tensor:
    """Return ``result``, or raise a ValueError naming the input that holds NaN or infinite values.

    NaN and inf in the inputs propagate to every op's result, so only the (small) result is scanned on the
    normal path; the inputs are scanned only to name the culprit. On CUDA tensors nothing is scanned: the scan
    would synchronise the host with the GPU on every call, and a NaN result still shows (the training loop
    raises on a non-finite loss).
    """
    if not _values_checkable() or not _host_readable(result) or bool(torch.isfinite(result).all()):
        return result
    for name, x in inputs.items():
        if isinstance(x, Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{name} contains {int((~torch.isfinite(x)).sum())} NaN or infinite value(s)")
    raise ValueError("the result is not finite although every input is; the values overflow the dtype "
                     "(try float32 or a larger temperature)")


def same_device(**tensors: Tensor) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"inputs must be on one device: {listing}")
    return devices.pop()


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def labels(x: Tensor, batch: int, num_classes: int) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.int64 or x.ndim != 1:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] != batch:
        raise ValueError(f"labels has {x.shape[0]} entries for {batch} images")
    if not batch or not _values_checkable():
        return
    in_range = ((x >= 0) & (x < num_classes)).all()
    if not _host_readable(x):
        # on a GPU an asynchronous device assert, torch's own rule for out-of-range targets: no host sync
        torch._assert_async(in_range, f"labels must lie in [0, {num_classes})")
    elif not bool(in_range):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{int(x.min())}, {int(x.max())}]")


def backend_for(backend: str, *tensors: Tensor) -> str:
    return resolve_backend(backend, tensors[0].device)
