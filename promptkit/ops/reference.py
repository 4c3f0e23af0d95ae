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


def lsn_score(
    image: Tensor, pos_text: Tensor, neg_text: Tensor, temperature: float = 1.0, neg_temperature: float = 5.0
) -> Tensor:
    """LSN Eq. 13-14: S_MCM - S_MinCM, MinCM averaged over the K negative sets.

    S_MinCM^k = min_c softmax_c(cos(image, neg_text[c, k]) / neg_temperature).
    image [B, D], pos_text [C, D], neg_text [C, K, D] -> [B].
    """
    mcm = mcm_score(image, pos_text, temperature)
    min_cm = torch.stack(
        [
            torch.softmax(_cos(image, neg_text[:, k]) / neg_temperature, dim=-1).amin(dim=-1)
            for k in range(neg_text.shape[1])
        ]
    ).mean(dim=0)
    return mcm - min_cm


def neglabel_permutation(num_negatives: int, seed: int) -> Tensor:
    """The column order NegLabel's grouping uses: a CPU permutation seeded by ``seed`` (device independent)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(num_negatives, generator=generator)


def neglabel_score(
    image: Tensor, id_text: Tensor, neg_text: Tensor, temperature: float = 0.01, groups: int = 1, seed: int = 0
) -> Tensor:
    """NegLabel: ID probability mass of softmax over C ID + M negative labels, averaged over groups.

    With groups > 1 the negatives are permuted (``neglabel_permutation``), the last M % groups dropped and the
    rest split into ``groups`` equal groups; each group's ID mass is computed against the ID labels alone.
    image [B, D], id_text [C, D], neg_text [M, D] -> [B].
    """
    id_logits = _cos(image, id_text) / temperature
    if groups > 1:
        neg_text = neg_text[neglabel_permutation(neg_text.shape[0], seed).to(neg_text.device)]
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


def negprompt_loss(
    image: Tensor,
    pos_text: Tensor,
    neg_text: Tensor,
    beta: float = 0.1,
    gamma: float = 0.05,
    temperature: float = 0.01,
) -> Tensor:
    """NegPrompt Eq. 4-7: L_NIS + beta * L_NPD + gamma * L_NND.

    L_NIS: cross-entropy of a uniform target over the C*K negative prompts against softmax(cos / T) over them.
    L_NPD = -(1/(C K)) sum_{c,k} cos(neg[c, k], pos[c]) (negatives stay near their class).
    L_NND = (1/(C K (K-1))) sum_c sum_{i != j} cos(neg[c, i], neg[c, j]) (a class's negatives spread apart).
    image [B, D], pos_text [C, D], neg_text [C, K, D] -> scalar.
    """
    C, K, D = neg_text.shape
    neg_logits = _cos(image, neg_text.reshape(C * K, D)) / temperature
    nis = -(torch.log_softmax(neg_logits, dim=-1).mean(dim=-1)).mean()
    neg_unit, pos_unit = _unit(neg_text), _unit(pos_text)
    npd = -(neg_unit * pos_unit[:, None, :]).sum(dim=-1).mean()
    nnd = orthogonality_loss(neg_text, mode="mean_cos")
    return nis + beta * npd + gamma * nnd


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
