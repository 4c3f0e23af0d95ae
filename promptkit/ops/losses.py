"""Prompt-learning losses with gradients to the image and text features.

The cross-entropy parts run on the fused ``xent`` primitive: the forward keeps one logsumexp per row and the
backward rebuilds the gradient of the logits from it, so the [B, N] probabilities are never stored. The GPU
backends also recompute the cosines in the backward; the cpp backend keeps the cosines its BLAS product made
(see ``_primitives.saved_shape``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from promptkit.ops import _checks, reference
from promptkit.ops._primitives import acc_dtype, primitives, saved_shape
from promptkit.abi import XENT_DENSE, XENT_INDEX, XENT_MULTILABEL, XENT_UNIFORM


def _no_grad(like: Tensor) -> Tensor:
    """What a backward op returns for an input that needs no gradient (custom ops cannot return None)."""
    return like.new_empty(0)


def _xent_unit_grads(prim, unit_image, unit_text, scale, kind, labels, targets, lse, saved, grad_rows, need_image,
                     need_text, group=1):
    """Gradients of sum_b grad_rows[b] * loss_b with respect to the unit image and text rows (None where not
    needed: each is one [B, N] x [N or B, D] product, the cost of the backward)."""
    dcos = prim.xent_backward(unit_image, unit_text, scale, kind, labels, targets, lse, grad_rows, saved, group)
    return (dcos @ unit_text.to(dcos.dtype) if need_image else None,
            dcos.T @ unit_image.to(dcos.dtype) if need_text else None)


def _fake_loss(image: Tensor, columns: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(image.dtype)
    return (image.new_empty(()), image.new_empty(image.shape[0], dtype=acc),
            image.new_empty(saved_shape(backend, image.shape[0], columns), dtype=acc))


# Cross-entropy over one text set: the LSN negative loss (index targets) and LAPT's soft cross-entropy (dense).
# Returns (loss, per-row logsumexp, saved) so that the backward can rebuild the gradient without the
# probabilities.

@torch.library.custom_op("promptkit::xent_loss", mutates_args=())
def _xent_loss(image: Tensor, text: Tensor, scale: float, kind: int, labels: Tensor | None,
               targets: Tensor | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    prim = primitives(backend)
    unit_image, _ = prim.l2norm(image)
    unit_text, _ = prim.l2norm(text)
    rows, lse, saved = prim.xent(unit_image, unit_text, scale, kind, labels, targets)
    return rows.mean().to(image.dtype), lse, saved


@torch.library.custom_op("promptkit::xent_loss_backward", mutates_args=())
def _xent_loss_backward(grad: Tensor, image: Tensor, text: Tensor, scale: float, kind: int, labels: Tensor | None,
                        targets: Tensor | None, lse: Tensor, saved: Tensor, need_image: bool, need_text: bool,
                        backend: str) -> tuple[Tensor, Tensor]:
    prim = primitives(backend)
    unit_image, inv_image = prim.l2norm(image)
    unit_text, inv_text = prim.l2norm(text)
    grad_rows = (grad / image.shape[0]).to(lse.dtype).expand(image.shape[0])
    d_image, d_text = _xent_unit_grads(prim, unit_image, unit_text, scale, kind, labels, targets, lse, saved,
                                       grad_rows, need_image, need_text)
    return (prim.l2norm_backward(d_image, unit_image, inv_image).to(image.dtype) if need_image else _no_grad(image),
            prim.l2norm_backward(d_text, unit_text, inv_text).to(text.dtype) if need_text else _no_grad(text))


@_xent_loss.register_fake
def _(image, text, scale, kind, labels, targets, backend):
    return _fake_loss(image, text.shape[0], backend)


@_xent_loss_backward.register_fake
def _(grad, image, text, scale, kind, labels, targets, lse, saved, need_image, need_text, backend):
    return (torch.empty_like(image) if need_image else _no_grad(image),
            torch.empty_like(text) if need_text else _no_grad(text))


def _xent_setup(ctx, inputs, output):
    image, text, scale, kind, labels, targets, backend = inputs
    ctx.save_for_backward(image, text, labels, targets, output[1], output[2])
    ctx.args = (scale, kind, backend)


def _xent_backward(ctx, grad, _grad_lse, _grad_saved):
    image, text, labels, targets, lse, saved = ctx.saved_tensors
    scale, kind, backend = ctx.args
    need_image, need_text = ctx.needs_input_grad[:2]
    d_image, d_text = _xent_loss_backward(grad, image, text, scale, kind, labels, targets, lse, saved, need_image,
                                          need_text, backend)
    return d_image if need_image else None, d_text if need_text else None, None, None, None, None, None


_xent_loss.register_autograd(_xent_backward, setup_context=_xent_setup)


# NegPrompt: L_NIS (the "nis" objective, see reference.negprompt_loss) + beta * L_NPD + gamma * L_NND. The custom
# op takes resolved forms (npd "push"/"pull", nnd "mean"/"pairwise"). L_NIS runs on the fused xent primitive over
# the per-class layout [pos_c, neg_c1 .. neg_cp] ("msp", "oe") or over the negatives alone ("eq4"); L_NPD and
# L_NND are small [C, p, D] reductions done in torch.

_NIS_KINDS = {"msp": XENT_MULTILABEL, "oe": XENT_UNIFORM, "eq4": XENT_UNIFORM}


def _nis_text(unit_pos: Tensor, unit_neg: Tensor, nis: str) -> Tensor:
    """The text rows of L_NIS from the unit positives [C, D] and negatives [C, p, D]."""
    if nis == "eq4":
        return unit_neg.reshape(-1, unit_neg.shape[-1])
    return reference.negprompt_text(unit_pos, unit_neg)


def _nis_columns(neg_text: Tensor, nis: str) -> int:
    C, p, _ = neg_text.shape
    return C * p if nis == "eq4" else C * (1 + p)


def _npd_value(mean_cos: Tensor, nis: str, npd: str) -> Tensor:
    """L_NPD from mean_{c,i} cos(pos_c, neg_ci): "push" -d, "pull" +d (eq4: -mean cos), d = 1 - mean cos."""
    if npd == "push":
        return mean_cos - 1
    return -mean_cos if nis == "eq4" else 1 - mean_cos


@torch.library.custom_op("promptkit::negprompt_loss", mutates_args=())
def _negprompt_loss(image: Tensor, pos_text: Tensor, neg_text: Tensor, labels: Tensor | None, beta: float,
                    gamma: float, temperature: float, nis: str, npd: str, nnd: str,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    prim = primitives(backend)
    C, p, D = neg_text.shape
    unit_image, _ = prim.l2norm(image)
    unit_neg, _ = prim.l2norm(neg_text.reshape(C * p, D))
    unit_pos, _ = prim.l2norm(pos_text)
    unit_neg = unit_neg.reshape(C, p, D)
    nis_rows, lse, saved = prim.xent(unit_image, _nis_text(unit_pos, unit_neg, nis), 1.0 / temperature,
                                  _NIS_KINDS[nis], labels if nis == "msp" else None, None, 1 + p)
    neg_acc, pos_acc = unit_neg.to(lse.dtype), unit_pos.to(lse.dtype)
    l_npd = _npd_value((neg_acc * pos_acc[:, None, :]).sum(dim=-1).mean(), nis, npd)
    if nnd == "mean":
        l_nnd = (neg_acc.mean(dim=1).norm(dim=-1) - 1).mean()
    else:
        l_nnd = prim.ortho(unit_neg, "mean_cos").to(lse.dtype)
    loss = nis_rows.mean() + beta * l_npd + gamma * l_nnd
    return loss.to(image.dtype), lse, saved


@torch.library.custom_op("promptkit::negprompt_loss_backward", mutates_args=())
def _negprompt_loss_backward(grad: Tensor, image: Tensor, pos_text: Tensor, neg_text: Tensor, labels: Tensor | None,
                             lse: Tensor, saved: Tensor, beta: float, gamma: float, temperature: float, nis: str,
                             npd: str, nnd: str, need_image: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    prim = primitives(backend)
    C, p, D = neg_text.shape
    unit_image, inv_image = prim.l2norm(image)
    unit_neg, inv_neg = prim.l2norm(neg_text.reshape(C * p, D))
    unit_pos, inv_pos = prim.l2norm(pos_text)
    grad = grad.to(lse.dtype)
    grad_rows = (grad / image.shape[0]).expand(image.shape[0])
    d_image, d_text = _xent_unit_grads(prim, unit_image, _nis_text(unit_pos, unit_neg.reshape(C, p, D), nis),
                                       1.0 / temperature, _NIS_KINDS[nis], labels if nis == "msp" else None, None,
                                       lse, saved, grad_rows, need_image, True, group=1 + p)
    if nis == "eq4":
        d_neg, d_pos = d_text.reshape(C, p, D), torch.zeros_like(unit_pos, dtype=lse.dtype)
    else:
        d_text = d_text.reshape(C, 1 + p, D)
        d_neg, d_pos = d_text[:, 1:], d_text[:, 0]
    unit_neg3, unit_pos = unit_neg.reshape(C, p, D).to(lse.dtype), unit_pos.to(lse.dtype)
    # d L_NPD / d cos = +1/(C p) for "push" (value mean cos - 1), -1/(C p) for "pull"
    npd_weight = (1 if npd == "push" else -1) * grad * beta / (C * p)
    d_neg = d_neg + npd_weight * unit_pos[:, None, :]
    d_pos = d_pos + npd_weight * unit_neg3.sum(dim=1)
    if nnd == "mean":
        # d ||m_c|| / d u_ci = m_c / (p ||m_c||); 0 where m_c = 0 (the clamp), torch's choice for the norm there
        mean = unit_neg3.mean(dim=1)
        direction = mean / mean.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny)
        d_neg = d_neg + (grad * gamma / (C * p)) * direction[:, None, :]
    else:
        d_neg = d_neg + grad * gamma * prim.ortho_backward(unit_neg.reshape(C, p, D), "mean_cos", 1.0)
    return (prim.l2norm_backward(d_image, unit_image, inv_image).to(image.dtype) if need_image else _no_grad(image),
            prim.l2norm_backward(d_pos, unit_pos, inv_pos).to(pos_text.dtype),
            prim.l2norm_backward(d_neg.reshape(C * p, D), unit_neg, inv_neg).reshape(C, p, D).to(neg_text.dtype))


@_negprompt_loss.register_fake
def _(image, pos_text, neg_text, labels, beta, gamma, temperature, nis, npd, nnd, backend):
    return _fake_loss(image, _nis_columns(neg_text, nis), backend)


@_negprompt_loss_backward.register_fake
def _(grad, image, pos_text, neg_text, labels, lse, saved, beta, gamma, temperature, nis, npd, nnd, need_image,
      backend):
    return (torch.empty_like(image) if need_image else _no_grad(image), torch.empty_like(pos_text),
            torch.empty_like(neg_text))


def _negprompt_setup(ctx, inputs, output):
    image, pos_text, neg_text, labels, beta, gamma, temperature, nis, npd, nnd, backend = inputs
    ctx.save_for_backward(image, pos_text, neg_text, labels, output[1], output[2])
    ctx.args = (beta, gamma, temperature, nis, npd, nnd, backend)


def _negprompt_backward(ctx, grad, _grad_lse, _grad_saved):
    image, pos_text, neg_text, labels, lse, saved = ctx.saved_tensors
    beta, gamma, temperature, nis, npd, nnd, backend = ctx.args
    need_image = ctx.needs_input_grad[0]
    d_image, d_pos, d_neg = _negprompt_loss_backward(grad, image, pos_text, neg_text, labels, lse, saved, beta,
                                                     gamma, temperature, nis, npd, nnd, need_image, backend)
    return (d_image if need_image else None, d_pos, d_neg) + (None,) * 8


_negprompt_loss.register_autograd(_negprompt_backward, setup_context=_negprompt_setup)


def lsn_negative_loss(
    image: Tensor, neg_text: Tensor, labels: Tensor, temperature: float = 0.05, backend: str = "auto"
) -> Tensor:
    """LSN Eq. 5-6: mean_b -log softmax_c((1 - cos(image_b, neg_text_c)) / T)[labels_b].

    image [B, D], neg_text [C, D] (one set of class-wise negative prompts), labels [B] int64 -> scalar.
    """
    _checks.features("image", image, 2)
    _checks.features("neg_text", neg_text, 2, dim=image.shape[1])
    _checks.same_device(image=image, neg_text=neg_text, labels=labels)
    _checks.labels(labels, image.shape[0], neg_text.shape[0])
    _checks.positive("temperature", temperature)
    backend = _checks.backend_for(backend, image)
    if backend == "torch":
        loss = reference.lsn_negative_loss(image, neg_text, labels, temperature)
    else:
        # (1 - cos) / T is -cos / T up to a per-row constant, which the cross-entropy ignores.
        loss = _xent_loss(image, neg_text, -1.0 / temperature, XENT_INDEX, labels, None, backend)[0]
    return _checks.finite(loss, image=image, neg_text=neg_text)


def negprompt_loss(
    image: Tensor,
    pos_text: Tensor,
    neg_text: Tensor,
    beta: float = 0.1,
    gamma: float = 0.05,
    temperature: float = 0.01,
    backend: str = "auto",
    *,
    nis: str = "msp",
    labels: Tensor | None = None,
    npd: str = "auto",
    nnd: str = "auto",
) -> Tensor:
    """NegPrompt's stage-2 loss L_NIS + beta * L_NPD + gamma * L_NND (the forms: ``reference.negprompt_loss``).

    ``nis``: "msp" (the released code's multi-label soft margin over all C (1 + p) prompts; needs ``labels``),
    "oe" (its uniform cross-entropy over all prompts) or "eq4" (the paper's Eq. 4 over the negatives only, which
    is degenerate: collapsing every negative onto one vector reaches its minimum). ``npd``: "auto", "push" or
    "pull"; ``nnd``: "auto", "mean" or "pairwise"; "auto" follows the ``nis`` branch as the released code does.
    ``labels`` is used by "msp" only. beta = 0.1 and gamma = 0.05 are the released scripts' distance_weight and
    nega_nega_weight; temperature 0.01 is CLIP's logit scale 100.
    image [B, D], pos_text [C, D], neg_text [C, p, D], labels [B] int64 in [0, C) -> scalar.
    """
    _checks.features("image", image, 2)
    _checks.features("pos_text", pos_text, 2, dim=image.shape[1])
    _checks.features("neg_text", neg_text, 3, dim=image.shape[1])
    if neg_text.shape[0] != pos_text.shape[0]:
        raise ValueError(f"neg_text has {neg_text.shape[0]} classes but pos_text has {pos_text.shape[0]}")
    for name, value, allowed in (("nis", nis, reference.NEGPROMPT_NIS), ("npd", npd, reference.NEGPROMPT_NPD),
                                 ("nnd", nnd, reference.NEGPROMPT_NND)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if nis == "msp":
        if labels is None:
            raise ValueError("nis='msp' needs labels: the int64 [B] class of each image")
        _checks.labels(labels, image.shape[0], pos_text.shape[0])
        _checks.same_device(image=image, pos_text=pos_text, neg_text=neg_text, labels=labels)
    else:
        labels = None
        _checks.same_device(image=image, pos_text=pos_text, neg_text=neg_text)
    _checks.positive("temperature", temperature)
    npd, nnd = reference.negprompt_forms(nis, npd, nnd)
    backend = _checks.backend_for(backend, image)
    if backend == "torch":
        loss = reference.negprompt_loss(image, pos_text, neg_text, beta, gamma, temperature, nis=nis, labels=labels,
                                        npd=npd, nnd=nnd)
    else:
        loss = _negprompt_loss(image, pos_text, neg_text, labels, float(beta), float(gamma), float(temperature), nis,
                               npd, nnd, backend)[0]
    return _checks.finite(loss, image=image, pos_text=pos_text, neg_text=neg_text)


def soft_cross_entropy(
    image: Tensor, text: Tensor, targets: Tensor, scale: float = 100.0, backend: str = "auto"
) -> Tensor:
    """mean_b sum_n -targets[b, n] log softmax(scale * cos(image_b, text))_n (LAPT's loss).

    image [B, D], text [N, D], targets [B, N] (rows of label weights, e.g. mixed one-hots) -> scalar.
    """
    _checks.features("image", image, 2)
    _checks.features("text", text, 2, dim=image.shape[1])
    _checks.features("targets", targets, 2)
    if targets.shape != (image.shape[0], text.shape[0]):
        raise ValueError(f"targets must be [B={image.shape[0]}, N={text.shape[0]}], got {tuple(targets.shape)}")
    _checks.same_device(image=image, text=text, targets=targets)
    backend = _checks.backend_for(backend, image)
    if backend == "torch":
        loss = reference.soft_cross_entropy(image, text, targets, scale)
    else:
        loss = _xent_loss(image, text, float(scale), XENT_DENSE, None, targets, backend)[0]
    return _checks.finite(loss, image=image, text=text, targets=targets)
