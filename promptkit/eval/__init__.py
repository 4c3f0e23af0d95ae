"""Evaluation: OOD metrics (MCM and OpenOOD v1.5 conventions), accuracy, JSON / Markdown reports and plots."""

from promptkit.eval.metrics import accuracy, calibrate_threshold, fpr_at_95_tpr, metric_estimators, ood_metrics
from promptkit.eval.report import markdown_table, plot_histograms, plot_roc, summarize, write_json

__all__ = [
    "accuracy",
    "calibrate_threshold",
    "fpr_at_95_tpr",
    "markdown_table",
    "metric_estimators",
    "ood_metrics",
    "plot_histograms",
    "plot_roc",
    "summarize",
    "write_json",
]
