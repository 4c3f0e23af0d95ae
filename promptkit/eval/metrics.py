"""OOD detection metrics: AUROC, AUPR-In, AUPR-Out, FPR at 95 % TPR (two conventions), accuracy.

Scores are "higher = more in-distribution" (S). All results are fractions in [0, 1].

Conventions (``positive=``) choose the FPR95 and AUPR estimators, each matching its papers' code exactly:
- ``"id"`` (MCM, LoCoOp, NegLabel, LSN, NegPrompt tables): ID is the positive class.
  FPR95 is MCM's ``fpr_and_fdr_at_recall``: over the distinct score thresholds down to the first one with full
  ID recall, take the one whose ID recall is closest to 0.95 and report the fraction of OOD samples scoring at or
  above it. Ties go to the lowest threshold, as in those repositories' code: several thresholds share a recall
  when OOD scores fall between two ID scores. AUPR-In / AUPR-Out are ``average_precision_score`` with ID positive
  on S / OOD positive on -S.
- ``"ood"`` (OpenOOD v1.5 ``compute_all_metrics``, OpenOOD-VLM, so LAPT): OOD is the positive class with score
  -S. FPR95 is the FPR of ``roc_curve`` (default ``drop_intermediate=True``) at its first point with TPR >= 0.95;
  dropping collinear points matters on tied scores. AUPR-In / AUPR-Out are the trapezoid area (``auc``) under
  ``precision_recall_curve`` with ID positive on S / OOD positive on -S.
AUROC is ``roc_auc_score`` in both: the area under the ROC curve does not depend on which class is positive.
``metric_estimators`` names the estimator of each number, for reports.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from torch import Tensor

Positive = Literal["id", "ood"]
RECALL_LEVEL = 0.95

_AUROC = "roc_auc_score, ID positive on S (the same area as OpenOOD's auc over roc_curve)"
_ESTIMATORS: dict[str, dict[str, str]] = {
    "id": {
        "auroc": _AUROC,
        "aupr_in": "average_precision_score, ID positive on S (MCM)",
        "aupr_out": "average_precision_score, OOD positive on -S (MCM)",
        "fpr95": "MCM fpr_and_fdr_at_recall: ID positive on S, threshold with ID recall closest to 0.95 "
                 "(ties: the lowest), fraction of OOD at or above it",
    },
    "ood": {
        "auroc": _AUROC,
        "aupr_in": "OpenOOD v1.5 compute_all_metrics: auc (trapezoid) over precision_recall_curve, ID positive on S",
        "aupr_out": "OpenOOD v1.5 compute_all_metrics: auc (trapezoid) over precision_recall_curve, "
                    "OOD positive on -S",
        "fpr95": "OpenOOD v1.5 compute_all_metrics: roc_curve(drop_intermediate=True), OOD positive on -S, "
                 "FPR at the first TPR >= 0.95",
    },
}


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
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    # roc_curve's default drop_intermediate=True is part of OpenOOD's definition: on ties it can drop the first
    # point reaching 0.95, moving the answer to the next kept one.
    fpr, tpr, _ = roc_curve(is_ood, -np.r_[id_s, ood_s])
    return float(fpr[np.argmax(tpr >= RECALL_LEVEL)])


def _trapezoid_aupr(positive: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(positive, scores)
    return float(auc(recall, precision))


def _check_positive(positive: str) -> None:
    if positive not in _ESTIMATORS:
        raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")


def metric_estimators(positive: Positive = "id") -> dict[str, str]:
    """What each ``ood_metrics`` key is under the ``positive`` convention: ``{"auroc", "aupr_in", "aupr_out",
    "fpr95"}`` mapped to a one-line description of its estimator (see the module docstring)."""
    _check_positive(positive)
    return dict(_ESTIMATORS[positive])


def fpr_at_95_tpr(id_scores: Tensor | ArrayLike, ood_scores: Tensor | ArrayLike, positive: Positive = "id") -> float:
    """FPR at 95 % TPR under the ``positive`` convention (see the module docstring). ``[N_id]``, ``[N_ood]`` in."""
    _check_positive(positive)
    id_s, ood_s = as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")
    return _fpr95_id_positive(id_s, ood_s) if positive == "id" else _fpr95_ood_positive(id_s, ood_s)


def ood_metrics(
    id_scores: Tensor | ArrayLike, ood_scores: Tensor | ArrayLike, positive: Positive = "id"
) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR95 of ID scores ``[N_id]`` against OOD scores ``[N_ood]``.

    Higher score = more ID. AUROC is ``roc_auc_score`` with ID = 1 (the same in both conventions); AUPR-In (ID
    positive on S), AUPR-Out (OOD positive on -S) and ``fpr95`` use the estimators of ``positive``: MCM's for
    "id", OpenOOD v1.5's for "ood" (the module docstring; ``metric_estimators`` names them).

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}``, fractions in [0, 1].
    """
    _check_positive(positive)
    id_s, ood_s = as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")
    scores = np.concatenate([id_s, ood_s])
    is_id = np.concatenate([np.ones(len(id_s)), np.zeros(len(ood_s))])
    aupr = average_precision_score if positive == "id" else _trapezoid_aupr
    return {
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(aupr(is_id, scores)),
        "aupr_out": float(aupr(1 - is_id, -scores)),
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
