"""`promptkit reproduce`: protocols, the reference file, the comparison, and the command end to end."""

from __future__ import annotations

import json

import pytest

from promptkit.errors import ConfigError
from promptkit.methods import METHODS
from promptkit.reproduce import comparison, get_protocol, protocol_data, protocols

from .cli_helpers import run_cli


def test_every_protocol_names_a_method_a_source_and_its_mean():
    known = protocols()
    for name in ("lsn-imagenet100", "lsn-cifar10", "negprompt-imagenet1k", "negprompt-imagenet1k-10pct",
                 "negprompt-split4", "neglabel-imagenet1k", "lapt-imagenet1k", "lapt-openood-near",
                 "lapt-openood-far", "mcm-imagenet1k"):
        assert name in known
    for p in known.values():
        assert p.method in METHODS and p.source and p.fpr_positive in ("id", "ood")
        assert "mean" in p.reference and all(len(v) == 2 for v in p.reference.values())
        per_set = [v for k, v in p.reference.items() if k != "mean"]
        if len(per_set) > 1:  # the published mean is the mean of the published per-set numbers (to rounding)
            for i in range(2):
                assert abs(sum(v[i] for v in per_set) / len(per_set) - p.reference["mean"][i]) < 0.06, p.name


def test_comparison_is_ours_minus_the_paper_in_percent():
    protocol = get_protocol("embedded-mcm")
    runs = [{"ood": {k: {"fpr95": 0.5, "auroc": 0.8} for k in protocol.reference if k != "mean"},
             "mean": {"fpr95": 0.5, "auroc": 0.8}}] * 2
    rows = {r["set"]: r for r in comparison(protocol, runs)}
    assert rows["mean"]["fpr95"] == pytest.approx(50.0)
    assert rows["mean"]["delta_auroc"] == pytest.approx(80.0 - protocol.reference["mean"][1])


def test_bad_protocol_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown protocol 'nope'; known: .*lsn-imagenet100"):
        get_protocol("nope")
    with pytest.raises(ConfigError, match="needs --data-root"):
        protocol_data(get_protocol("lsn-imagenet100"), None)
    with pytest.raises(ValueError, match="not found"):
        protocol_data(get_protocol("lsn-imagenet100"), str(tmp_path))


def test_reproduce_runs_end_to_end_on_the_embedded_default(tmp_path):
    cache = tmp_path / "cache"
    result = run_cli("reproduce", "embedded-mcm", "--output", str(tmp_path / "out"), "--no-progress",
                     cwd=tmp_path, cache=cache)
    assert "| mean |" in result.stdout and "reference: promptkit README" in result.stdout
    saved = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    mean = {r["set"]: r for r in saved["comparison"]}["mean"]
    # MCM is deterministic: the run reproduces the recorded embedded numbers to their two decimals.
    assert abs(mean["delta_auroc"]) < 0.01 and abs(mean["delta_fpr95"]) < 0.01
    assert saved["runs"][0]["fpr_positive"] == "id"
    missing = run_cli("reproduce", "lsn-imagenet100", "--data-root", str(tmp_path / "absent"), cwd=tmp_path,
                      cache=cache, check=False)
    assert missing.returncode == 1 and "data root not found" in missing.stderr
    assert "Traceback" not in missing.stderr
