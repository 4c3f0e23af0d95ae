"""Reports: the results dict, its JSON file, a Markdown table and optional plots (matplotlib, lazily).

A results dict looks like::

    {"method": "lsn", "id_accuracy": 0.72, "fpr_positive": "id",
     "estimators": {"auroc": "roc_auc_score, ...", ..., "fpr95_ood_positive": "OpenOOD v1.5 ..."},
     "ood": {"iNaturalist": {"auroc": ..., "aupr_in": ..., "aupr_out": ..., "fpr95": ..., "fpr95_ood_positive": ...}},
     "mean": {...the same keys, averaged over the OOD sets...}}

"fpr_positive" picks the convention of "fpr95", "aupr_in" and "aupr_out" (MCM's estimators for "id", OpenOOD
v1.5's for "ood"; see ``promptkit.eval.metrics``), and "estimators" names the estimator behind every metric key.
Metrics are fractions in [0, 1]; the table shows them in percent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from promptkit.data.atomic import atomic_dir, atomic_write
from promptkit.eval.metrics import Positive, as_scores, fpr_at_95_tpr, metric_estimators, ood_metrics

METRIC_KEYS = ("fpr95", "auroc", "aupr_in", "aupr_out")
_COMPANION = {"id": "fpr95_ood_positive", "ood": "fpr95_id_positive"}
_OTHER = {"id": "ood", "ood": "id"}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (tensors and numpy values become lists/numbers)."""
    try:
        text = json.dumps(obj, indent=2, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {path} as JSON: {e}") from e
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def write_json_and_table(directory: str | os.PathLike[str], stem: str, obj: Any, table: str) -> None:
    """``<stem>.json`` (``obj``) and ``<stem>.md`` (the Markdown ``table``) into ``directory``: both or neither."""
    with atomic_dir(directory) as staging:
        write_json(staging / f"{stem}.json", obj)
        with atomic_write(staging / f"{stem}.md") as tmp:
            tmp.write_text(table if table.endswith("\n") else table + "\n")


def write_reports(directory: str | os.PathLike[str], metrics: Mapping[str, Any],
                  scores: Mapping[str, Tensor | np.ndarray] | None = None, plots: bool = False) -> str:
    """Write ``metrics.json``, ``metrics.md`` and, with ``plots``, the score histograms and ROC curves of
    ``scores`` (``{"id": ..., ood_name: ...}``) into ``directory``; returns the Markdown table.

    Each file is written atomically; to make the set of them atomic, write into ``atomic_dir``'s staging folder
    (as ``promptkit.pipeline.save_run`` does).
    """
    folder = Path(directory)
    write_json(folder / "metrics.json", metrics)
    table = markdown_table(metrics)
    with atomic_write(folder / "metrics.md") as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    if plots and scores:
        ood = {k: v for k, v in scores.items() if k != "id"}
        plot_histograms(scores["id"], ood, folder / "score_histograms.png")
        plot_roc(scores["id"], ood, folder / "roc.png")
    return table


def summarize(
    id_scores: Tensor | np.ndarray,
    ood_scores_by_name: Mapping[str, Tensor | np.ndarray],
    positive: Positive = "id",
) -> dict[str, Any]:
    """Metrics of ID scores ``[N_id]`` against each OOD set's scores ``[N_k]``, and their mean over sets.

    ``fpr95``, ``aupr_in`` and ``aupr_out`` use the estimators of ``positive``; the other convention's FPR95 is
    kept as ``fpr95_ood_positive`` (when positive="id") or ``fpr95_id_positive`` (when positive="ood"). "mean"
    is the unweighted mean over the OOD sets of each per-set value.

    Returns:
        ``{"fpr_positive": positive, "estimators": {key: description}, "ood": {name: metrics}, "mean": metrics}``,
        with a description of the estimator of every metric key.
    """
    if positive not in _COMPANION:
        raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")
    if not ood_scores_by_name:
        raise ValueError("summarize: no OOD sets given")
    id_s = as_scores(id_scores, "id_scores")
    per_set = {}
    for name, scores in ood_scores_by_name.items():
        ood_s = as_scores(scores, f"ood_scores[{name!r}]")
        m = ood_metrics(id_s, ood_s, positive)
        m[_COMPANION[positive]] = fpr_at_95_tpr(id_s, ood_s, _OTHER[positive])
        per_set[name] = m
    keys = next(iter(per_set.values())).keys()
    mean = {k: float(np.mean([m[k] for m in per_set.values()])) for k in keys}
    estimators = {**metric_estimators(positive),
                  _COMPANION[positive]: metric_estimators(_OTHER[positive])["fpr95"]}
    return {"fpr_positive": positive, "estimators": estimators, "ood": per_set, "mean": mean}


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100.0 * float(x):.2f}"


def markdown_table(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of one results dict or a list of them: a row per (method, OOD set) and a mean row.

    Values are percentages with two decimals; ID accuracy is shown on each method's mean row.
    """
    rows_in = [results] if isinstance(results, Mapping) else list(results)
    if not rows_in:
        raise ValueError("markdown_table: no results")
    conventions = {r.get("fpr_positive") for r in rows_in}
    if len(conventions) > 1:
        raise ValueError(f"markdown_table: results mix FPR95 conventions {sorted(map(str, conventions))}")
    convention = conventions.pop()
    fpr_head = {"id": "FPR95 (ID pos.) ↓", "ood": "FPR95 (OOD pos.) ↓"}.get(convention, "FPR95 ↓")
    header = ["Method", "OOD set", fpr_head, "AUROC ↑", "AUPR-In ↑", "AUPR-Out ↑", "ID acc ↑"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "--:|" * 5]
    for r in rows_in:
        method = str(r.get("method", "-"))
        blocks = [(name, m, None) for name, m in r.get("ood", {}).items()]
        if "mean" in r:
            blocks.append(("Mean", r["mean"], r.get("id_accuracy")))
        for name, m, acc in blocks:
            cells = [method, name, *(_pct(m.get(k)) for k in METRIC_KEYS), _pct(acc) if acc is not None else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Mean ± standard deviation over seeds of each method's FPR95 and AUROC per OOD set, and its ID accuracy.

    ``runs`` are results dicts (as ``summarize`` plus "method" and "id_accuracy") of several methods and seeds;
    values are percentages. Rows keep the order in which methods first appear.
    """
    if not runs:
        raise ValueError("compare_table: no runs")
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(str(run["method"]), []).append(run)
    sets = list(runs[0]["ood"]) + ["Mean"]
    header = ["Method", "seeds"] + [f"{name} FPR95 ↓ / AUROC ↑" for name in sets] + ["ID acc ↑"]
    lines = ["| " + " | ".join(header) + " |", "|---|--:|" + "--:|" * (len(sets) + 1)]

    def spread(values: list[float]) -> str:
        t = torch.tensor(values, dtype=torch.float64) * 100
        std = float(t.std()) if len(values) > 1 else 0.0
        return f"{float(t.mean()):.2f} ± {std:.2f}"

    for method, group in by_method.items():
        cells = [method, str(len(group))]
        for name in sets:
            block = [r["mean"] if name == "Mean" else r["ood"][name] for r in group]
            cells.append(f"{spread([b['fpr95'] for b in block])} / {spread([b['auroc'] for b in block])}")
        accuracies = [r["id_accuracy"] for r in group if r.get("id_accuracy") is not None]
        cells.append(spread(accuracies) if accuracies else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _new_figure(width: float = 6.0, height: float = 4.0) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ModuleNotFoundError("plotting needs matplotlib: pip install promptkit[plot]") from e
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    with atomic_write(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=120)
    return target


def plot_histograms(
    id_scores: Tensor | np.ndarray,
    ood_scores_by_name: Mapping[str, Tensor | np.ndarray],
    path: str | os.PathLike[str],
    *,
    bins: int = 50,
    title: str | None = None,
) -> Path:
    """Save overlaid density histograms of the ID scores ``[N_id]`` and each OOD set's scores to ``path``."""
    sets = {"ID": as_scores(id_scores, "id_scores")}
    sets.update({name: as_scores(s, f"ood_scores[{name!r}]") for name, s in ood_scores_by_name.items()})
    edges = np.histogram_bin_edges(np.concatenate(list(sets.values())), bins=bins)
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, s in sets.items():
        ax.hist(s, bins=edges, density=True, alpha=0.45, label=f"{name} (n={len(s)})")
    ax.set_xlabel("score (higher = more in-distribution)")
    ax.set_ylabel("density")
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_roc(
    id_scores: Tensor | np.ndarray,
    ood_scores_by_name: Mapping[str, Tensor | np.ndarray],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Save ROC curves (ID positive: TPR = ID kept, FPR = OOD kept) of each OOD set against the ID scores."""
    from sklearn.metrics import roc_auc_score, roc_curve

    id_s = as_scores(id_scores, "id_scores")
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    for name, scores in ood_scores_by_name.items():
        ood_s = as_scores(scores, f"ood_scores[{name!r}]")
        y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
        fpr, tpr, _ = roc_curve(y, np.r_[id_s, ood_s])
        auroc = roc_auc_score(y, np.r_[id_s, ood_s])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * auroc:.2f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("FPR (OOD accepted as ID)")
    ax.set_ylabel("TPR (ID accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    return _save(fig, path)
