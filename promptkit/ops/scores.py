"""OOD scores (higher = more in-distribution): MCM, NegPrompt, LSN and NegLabel.

Each score is a small function of per-row statistics (max, min, logsumexp) of the scaled cosine logits over
contiguous column segments, so every backend computes one fused ``segment_stats`` pass and never stores the
[B, N] probabilities. Scores carry no gradient: their inputs are detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from promptkit.ops import _checks, reference
from promptkit.ops._primitives import primitives


def _stats(image: Tensor, texts: list[Tensor], offsets: list[int], scales: list[float], backend: str):
    """Segment statistics of image [B, D] against the rows of ``texts`` ([n_i, D] each) stacked in order."""
    return primitives(backend).cosine_stats(image, texts, offsets, scales)


def _rows(image: Tensor) -> Tensor:
    return image.new_empty(image.shape[0])


@torch.library.custom_op("promptkit::mcm_score", mutates_args=())
def _mcm_score(image: Tensor, text: Tensor, temperature: float, backend: str) -> Tensor:
    top, _, lse = _stats(image, [text], [0, text.shape[0]], [1.0 / temperature], backend)
    return torch.exp(top[:, 0] - lse[:, 0]).to(image.dtype)


@torch.library.custom_op("promptkit::negprompt_score", mutates_args=())
def _negprompt_score(image: Tensor, pos_text: Tensor, neg_text: Tensor, temperature: float, backend: str) -> Tensor:
    C, N = pos_text.shape[0], pos_text.shape[0] + neg_text.shape[0]
    top, _, lse = _stats(image, [pos_text, neg_text], [0, C, N], [1.0 / temperature] * 2, backend)
    return torch.exp(top[:, 0] - torch.logaddexp(lse[:, 0], lse[:, 1])).to(image.dtype)


@torch.library.custom_op("promptkit::lsn_score", mutates_args=())
def _lsn_score(
    image: Tensor, pos_text: Tensor, neg_text: Tensor, temperature: float, neg_temperature: float, backend: str
) -> Tensor:
    C, K, _ = neg_text.shape
    offsets = [s * C for s in range(K + 2)]
    scales = [1.0 / temperature] + [1.0 / neg_temperature] * K
    # Segments: the positives, then each negative set k (neg_text[:, k]) as contiguous columns.
    top, bottom, lse = _stats(image, [pos_text, *neg_text.unbind(1)], offsets, scales, backend)
    mcm = torch.exp(top[:, 0] - lse[:, 0])
    min_cm = torch.exp(bottom[:, 1:] - lse[:, 1:]).mean(dim=1)
    return (mcm - min_cm).to(image.dtype)


@torch.library.custom_op("promptkit::min_concept_score", mutates_args=())
def _min_concept_score(image: Tensor, neg_text: Tensor, neg_temperature: float, backend: str) -> Tensor:
    C, K, _ = neg_text.shape
    _, bottom, lse = _stats(image, list(neg_text.unbind(1)), [s * C for s in range(K + 1)],
                            [1.0 / neg_temperature] * K, backend)
    return torch.exp(bottom - lse).mean(dim=1).to(image.dtype)


@torch.library.custom_op("promptkit::neglabel_score", mutates_args=())
def _neglabel_score(image: Tensor, id_text: Tensor, grouped_neg: Tensor, temperature: float, groups: int,
                    backend: str) -> Tensor:
    C, per_group = id_text.shape[0], grouped_neg.shape[0] // groups
    offsets = [0] + [C + g * per_group for g in range(groups + 1)]
    _, _, lse = _stats(image, [id_text, grouped_neg], offsets, [1.0 / temperature] * (groups + 1), backend)
    id_lse = lse[:, :1]
    return torch.exp(id_lse - torch.logaddexp(id_lse, lse[:, 1:])).mean(dim=1).to(image.dtype)


for _op in (_mcm_score, _negprompt_score, _lsn_score, _min_concept_score, _neglabel_score):
    _op.register_fake(lambda image, *args: _rows(image))


def _check_inputs(image: Tensor, temperature: float, pos_text: Tensor, neg_text: Tensor | None = None) -> None:
    """Validate image [B, D], pos_text [C, D] and (optionally) class-wise negatives neg_text [C, K, D]."""
    _checks.features("image", image, 2)
    _checks.features("pos_text" if neg_text is not None else "text", pos_text, 2, dim=image.shape[1])
    if neg_text is not None:
        _checks.features("neg_text", neg_text, 3, dim=image.shape[1])
        if neg_text.shape[0] != pos_text.shape[0]:
            raise ValueError(f"neg_text has {neg_text.shape[0]} classes but pos_text has {pos_text.shape[0]}; "
                             "neg_text must be [C, K, D]")
        _checks.same_device(image=image, pos_text=pos_text, neg_text=neg_text)
    else:
        _checks.same_device(image=image, text=pos_text)
    _checks.positive("temperature", temperature)


def _run(backend: str, image: Tensor, inputs: dict[str, Tensor], reference_score: Callable[[], Tensor],
         fused_score: Callable[[str], Tensor]) -> Tensor:
    """The reference score on the torch backend, else the fused op on ``backend``; a NaN or infinite score is
    refused naming the input it came from (``inputs``, by name)."""
    backend = _checks.backend_for(backend, image)
    score = reference_score() if backend == "torch" else fused_score(backend)
    return _checks.finite(score, image=image, **inputs)


def mcm_score(image: Tensor, text: Tensor, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """MCM: max_c softmax_c(cos(image, text_c) / temperature). image [B, D], text [C, D] -> [B]."""
    _check_inputs(image, temperature, text)
    return _run(backend, image, dict(text=text), lambda: reference.mcm_score(image, text, temperature),
                lambda b: _mcm_score(image.detach(), text.detach(), float(temperature), b))


def negprompt_score(
    image: Tensor, pos_text: Tensor, neg_text: Tensor, temperature: float = 1.0, backend: str = "auto"
) -> Tensor:
    """NegPrompt Eq. 3: max over the C positives of one softmax over all C + C*K prompts.

    image [B, D], pos_text [C, D], neg_text [C, K, D] -> [B].
    """
    _check_inputs(image, temperature, pos_text, neg_text)
    neg_flat = neg_text.detach().reshape(-1, neg_text.shape[-1])
    return _run(backend, image, dict(pos_text=pos_text, neg_text=neg_text),
                lambda: reference.negprompt_score(image, pos_text, neg_text, temperature),
                lambda b: _negprompt_score(image.detach(), pos_text.detach(), neg_flat, float(temperature), b))


def lsn_score(
    image: Tensor,
    pos_text: Tensor,
    neg_text: Tensor,
    temperature: float = 1.0,
    neg_temperature: float = 5.0,
    backend: str = "auto",
) -> Tensor:
    """LSN Eq. 13-14: S_MCM(T) - S_MinCM(neg_T), MinCM averaged over the K negative sets.

    image [B, D], pos_text [C, D], neg_text [C, K, D] (K sets of class-wise negatives) -> [B].
    """
    _check_inputs(image, temperature, pos_text, neg_text)
    _checks.positive("neg_temperature", neg_temperature)
    return _run(backend, image, dict(pos_text=pos_text, neg_text=neg_text),
                lambda: reference.lsn_score(image, pos_text, neg_text, temperature, neg_temperature),
                lambda b: _lsn_score(image.detach(), pos_text.detach(), neg_text.detach(), float(temperature),
                                     float(neg_temperature), b))


def min_concept_score(image: Tensor, neg_text: Tensor, neg_temperature: float = 5.0, backend: str = "auto"
                      ) -> Tensor:
    """LSN's S_MinCM term alone, averaged over the K sets: mean_k min_c softmax_c(cos(image, neg_text[c, k]) /
    neg_T), for scores whose MCM term is computed elsewhere (LSN with per-image CoCoOp prompts).

    image [B, D], neg_text [C, K, D] -> [B].
    """
    _checks.features("image", image, 2)
    _checks.features("neg_text", neg_text, 3, dim=image.shape[1])
    _checks.same_device(image=image, neg_text=neg_text)
    _checks.positive("neg_temperature", neg_temperature)
    return _run(backend, image, dict(neg_text=neg_text),
                lambda: reference.min_concept_score(image, neg_text, neg_temperature),
                lambda b: _min_concept_score(image.detach(), neg_text.detach(), float(neg_temperature), b))


def neglabel_score(
    image: Tensor,
    id_text: Tensor,
    neg_text: Tensor,
    temperature: float = 0.01,
    groups: int = 1,
    seed: int = 0,
    backend: str = "auto",
    group_order: str = "drop-then-permute",
) -> Tensor:
    """NegLabel: ID probability mass of the softmax over C ID + M negative labels, averaged over groups.

    With groups > 1 the last M % groups negatives are dropped, the rest permuted by a CPU generator seeded with
    ``seed`` and split into ``groups`` equal groups (NegLabel's released order; ``group_order="permute-then-drop"``
    permutes all M first; see ``reference.neglabel_permutation``).
    image [B, D], id_text [C, D], neg_text [M, D] -> [B].
    """
    _checks.features("image", image, 2)
    _checks.features("id_text", id_text, 2, dim=image.shape[1])
    _checks.features("neg_text", neg_text, 2, dim=image.shape[1])
    _checks.same_device(image=image, id_text=id_text, neg_text=neg_text)
    _checks.positive("temperature", temperature)
    if not 1 <= groups <= neg_text.shape[0]:
        raise ValueError(f"groups must be in [1, M={neg_text.shape[0]}], got {groups}")
    if group_order not in reference.GROUP_ORDERS:
        raise ValueError(f"group_order must be one of {reference.GROUP_ORDERS}, got {group_order!r}")

    def fused(b: str) -> Tensor:
        grouped = neg_text
        if groups > 1:
            grouped = neg_text[reference.neglabel_permutation(neg_text.shape[0], seed, groups, group_order)
                               .to(neg_text.device)]
        return _neglabel_score(image.detach(), id_text.detach(), grouped.detach(), float(temperature), int(groups), b)

    return _run(backend, image, dict(id_text=id_text, neg_text=neg_text),
                lambda: reference.neglabel_score(image, id_text, neg_text, temperature, groups, seed, group_order),
                fused)
