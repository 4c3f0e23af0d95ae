from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from promptkit.eval import accuracy, calibrate_threshold, fpr_at_95_tpr, ood_metrics


def oracle_fpr95_id_positive(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    """From sklearn's ROC (ID positive): over thresholds up to the first with full ID recall, the one whose
    TPR is closest to 0.95 (ties: the lowest threshold), read its FPR."""
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    last = int(np.flatnonzero(tpr == 1.0)[0])
    gaps = np.abs(tpr[: last + 1] - 0.95)
    best = max(i for i in range(last + 1) if gaps[i] == gaps.min())
    return float(fpr[best])


def oracle_fpr95_ood_positive(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    """OpenOOD v1.5: OOD positive on -score, ID-as-OOD rate at the first threshold with OOD TPR >= 0.95."""
    y = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tpr, _ = roc_curve(y, -np.r_[id_s, ood_s], drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


def random_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(5, 200, size=2)
    # coarse quantisation in some draws gives many ties, the case where conventions differ most
    q = [4, 16, 10_000][seed % 3]
    id_s = np.round(rng.normal(1.0, 1.0, n_id) * q) / q
    ood_s = np.round(rng.normal(0.0, 1.0, n_ood) * q) / q
    return id_s, ood_s


@pytest.mark.parametrize("seed", range(12))
def test_against_sklearn_oracles(seed: int) -> None:
    id_s, ood_s = random_scores(seed)
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    m = ood_metrics(id_s, ood_s)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert m["fpr95"] == pytest.approx(oracle_fpr95_id_positive(id_s, ood_s), abs=1e-12)
    m_ood = ood_metrics(id_s, ood_s, positive="ood")
    assert m_ood["fpr95"] == pytest.approx(oracle_fpr95_ood_positive(id_s, ood_s), abs=1e-12)
    assert m_ood["auroc"] == m["auroc"]  # convention-invariant


def test_id_positive_takes_the_closest_recall_not_the_first_above() -> None:
    # ID 1..33: recall 31/33 = 0.939 (threshold 3) is closer to 0.95 than 32/33 = 0.970 (threshold 2).
    # OOD >= 3: only 40 -> 1/3. "First recall >= 0.95" would count 1.5 too -> 2/3.
    id_s = np.arange(1, 34, dtype=float)
    ood_s = np.array([0.5, 1.5, 40.0])
    assert fpr_at_95_tpr(id_s, ood_s, "id") == pytest.approx(1 / 3)


def test_id_positive_ties_go_to_the_lowest_threshold() -> None:
    # ID 1..20: recall 19/20 = 0.95 at thresholds 2 and 1.5 (an OOD score); the lower one counts 1.5, 2.5, 30.
    id_s = np.arange(1, 21, dtype=float)
    ood_s = np.array([0.0, 1.5, 2.5, 30.0])
    assert fpr_at_95_tpr(id_s, ood_s, "id") == pytest.approx(3 / 4)


def test_ood_positive_hand_example() -> None:
    # 20 OOD: 18 at 0, one at 1.5, one at 10. Catching 19 of them (95 %) needs "score <= 1.5",
    # which also rejects ID score 1: 1 of 20 ID -> 0.05. The ID-positive convention gives 2/20 here.
    id_s = np.arange(1, 21, dtype=float)
    ood_s = np.array([0.0] * 18 + [1.5, 10.0])
    assert fpr_at_95_tpr(id_s, ood_s, "ood") == pytest.approx(0.05)
    assert fpr_at_95_tpr(id_s, ood_s, "id") == pytest.approx(0.10)


def test_perfect_and_reversed_separation() -> None:
    good = ood_metrics([3.0, 4.0, 5.0], [0.0, 1.0])
    assert good == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    bad = ood_metrics([0.0, 1.0], [3.0, 4.0], positive="ood")
    assert bad["auroc"] == 0.0 and bad["fpr95"] == 1.0


def test_tensor_and_numpy_inputs_agree() -> None:
    id_s, ood_s = random_scores(5)
    a = ood_metrics(torch.tensor(id_s, dtype=torch.float64), torch.tensor(ood_s, dtype=torch.float64))
    assert a == ood_metrics(id_s, ood_s) == ood_metrics(list(id_s), list(ood_s))


def test_bad_scores() -> None:
    with pytest.raises(ValueError, match="id_scores has 2 NaN and 0 infinite values out of 4"):
        ood_metrics([1.0, float("nan"), 2.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="ood_scores has 0 NaN and 1 infinite"):
        ood_metrics([1.0], [float("inf")])
    with pytest.raises(ValueError, match="ood_scores is empty"):
        ood_metrics([1.0], [])
    with pytest.raises(ValueError, match=r"id_scores must be 1-D, got shape \[2, 1\]"):
        ood_metrics(np.ones((2, 1)), [0.0])
    with pytest.raises(ValueError, match="positive must be 'id' or 'ood'"):
        ood_metrics([1.0], [0.0], positive="both")


def test_accuracy() -> None:
    labels = torch.tensor([0, 2, 1, 1])
    assert accuracy(torch.tensor([0, 2, 0, 1]), labels) == 0.75
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 1], [0, 2, 1], [3, 0, 0]])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([1, 1]), [1, 0]) == 0.5
    with pytest.raises(ValueError, match=r"got \[3\] and \[4\]"):
        accuracy(torch.tensor([0, 1, 2]), labels)


def test_calibrate_threshold() -> None:
    scores = np.arange(1, 101, dtype=float)[::-1].copy()
    assert calibrate_threshold(scores, keep=0.95) == 6.0  # 6..100 are 95 of 100
    assert calibrate_threshold(np.arange(10, dtype=float), keep=0.7) == 3.0  # 3..9 are 7 of 10
    assert calibrate_threshold([2.0, 1.0], keep=1.0) == 1.0
    rng = np.random.default_rng(0)
    for keep in (0.5, 0.9, 0.95, 0.99):
        s = rng.normal(size=333)
        t = calibrate_threshold(torch.tensor(s), keep=keep)
        assert (s >= t).mean() >= keep > (s > t).mean()
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        calibrate_threshold([1.0], keep=0.0)
