"""Plain-PyTorch version of every op: the test oracle and the fallback backend.

Written for clarity, not speed: each function follows the paper's equation step by step and lets torch's
autograd provide the gradients. Inputs are validated by the public functions in ``promptkit.ops``; these
functions assume valid shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def _cos(image: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of every image row to every text row: [B, D] x [N, D] -> [B, N]."""
    return _unit(image) @ _unit(text).T


def cosine_logits(image: Tensor, text: Tensor, scale: float = 1.0) -> Tensor:
    """scale * cos(image, text): image [B, D], text [N, D] or [C, K, D] -> [B, N] or [B, C, K]."""
    flat = text.reshape(-1, text.shape[-1])
    return (scale * _cos(image, flat)).reshape(image.shape[0], *text.shape[:-1])


def mcm_score(image: Tensor, text: Tensor, temperature: float = 1.0) -> Tensor:
    """MCM (Ming et al. 2022): max_c softmax_c(cos / T). image [B, D], text [C, D] -> [B]."""
    return torch.softmax(_cos(image, text) / temperature, dim=-1).amax(dim=-1)


def negprompt_score(image: Tensor, pos_text: Tensor, neg_text: Tensor, temperature: float = 1.0) -> Tensor:
    """NegPrompt Eq. 3: max over the C positives of one softmax over C + C*K logits.

    image [B, D], pos_text [C, D], neg_text [C, K, D] -> [B].
    """
    C = pos_text.shape[0]
    logits = _cos(image, torch.cat([pos_text, neg_text.reshape(-1, neg_text.shape[-1])])) / temperature
    return torch.softmax(logits, dim=-1)[:, :C].amax(dim=-1)


def min_concept_score(image: Tensor, neg_text: Tensor, neg_temperature: float = 5.0) -> Tensor:
    """LSN's S_MinCM averaged over the K negative sets: mean_k min_c softmax_c(cos(image, neg_text[c, k]) / neg_T).

    image [B, D], neg_text [C, K, D] -> [B].
    """
    return torch.stack(
        [
            torch.softmax(_cos(image, neg_text[:, k]) / neg_temperature, dim=-1).amin(dim=-1)
            for k in range(neg_text.shape[1])
        ]
    ).mean(dim=0)


def lsn_score(
    image: Tensor, pos_text: Tensor, neg_text: Tensor, temperature: float = 1.0, neg_temperature: float = 5.0
) -> Tensor:
    """LSN Eq. 13-14: S_MCM - S_MinCM (``min_concept_score``). image [B, D], pos_text [C, D], neg_text [C, K, D]
    -> [B]."""
    return mcm_score(image, pos_text, temperature) - min_concept_score(image, neg_text, neg_temperature)


GROUP_ORDERS = ("drop-then-permute", "permute-then-drop")


def neglabel_permutation(num_negatives: int, seed: int, groups: int = 1,
                         order: str = "drop-then-permute") -> Tensor:
    """The negatives NegLabel's grouping keeps, in group order: indices [groups * (M // groups)] into the M labels.

    "drop-then-permute" (NegLabel's released ``grouping``): drop the last M % groups labels, then permute the rest;
    "permute-then-drop": permute all M, then keep the first groups * (M // groups). The permutation comes from a
    CPU generator seeded by ``seed``, so it is the same on every device (the released code draws it on the GPU).
    """
    kept = (num_negatives // groups) * groups
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if order == "drop-then-permute":
        return torch.randperm(kept, generator=generator)
    return torch.randperm(num_negatives, generator=generator)[:kept]


def neglabel_score(
    image: Tensor, id_text: Tensor, neg_text: Tensor, temperature: float = 0.01, groups: int = 1, seed: int = 0,
    group_order: str = "drop-then-permute",
) -> Tensor:
    """NegLabel: ID probability mass of softmax over C ID + M negative labels, averaged over groups.

    With groups > 1 the negatives kept by ``neglabel_permutation`` are split into ``groups`` equal groups in that
    order; each group's ID mass is computed against the ID labels alone.
    image [B, D], id_text [C, D], neg_text [M, D] -> [B].
    """
    id_logits = _cos(image, id_text) / temperature
    if groups > 1:
        neg_text = neg_text[neglabel_permutation(neg_text.shape[0], seed, groups, group_order).to(neg_text.device)]
    per_group = neg_text.shape[0] // groups
    masses = []
    for g in range(groups):
        neg_logits = _cos(image, neg_text[g * per_group : (g + 1) * per_group]) / temperature
        probs = torch.softmax(torch.cat([id_logits, neg_logits], dim=-1), dim=-1)
        masses.append(probs[:, : id_text.shape[0]].sum(dim=-1))
    return torch.stack(masses).mean(dim=0)


def lsn_negative_loss(image: Tensor, neg_text: Tensor, labels: Tensor, temperature: float = 0.05) -> Tensor:
    """LSN Eq. 5-6: -log p^-(y | x), p^-_c = softmax_c((1 - cos(image, neg_text[c])) / T), batch mean.

    image [B, D], neg_text [C, D], labels [B] int64 -> scalar.
    """
    logits = (1.0 - _cos(image, neg_text)) / temperature
    return F.cross_entropy(logits, labels)


# NegPrompt's objectives: the L_NIS term ("nis") and the forms of L_NPD and L_NND that each one goes with.
NEGPROMPT_NIS = ("msp", "oe", "eq4")
NEGPROMPT_NPD = ("auto", "push", "pull")
NEGPROMPT_NND = ("auto", "mean", "pairwise")
_NEGPROMPT_AUTO = {"msp": ("push", "mean"), "oe": ("pull", "mean"), "eq4": ("pull", "pairwise")}


def negprompt_forms(nis: str, npd: str = "auto", nnd: str = "auto") -> tuple[str, str]:
    """The (npd, nnd) forms that ``nis`` trains with, "auto" resolved as the released code (msp, oe) and the paper
    (eq4) pair them."""
    auto_npd, auto_nnd = _NEGPROMPT_AUTO[nis]
    return (auto_npd if npd == "auto" else npd), (auto_nnd if nnd == "auto" else nnd)


def negprompt_text(pos_text: Tensor, neg_text: Tensor) -> Tensor:
    """All C * (1 + p) prompts laid out per class as the released code does: [pos_c, neg_c1 .. neg_cp] for each c,
    so class c's prompts are the columns n with n // (1 + p) == c. pos_text [C, D], neg_text [C, p, D]."""
    C, p, D = neg_text.shape
    return torch.cat([pos_text[:, None], neg_text], dim=1).reshape(C * (1 + p), D)


def negprompt_loss(
    image: Tensor,
    pos_text: Tensor,
    neg_text: Tensor,
    beta: float = 0.1,
    gamma: float = 0.05,
    temperature: float = 0.01,
    *,
    nis: str = "msp",
    labels: Tensor | None = None,
    npd: str = "auto",
    nnd: str = "auto",
) -> Tensor:
    """NegPrompt's stage-2 loss L_NIS + beta * L_NPD + gamma * L_NND, z = cos / T.

    L_NIS by ``nis``:
      "msp" (the released code's default, core/train_clip.py): multi-label soft margin over all C (1 + p) logits
        laid out per class (``negprompt_text``), target 1 on the image's class positive and its p negatives:
        (1/N) sum_n [softplus(z_n) - y_n z_n], N = C (1 + p), batch mean. Needs ``labels``.
      "oe" (the released code's OE branch): cross-entropy of a uniform target over all C (1 + p) logits.
      "eq4" (the paper's Eq. 4): cross-entropy of a uniform target over the C p negative logits only. Degenerate:
        collapsing every negative onto one common vector reaches its global minimum log(C p) for any vector, so
        nothing pushes the negatives away from the ID images.
    L_NPD with d = mean_{c,i} (1 - cos(pos_c, neg_ci)) by ``npd`` (auto: "push" for msp, "pull" otherwise):
      "push": -d (the negatives move away from their positive: the released MSP branch);
      "pull": +d for msp and oe (the released OE branch), -mean cos = d - 1 for eq4 (the paper's Eq. 5): the same
        gradient, the value of each source.
    L_NND by ``nnd`` (auto: "mean" for msp and oe, "pairwise" for eq4):
      "mean" (the released code): (1/C) sum_c (||m_c|| - 1), m_c = mean_i of class c's unit negatives;
      "pairwise" (the paper's Eq. 6): ``orthogonality_loss(neg_text, "mean_cos")``.
    The released stage-2 loss also adds 1e-8 * the cross-entropy of the positives, which has no gradient (the
    positives are frozen); it is left out.
    image [B, D], pos_text [C, D], neg_text [C, p, D], labels [B] int64 in [0, C) (used by "msp") -> scalar.
    """
    npd, nnd = negprompt_forms(nis, npd, nnd)
    C, p, D = neg_text.shape
    if nis == "eq4":
        neg_logits = _cos(image, neg_text.reshape(C * p, D)) / temperature
        l_nis = -(torch.log_softmax(neg_logits, dim=-1).mean(dim=-1)).mean()
    else:
        logits = _cos(image, negprompt_text(pos_text, neg_text)) / temperature
        if nis == "msp":
            classes = torch.arange(C * (1 + p), device=logits.device) // (1 + p)
            targets = (classes[None, :] == labels[:, None]).to(logits.dtype)
            l_nis = F.multilabel_soft_margin_loss(logits, targets)
        else:
            l_nis = -(torch.log_softmax(logits, dim=-1).mean(dim=-1)).mean()
    neg_unit, pos_unit = _unit(neg_text), _unit(pos_text)
    mean_cos = (neg_unit * pos_unit[:, None, :]).sum(dim=-1).mean()
    if npd == "push":
        l_npd = -(1 - mean_cos)
    else:
        l_npd = -mean_cos if nis == "eq4" else 1 - mean_cos
    if nnd == "mean":
        l_nnd = (neg_unit.mean(dim=1).norm(dim=-1) - 1).mean()
    else:
        l_nnd = orthogonality_loss(neg_text, mode="mean_cos")
    return l_nis + beta * l_npd + gamma * l_nnd


def orthogonality_loss(prompts: Tensor, mode: str = "abs_sum") -> Tensor:
    """Orthogonality of the K prompt features of each class. prompts [C, K, D] -> scalar.

    "abs_sum" (LSN Eq. 7): sum over classes and pairs i < j of |cos|.
    "mean_cos" (NegPrompt Eq. 6): mean over classes and ordered pairs i != j of cos (0 when K == 1).
    """
    C, K, _ = prompts.shape
    unit = _unit(prompts)
    gram = unit @ unit.transpose(1, 2)  # [C, K, K]
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=prompts.device)
    if mode == "abs_sum":
        return gram.abs()[:, off_diagonal].sum() / 2
    if K == 1:
        return gram.sum() * 0
    return gram[:, off_diagonal].sum() / (C * K * (K - 1))


def soft_cross_entropy(image: Tensor, text: Tensor, targets: Tensor, scale: float = 100.0) -> Tensor:
    """Cross-entropy of soft targets against softmax(scale * cos), batch mean (LAPT).

    image [B, D], text [N, D], targets [B, N] -> scalar.
    """
    log_probs = torch.log_softmax(scale * _cos(image, text), dim=-1)
    return -(targets * log_probs).sum(dim=-1).mean()


def mix_features(a: Tensor, b: Tensor, lam: Tensor | float) -> Tensor:
    """L2-normalised lam * a + (1 - lam) * b. a, b [B, D]; lam a float or [B] -> [B, D]."""
    if isinstance(lam, Tensor):
        lam = lam.to(a.dtype).reshape(-1, 1)
    return _unit(lam * a + (1 - lam) * b)
