"""OOD detection metrics: AUROC, AUPR-In, AUPR-Out, FPR at 95 % TPR (two conventions), accuracy.

Scores are "higher = more in-distribution". All results are fractions in [0, 1].

FPR95 conventions (``positive=``):
- ``"id"`` (MCM, LoCoOp, NegLabel, LSN, NegPrompt tables): ID is the positive class. Over the distinct score
  thresholds down to the first one with full ID recall, take the one whose ID recall is closest to 0.95 and
  report the fraction of OOD samples scoring at or above it. Ties go to the lowest threshold, as in those
  repositories' code: several thresholds share a recall when OOD scores fall between two ID scores.
- ``"ood"`` (OpenOOD v1.5, OpenOOD-VLM, so LAPT): OOD is the positive class with score -S. At the first
  threshold where at least 95 % of OOD samples are caught, report the fraction of ID samples flagged OOD.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor

Positive = Literal["id", "ood"]
RECALL_LEVEL = 0.95


def as_scores(x: Tensor | ArrayLike, name: str) -> np.ndarray:
    """``x`` as a 1-D float64 numpy array; ValueError if it is empty, not 1-D, or holds NaN / inf."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    if n_nan or n_inf:
        raise ValueError(f"{name} has {n_nan} NaN and {n_inf} infinite values out of {arr.size}")
    return arr


def _fpr95_id_positive(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    scores = np.concatenate([id_s, ood_s])
    is_id = np.concatenate([np.ones(len(id_s), dtype=np.int64), np.zeros(len(ood_s), dtype=np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, is_id = scores[order], is_id[order]
    # One point per distinct threshold: the last position of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(is_id)[last]
    fp = (last + 1) - tp
    recall = tp / tp[-1]
    full = int(np.searchsorted(tp, tp[-1]))  # thresholds past the first one reaching full recall are not candidates
    gap = np.abs(recall[: full + 1] - RECALL_LEVEL)
    best = full - int(np.argmin(gap[::-1]))  # reversed so that ties go to the lowest threshold
    return float(fp[best] / len(ood_s))


def _fpr95_ood_positive(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    # OOD score -S, thresholds descending in -S = ascending in S.
    scores = np.concatenate([id_s, ood_s])
    is_ood = np.concatenate([np.zeros(len(id_s), dtype=np.int64), np.ones(len(ood_s), dtype=np.int64)])
    order = np.argsort(scores, kind="stable")
    scores, is_ood = scores[order], is_ood[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(is_ood)[last]
    fp = (last + 1) - tp
    first = int(np.argmax(tp / len(ood_s) >= RECALL_LEVEL))
    return float(fp[first] / len(id_s))


def fpr_at_95_tpr(id_scores: Tensor | ArrayLike, ood_scores: Tensor | ArrayLike, positive: Positive = "id") -> float:
    """FPR at 95 % TPR under the ``positive`` convention (see the module docstring). ``[N_id]``, ``[N_ood]`` in."""
    id_s, ood_s = as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")
    if positive == "id":
        return _fpr95_id_positive(id_s, ood_s)
    if positive == "ood":
        return _fpr95_ood_positive(id_s, ood_s)
    raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")


def ood_metrics(
    id_scores: Tensor | ArrayLike, ood_scores: Tensor | ArrayLike, positive: Positive = "id"
) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR95 of ID scores ``[N_id]`` against OOD scores ``[N_ood]``.

    Higher score = more ID. AUROC is ``roc_auc_score`` with ID = 1 (the same in both conventions); AUPR-In is
    ``average_precision_score`` with ID positive on S, AUPR-Out with OOD positive on -S; ``fpr95`` follows
    ``positive``.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}``, fractions in [0, 1].
    """
    id_s, ood_s = as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")
    scores = np.concatenate([id_s, ood_s])
    is_id = np.concatenate([np.ones(len(id_s)), np.zeros(len(ood_s))])
    return {
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
        "fpr95": fpr_at_95_tpr(id_s, ood_s, positive),
    }


def accuracy(pred: Tensor | ArrayLike, labels: Tensor | ArrayLike) -> float:
    """Top-1 accuracy: ``pred`` is ``[N]`` predicted classes or ``[N,C]`` scores (argmax), ``labels`` ``[N]``."""
    p = torch.as_tensor(np.asarray(pred)) if not isinstance(pred, Tensor) else pred.detach().cpu()
    y = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, Tensor) else labels.detach().cpu()
    if p.ndim == 2:
        p = p.argmax(dim=1)
    if p.ndim != 1 or y.ndim != 1 or len(p) != len(y):
        raise ValueError(f"accuracy: pred [N] or [N,C] and labels [N] needed, got {list(p.shape)} and {list(y.shape)}")
    if len(y) == 0:
        raise ValueError("accuracy: no samples")
    return float((p.long() == y.long()).double().mean())


def calibrate_threshold(id_scores: Tensor | ArrayLike, keep: float = 0.95) -> float:
    """The score threshold that keeps ``keep`` of held-out ID samples: at least that fraction scores >= it.

    It is the ceil(keep * N)-th highest ID score ``[N]``, so an image is called ID when its score >= the result.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"calibrate_threshold: keep must be in (0, 1], got {keep}")
    s = np.sort(as_scores(id_scores, "id_scores"))[::-1]
    k = max(1, math.ceil(keep * len(s) - 1e-9))  # tolerance: 0.7 * 10 is 7.000000000000001 in floats
    return float(s[k - 1])
