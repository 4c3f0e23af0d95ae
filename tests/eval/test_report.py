from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from promptkit.eval import (fpr_at_95_tpr, markdown_table, metric_estimators, ood_metrics, plot_histograms, plot_roc,
                            summarize, write_json)


@pytest.fixture
def scores() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return rng.normal(1, 1, 300), {"near": rng.normal(0.5, 1, 200), "far": rng.normal(-1, 1, 100)}


@pytest.mark.parametrize("positive, companion", [("id", "fpr95_ood_positive"), ("ood", "fpr95_id_positive")])
def test_summarize(scores, positive: str, companion: str) -> None:
    id_s, ood = scores
    other = "ood" if positive == "id" else "id"
    out = summarize(id_s, ood, positive)
    assert out["fpr_positive"] == positive and list(out["ood"]) == ["near", "far"]
    for name, s in ood.items():
        expected = {**ood_metrics(id_s, s, positive), companion: fpr_at_95_tpr(id_s, s, other)}
        assert out["ood"][name] == expected
    for key, value in out["mean"].items():
        assert value == pytest.approx((out["ood"]["near"][key] + out["ood"]["far"][key]) / 2)
    assert set(out["mean"]) == {"auroc", "aupr_in", "aupr_out", "fpr95", companion}
    # every number is labelled: this convention's estimators, and the other convention's FPR95 for the companion
    assert out["estimators"] == {**metric_estimators(positive), companion: metric_estimators(other)["fpr95"]}
    assert ("OpenOOD v1.5" in out["estimators"]["fpr95"]) == (positive == "ood")
    assert ("OpenOOD v1.5" in out["estimators"][companion]) == (positive == "id")


def test_summarize_rejects_nan_naming_the_set(scores) -> None:
    id_s, ood = scores
    ood["far"][3] = np.nan
    with pytest.raises(ValueError, match=r"ood_scores\['far'\] has 1 NaN"):
        summarize(id_s, ood)


def test_markdown_table_exact() -> None:
    results = {
        "method": "lsn",
        "id_accuracy": 0.7234,
        "fpr_positive": "id",
        "ood": {"iNaturalist": {"auroc": 0.94612, "fpr95": 0.30944, "aupr_in": 0.9, "aupr_out": 0.81236},
                "SUN": {"auroc": 0.5, "fpr95": 1.0, "aupr_in": 0.123456, "aupr_out": 0.0}},
        "mean": {"auroc": 0.72306, "fpr95": 0.65472, "aupr_in": 0.511728, "aupr_out": 0.40618},
    }
    assert markdown_table(results) == (
        "| Method | OOD set | FPR95 (ID pos.) ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ | ID acc ↑ |\n"
        "|---|---|--:|--:|--:|--:|--:|\n"
        "| lsn | iNaturalist | 30.94 | 94.61 | 90.00 | 81.24 |  |\n"
        "| lsn | SUN | 100.00 | 50.00 | 12.35 | 0.00 |  |\n"
        "| lsn | Mean | 65.47 | 72.31 | 51.17 | 40.62 | 72.34 |\n"
    )


def test_markdown_table_several_methods(scores) -> None:
    id_s, ood = scores
    a = {"method": "mcm", **summarize(id_s, ood, "ood")}
    b = {"method": "lapt", "id_accuracy": None, **summarize(id_s + 1, ood, "ood")}
    table = markdown_table([a, b])
    lines = table.splitlines()
    assert "FPR95 (OOD pos.)" in lines[0] and len(lines) == 2 + 2 * 3
    assert lines[4].startswith("| mcm | Mean | ") and lines[4].endswith(" |  |")
    near = b["ood"]["near"]
    pct = [f"{100 * near[k]:.2f}" for k in ("fpr95", "auroc", "aupr_in", "aupr_out")]
    assert lines[5] == f"| lapt | near | {' | '.join(pct)} |  |"
    with pytest.raises(ValueError, match="mix FPR95 conventions"):
        markdown_table([a, {**b, "fpr_positive": "id"}])


def test_write_json_round_trip(tmp_path: Path, scores) -> None:
    id_s, ood = scores
    results = {"method": "mcm", "id_accuracy": np.float32(0.5), "labels": torch.tensor([1, 2]),
               "array": np.arange(3), **summarize(id_s, ood)}
    path = write_json(tmp_path / "out" / "results.json", results)
    loaded = json.loads(path.read_text())
    assert loaded["ood"] == results["ood"] and loaded["mean"] == results["mean"]
    assert loaded["estimators"] == results["estimators"] and set(loaded["estimators"]) == set(loaded["mean"])
    assert loaded["id_accuracy"] == 0.5 and loaded["labels"] == [1, 2] and loaded["array"] == [0, 1, 2]
    assert markdown_table(loaded) == markdown_table(results)


def test_write_json_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(ValueError, match=r"cannot write .*r.json as JSON"):
        write_json(path, {"a": float("nan")})
    with pytest.raises(ValueError, match="object is not JSON serialisable"):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_plots_write_images(tmp_path: Path, scores) -> None:
    id_s, ood = scores
    hist = plot_histograms(torch.tensor(id_s), ood, tmp_path / "hist.png", title="scores")
    roc = plot_roc(id_s, ood, tmp_path / "roc.png")
    for p in (hist, roc):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_roc(id_s, ood, tmp_path / "roc.svg").read_text().lstrip().startswith("<?xml")


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, scores, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install promptkit\[plot\]"):
        plot_roc(*scores, tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()
