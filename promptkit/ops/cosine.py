"""Cosine logits: scale * cos(image, text), with gradients to both inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from promptkit.ops import _checks, reference
from promptkit.ops._primitives import primitives


@torch.library.custom_op("promptkit::cosine_logits", mutates_args=())
def _cosine_logits(image: Tensor, text: Tensor, scale: float, backend: str) -> Tensor:
    prim = primitives(backend)
    unit_image, _ = prim.l2norm(image)
    unit_text, _ = prim.l2norm(text)
    return prim.cosine(unit_image, unit_text, scale).to(image.dtype)


@_cosine_logits.register_fake
def _(image, text, scale, backend):
    return image.new_empty(image.shape[0], text.shape[0])


@torch.library.custom_op("promptkit::cosine_logits_backward", mutates_args=())
def _cosine_logits_backward(
    grad: Tensor, image: Tensor, text: Tensor, scale: float, need_image: bool, need_text: bool, backend: str
) -> tuple[Tensor, Tensor]:
    prim = primitives(backend)
    unit_image, inv_image = prim.l2norm(image)
    unit_text, inv_text = prim.l2norm(text)
    grad = grad.to(unit_image.dtype) * scale
    # An input that needs no gradient gets an empty tensor (custom ops cannot return None) and costs no product.
    d_image = prim.l2norm_backward(grad @ unit_text, unit_image, inv_image).to(image.dtype) if need_image else None
    d_text = prim.l2norm_backward(grad.T @ unit_image, unit_text, inv_text).to(text.dtype) if need_text else None
    return (image.new_empty(0) if d_image is None else d_image, text.new_empty(0) if d_text is None else d_text)


@_cosine_logits_backward.register_fake
def _(grad, image, text, scale, need_image, need_text, backend):
    return (torch.empty_like(image) if need_image else image.new_empty(0),
            torch.empty_like(text) if need_text else text.new_empty(0))


def _setup(ctx, inputs, output):
    image, text, scale, backend = inputs
    ctx.save_for_backward(image, text)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad):
    image, text = ctx.saved_tensors
    need_image, need_text = ctx.needs_input_grad[:2]
    d_image, d_text = _cosine_logits_backward(grad.contiguous(), image, text, ctx.scale, need_image, need_text,
                                              ctx.backend)
    return d_image if need_image else None, d_text if need_text else None, None, None


_cosine_logits.register_autograd(_backward, setup_context=_setup)


def cosine_logits(image: Tensor, text: Tensor, scale: float = 1.0, backend: str = "auto") -> Tensor:
    """scale * cos(image, text) of raw features (rows are L2-normalised inside).

    image [B, D]; text [N, D] or [C, K, D] -> [B, N] or [B, C, K]. Differentiable in image and text.
    """
    _checks.features("image", image, 2)
    _checks.features("text", text, (2, 3), dim=image.shape[1])
    _checks.same_device(image=image, text=text)
    backend = _checks.backend_for(backend, image)
    if backend == "torch":
        out = reference.cosine_logits(image, text, scale)
    else:
        flat = _cosine_logits(image, text.reshape(-1, text.shape[-1]), float(scale), backend)
        out = flat.reshape(image.shape[0], *text.shape[:-1])
    return _checks.finite(out, image=image, text=text)
