from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from promptkit.eval import accuracy, calibrate_threshold, fpr_at_95_tpr, metric_estimators, ood_metrics


def oracle_fpr95_id_positive(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    """From sklearn's ROC (ID positive): over thresholds up to the first with full ID recall, the one whose
    TPR is closest to 0.95 (ties: the lowest threshold), read its FPR."""
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    last = int(np.flatnonzero(tpr == 1.0)[0])
    gaps = np.abs(tpr[: last + 1] - 0.95)
    best = max(i for i in range(last + 1) if gaps[i] == gaps.min())
    return float(fpr[best])


def openood_v15(id_s: np.ndarray, ood_s: np.ndarray, seed: int = 0) -> dict[str, float]:
    """OpenOOD v1.5 compute_all_metrics re-derived from its definitions: ``conf`` is ID-high, ``label`` is -1
    for OOD and an ID class >= 0 otherwise; OOD (label -1) is the positive class with score -conf for the ROC
    curve and AUPR-Out, ID with score conf for AUPR-In; FPR95 reads the default (drop_intermediate) ROC curve at
    its first TPR >= 0.95, the AUPRs and AUROC are trapezoids (``auc``) over the sklearn curves."""
    conf = np.r_[id_s, ood_s]
    label = np.r_[np.random.default_rng(seed).integers(0, 10, len(id_s)), np.full(len(ood_s), -1)]
    ood = (label == -1).astype(int)
    fpr, tpr, _ = roc_curve(ood, -conf)
    p_in, r_in, _ = precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = precision_recall_curve(ood, -conf)
    return {"fpr95": float(fpr[np.argmax(tpr >= 0.95)]), "auroc": float(auc(fpr, tpr)),
            "aupr_in": float(auc(r_in, p_in)), "aupr_out": float(auc(r_out, p_out))}


def counts_at_thresholds(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives scoring >= each distinct score, thresholds descending (no sklearn)."""
    t = np.unique(np.r_[pos, neg])[::-1, None]
    return (pos[None, :] >= t).sum(1), (neg[None, :] >= t).sum(1)


def first_principles_ood_positive(id_s: np.ndarray, ood_s: np.ndarray) -> dict[str, float]:
    """The same four numbers from counts alone, pinning the sklearn behaviour OpenOOD relies on: ROC points
    between two equal steps (same TP and FP increments) are dropped, then (0, 0) is prepended; each PR curve gets
    the point (recall 0, precision 1) and is integrated with trapezoids."""
    tp, fp = counts_at_thresholds(-ood_s, -id_s)
    if len(tp) > 2:
        step = np.c_[np.diff(tp), np.diff(fp)]
        keep = np.r_[True, (step[1:] != step[:-1]).any(1), True]
        tp, fp = tp[keep], fp[keep]
    tpr, fpr = np.r_[0, tp] / len(ood_s), np.r_[0, fp] / len(id_s)

    def trapezoid_pr(pos: np.ndarray, neg: np.ndarray) -> float:
        tps, fps = counts_at_thresholds(pos, neg)
        recall, precision = np.r_[0, tps / len(pos)], np.r_[1, tps / (tps + fps)]
        return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))

    return {"fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
            "auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),
            "aupr_in": trapezoid_pr(id_s, ood_s), "aupr_out": trapezoid_pr(-ood_s, -id_s)}


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
    for key, value in openood_v15(id_s, ood_s, seed).items():
        assert m_ood[key] == pytest.approx(value, abs=1e-12), key
    assert m_ood["auroc"] == m["auroc"]  # convention-invariant


def tie_heavy_scores(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Score sets of one kind where estimators disagree most: ties, degenerate and tiny or unbalanced sets."""
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(2, 150, size=2)
    if kind == "tiny":
        n_id, n_ood = rng.integers(1, 4, size=2)
    if kind == "unbalanced":
        n_id, n_ood = (int(rng.integers(200, 400)), int(rng.integers(1, 6)))[:: 1 if seed % 2 else -1]
    id_s, ood_s = rng.normal(0.5, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)
    if kind == "all_equal":
        return np.full(n_id, 0.3), np.full(n_ood, 0.3)
    if kind == "identical":
        return id_s, id_s.copy()
    decimals = {"continuous": None, "round1": 1, "round2": 2}.get(kind, int(rng.integers(0, 2)))
    return (id_s, ood_s) if decimals is None else (np.round(id_s, decimals), np.round(ood_s, decimals))


TIE_HEAVY = ("continuous", "round1", "round2", "all_equal", "identical", "tiny", "unbalanced")


@pytest.mark.parametrize("kind", TIE_HEAVY)
def test_ood_positive_equals_openood_v15(kind: str) -> None:
    for seed in range(40):
        id_s, ood_s = tie_heavy_scores(kind, seed)
        got = ood_metrics(id_s, ood_s, positive="ood")
        assert fpr_at_95_tpr(id_s, ood_s, "ood") == got["fpr95"]
        reference, counted = openood_v15(id_s, ood_s, seed), first_principles_ood_positive(id_s, ood_s)
        for key in ("fpr95", "auroc", "aupr_in", "aupr_out"):
            assert got[key] == pytest.approx(reference[key], abs=1e-12), (kind, seed, key)
            assert counted[key] == pytest.approx(reference[key], abs=1e-12), (kind, seed, key)


@pytest.mark.parametrize("kind", TIE_HEAVY)
def test_id_positive_stays_mcm_on_tie_heavy_sets(kind: str) -> None:
    for seed in range(40):
        id_s, ood_s = tie_heavy_scores(kind, seed)
        y, s = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s]
        m = ood_metrics(id_s, ood_s, positive="id")
        assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12), (kind, seed)
        assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12), (kind, seed)
        assert m["fpr95"] == pytest.approx(oracle_fpr95_id_positive(id_s, ood_s), abs=1e-12), (kind, seed)


def test_ood_positive_all_tied_aupr_is_the_trapezoid_to_recall_zero() -> None:
    # One threshold: precision = share of the positive class at recall 1, joined to (recall 0, precision 1).
    # Average precision would give 0.25 and 0.75 here.
    m = ood_metrics([1.0] * 2, [1.0] * 6, positive="ood")
    assert m["aupr_in"] == pytest.approx((1 + 2 / 8) / 2) and m["aupr_out"] == pytest.approx((1 + 6 / 8) / 2)
    assert m["fpr95"] == 1.0 and m["auroc"] == 0.5
    assert ood_metrics([1.0] * 2, [1.0] * 6)["aupr_in"] == pytest.approx(0.25)


def test_ood_positive_fpr95_reads_the_curve_without_intermediate_points() -> None:
    # Ascending score: 18 OOD at 0, then {OOD, ID} tied at 1 and again at 2, then 18 more ID. The point at 1
    # (19 of 20 OOD caught, 1 ID) lies midway between its neighbours, so roc_curve drops it and the first
    # TPR >= 0.95 is at 2: 2 of 20 ID. The full curve would give 1/20.
    id_s = np.r_[1.0, 2.0, np.arange(3, 21, dtype=float)]
    ood_s = np.r_[np.zeros(18), 1.0, 2.0]
    assert fpr_at_95_tpr(id_s, ood_s, "ood") == pytest.approx(0.10)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(20), np.ones(20)], -np.r_[id_s, ood_s], drop_intermediate=False)
    assert fpr[np.argmax(tpr >= 0.95)] == pytest.approx(0.05)


def test_metric_estimators_name_each_convention() -> None:
    mcm, openood = metric_estimators("id"), metric_estimators("ood")
    assert set(mcm) == set(openood) == set(ood_metrics([1.0], [0.0]))
    assert "fpr_and_fdr_at_recall" in mcm["fpr95"] and "average_precision_score" in mcm["aupr_in"]
    assert "drop_intermediate=True" in openood["fpr95"] and "OpenOOD v1.5" in openood["fpr95"]
    assert all("trapezoid" in openood[k] and "precision_recall_curve" in openood[k] for k in ("aupr_in", "aupr_out"))
    assert mcm["auroc"] == openood["auroc"]
    with pytest.raises(ValueError, match="positive must be 'id' or 'ood'"):
        metric_estimators("both")


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
