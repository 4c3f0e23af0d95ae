"""Which op backends exist on this machine, why the others do not, and which one ``auto`` picks."""

from __future__ import annotations

import os
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


# Import results, looked up once (a plain dict rather than functools.cache, which torch.compile warns about).
_IMPORTED: dict[str, tuple[ModuleType | None, str]] = {}


def compiled_module() -> tuple[ModuleType | None, str]:
    """The compiled extension ``promptkit._C`` and, if it failed to import, why."""
    if "_C" not in _IMPORTED:
        try:
            from promptkit import _C

            _IMPORTED["_C"] = (_C, "")
        except ImportError as error:
            _IMPORTED["_C"] = (None, f"promptkit._C is not built or failed to import ({error}); "
                                     "reinstall with `pip install .`")
    return _IMPORTED["_C"]


def triton_module() -> tuple[ModuleType | None, str]:
    """``promptkit.kernels`` (Triton) and, if it cannot be used, why."""
    if "triton" not in _IMPORTED:
        _IMPORTED["triton"] = _import_triton_kernels()
    return _IMPORTED["triton"]


def triton_interpreted() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): used for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _import_triton_kernels() -> tuple[ModuleType | None, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None, "triton is not installed (pip install 'promptkit[triton]')"
    try:
        from promptkit import kernels
    except ImportError as error:
        return None, f"promptkit.kernels failed to import ({error})"
    return kernels, ""


def why_unavailable(backend: str, device: torch.device) -> str:
    """Empty string if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return ""
    if backend == "cpp":
        module, why = compiled_module()
        if module is None:
            return why
        return "" if device.type == "cpu" else f"the cpp backend runs on CPU tensors, got {device.type}"
    if backend == "cuda":
        module, why = compiled_module()
        if module is None:
            return why
        info = module.build_info()
        if not info["cuda"]:
            return f"promptkit._C was built without CUDA ({info['why_no_cuda']})"
        return "" if device.type == "cuda" else f"the cuda backend runs on CUDA tensors, got {device.type}"
    if backend == "triton":
        module, why = triton_module()
        if module is None:
            return why
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return ""
        return f"the triton backend runs on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device.type}"
    return f"unknown backend {backend!r}; choose one of {', '.join(('auto',) + BACKENDS)}"


def available_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Map each backend to "" (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {name: why_unavailable(name, device) for name in BACKENDS}


def _auto(device: torch.device) -> str:
    preference = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
    return next(name for name in preference if not why_unavailable(name, device))


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a user's backend choice into a concrete backend for tensors on ``device``.

    ``auto`` means $PROMPTKIT_BACKEND when set, else the fastest usable backend for the device. An explicit
    backend that cannot run raises ``BackendUnavailableError`` with the reason.
    """
    if backend == "auto":
        backend = os.environ.get("PROMPTKIT_BACKEND", "auto") or "auto"
        if backend == "auto":
            return _auto(device)
    why = why_unavailable(backend, device)
    if why:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {why}")
    return backend
