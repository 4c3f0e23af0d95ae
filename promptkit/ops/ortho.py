"""Orthogonality of each class's K prompt features (LSN Eq. 7, NegPrompt Eq. 6)."""

from __future__ import annotations

import torch
from torch import Tensor

from promptkit import abi
from promptkit.ops import _checks, reference
from promptkit.ops._primitives import primitives


@torch.library.custom_op("promptkit::orthogonality_loss", mutates_args=())
def _orthogonality_loss(prompts: Tensor, mode: str, backend: str) -> Tensor:
    prim = primitives(backend)
    C, K, D = prompts.shape
    unit, _ = prim.l2norm(prompts.reshape(C * K, D))
    return prim.ortho(unit.reshape(C, K, D), mode).to(prompts.dtype)


@torch.library.custom_op("promptkit::orthogonality_loss_backward", mutates_args=())
def _orthogonality_loss_backward(grad: Tensor, prompts: Tensor, mode: str, backend: str) -> Tensor:
    prim = primitives(backend)
    C, K, D = prompts.shape
    unit, inv = prim.l2norm(prompts.reshape(C * K, D))
    d_unit = prim.ortho_backward(unit.reshape(C, K, D), mode, 1.0) * grad.to(unit.dtype)
    return prim.l2norm_backward(d_unit.reshape(C * K, D), unit, inv).reshape(C, K, D).to(prompts.dtype)


@_orthogonality_loss.register_fake
def _(prompts, mode, backend):
    return prompts.new_empty(())


@_orthogonality_loss_backward.register_fake
def _(grad, prompts, mode, backend):
    return torch.empty_like(prompts)


def _setup(ctx, inputs, output):
    prompts, mode, backend = inputs
    ctx.save_for_backward(prompts)
    ctx.mode, ctx.backend = mode, backend


def _backward(ctx, grad):
    (prompts,) = ctx.saved_tensors
    return _orthogonality_loss_backward(grad, prompts, ctx.mode, ctx.backend), None, None


_orthogonality_loss.register_autograd(_backward, setup_context=_setup)


def orthogonality_loss(prompts: Tensor, mode: str = "abs_sum", backend: str = "auto") -> Tensor:
    """Orthogonality loss of prompt features prompts [C, K, D] -> scalar.

    mode "abs_sum" (LSN Eq. 7): sum over classes and pairs i < j of |cos(p_ci, p_cj)|.
    mode "mean_cos" (NegPrompt Eq. 6, L_NND): mean over classes and ordered pairs i != j of cos (0 when K == 1).
    """
    _checks.features("prompts", prompts, 3)
    if mode not in abi.ORTHO_MODES:
        raise ValueError(f"mode must be one of {sorted(abi.ORTHO_MODES)}, got {mode!r}")
    backend = _checks.backend_for(backend, prompts)
    if backend == "torch":
        loss = reference.orthogonality_loss(prompts, mode)
    else:
        loss = _orthogonality_loss(prompts, mode, backend)
    return _checks.finite(loss, prompts=prompts)
