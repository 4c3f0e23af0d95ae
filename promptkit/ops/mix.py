"""Feature mixing for LAPT's cross-modal and cross-distribution mixup (no gradient: features are frozen)."""

from __future__ import annotations

import torch
from torch import Tensor

from promptkit.ops import _checks, reference
from promptkit.ops._primitives import primitives


@torch.library.custom_op("promptkit::mix_features", mutates_args=())
def _mix_features(a: Tensor, b: Tensor, lam: Tensor, backend: str) -> Tensor:
    return primitives(backend).mix(a, b, lam).to(a.dtype)


@_mix_features.register_fake
def _(a, b, lam, backend):
    return torch.empty_like(a)


def mix_features(a: Tensor, b: Tensor, lam: Tensor | float, backend: str = "auto") -> Tensor:
    """L2-normalised lam * a + (1 - lam) * b. a, b [B, D]; lam a float or a [B] tensor -> [B, D]."""
    _checks.features("a", a, 2)
    _checks.features("b", b, 2, dim=a.shape[1])
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"a has {a.shape[0]} rows but b has {b.shape[0]}")
    _checks.same_device(a=a, b=b)
    if isinstance(lam, Tensor):
        if lam.shape != (a.shape[0],):
            raise ValueError(f"lam must be a float or a [B={a.shape[0]}] tensor, got shape {tuple(lam.shape)}")
    backend = _checks.backend_for(backend, a)
    if backend == "torch":
        return _checks.finite(reference.mix_features(a, b, lam), a=a, b=b, lam=lam)
    if not isinstance(lam, Tensor):
        lam = torch.full((a.shape[0],), float(lam), dtype=torch.float64, device=a.device)
    return _checks.finite(_mix_features(a.detach(), b.detach(), lam.detach().to(a.device), backend), a=a, b=b,
                          lam=lam)
