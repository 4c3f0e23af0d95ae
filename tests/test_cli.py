"""The command line: the embedded default end to end, exit codes, and one clear line for each user error."""

from __future__ import annotations

import json

import pytest

from promptkit import _C

from .cli_helpers import image_folder, run_cli


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """MCM set up on the embedded default by `promptkit train` (no data arguments)."""
    out = tmp_path_factory.mktemp("run") / "mcm"
    result = run_cli("train", "--method", "mcm", "--output", str(out), cwd=out.parent, cache=cache)
    return out, result


def _one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("promptkit "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_train_on_embedded_default_writes_the_contract(trained):
    out, result = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "model", "seed", "id_accuracy", "ood", "mean", "fpr_positive"):
        assert key in metrics, key
    for name, block in metrics["ood"].items():
        assert {"auroc", "fpr95", "aupr_in", "aupr_out"} <= set(block), name
        assert all(0 <= block[k] <= 1 for k in ("auroc", "fpr95", "aupr_in", "aupr_out"))
    assert {"auroc", "fpr95"} <= set(metrics["mean"])
    assert metrics["fpr_positive"] == "id"
    assert metrics["versions"]["promptkit"] and metrics["versions"]["torch"] and metrics["config"]
    assert (out / "prompts.safetensors").is_file() and (out / "prompts.json").is_file()
    assert "| mcm | Mean |" in result.stdout


def test_eval_saved_prompts_matches_training_metrics(trained, cache, tmp_path):
    out, _ = trained
    result = run_cli("eval", "--prompts", str(out), "--id", "embedded:test", "--ood", "digits=embedded:digits",
                     "--output", str(tmp_path), cwd=tmp_path, cache=cache)
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    trained_metrics = json.loads((out / "metrics.json").read_text())
    assert evaluated["ood"]["digits"]["auroc"] == pytest.approx(trained_metrics["ood"]["digits"]["auroc"])
    assert "digits" in result.stdout


def test_info_lists_backends(tmp_path, cache):
    result = run_cli("info", cwd=tmp_path, cache=cache)
    assert "backends on cpu" in result.stdout and "cpp" in result.stdout
    assert f"CPU vector loops: {_C.vector_isa_cpu()} (" in result.stdout


def test_usage_error_exits_2(tmp_path, cache):
    result = run_cli("train", "--method", "nonsense", cwd=tmp_path, cache=cache, check=False)
    assert result.returncode == 2
    result = run_cli("train", "--method", "coop", "--shots", "-1", cwd=tmp_path, cache=cache, check=False)
    assert result.returncode == 2 and "argument --shots: expects a whole number >= 0, got '-1'" in result.stderr


def test_bad_setting_is_one_line_before_any_work_and_debug_shows_its_traceback(tmp_path, cache):
    args = ("train", "--method", "coop", "--set", "epochs=ten", "--output", str(tmp_path / "out"))
    result = run_cli(*args, cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, "--set epochs=ten: coop's epochs takes a whole number, got 'ten'")
    assert not (tmp_path / "out").exists()
    debug = run_cli("--debug", *args, cwd=tmp_path, cache=cache, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_score_into_a_folder_names_the_folder(trained, tmp_path, cache):
    out, _ = trained
    result = run_cli("score", "--prompts", str(out), "--images", "embedded:digits", "--output", str(tmp_path),
                     cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, f"--output {tmp_path}: is a folder; give a file name")


def test_missing_data_root(tmp_path, cache):
    result = run_cli("train", "--method", "coop", "--train", str(tmp_path / "nowhere"), "--id",
                     str(tmp_path / "nowhere"), "--ood", f"x={tmp_path}", "--output", str(tmp_path / "out"),
                     cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, "nowhere")
    assert not (tmp_path / "out").exists()


def test_empty_class_list(tmp_path, cache):
    images = image_folder(tmp_path / "id")
    (tmp_path / "classes.txt").write_text("")
    result = run_cli("train", "--method", "mcm", "--id", str(images), "--ood", f"x={images}", "--classes",
                     str(tmp_path / "classes.txt"), "--output", str(tmp_path / "out"), cwd=tmp_path, cache=cache,
                     check=False)
    _one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_corrupt_image_skip_or_fail(tmp_path, cache):
    images = image_folder(tmp_path / "id")
    (images / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    result = run_cli("extract", "--images", str(images), cwd=tmp_path, cache=cache, check=False)
    assert result.returncode == 0 and "1 unreadable skipped" in result.stdout
    result = run_cli("extract", "--images", str(images), "--on-bad-image", "fail", "--cache-dir",
                     str(tmp_path / "fresh-cache"), cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, "broken.png")


def test_prompts_from_another_model_are_refused(trained, tmp_path, cache):
    out, _ = trained
    from safetensors.torch import load_file, save_file

    from promptkit.assets import MODEL_WEIGHTS

    other = load_file(str(MODEL_WEIGHTS))
    other["logit_scale"] = other["logit_scale"] + 1  # same architecture, different weights
    save_file(other, str(tmp_path / "other.safetensors"))
    result = run_cli("eval", "--prompts", str(out), "--model", "promptkit-tiny", "--pretrained",
                     str(tmp_path / "other.safetensors"), "--output", str(tmp_path / "eval"), cwd=tmp_path,
                     cache=cache, check=False)
    _one_line_error(result, "learned on model promptkit-tiny")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_truncated_weights_file(tmp_path, cache):
    from promptkit.assets import MODEL_WEIGHTS

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(MODEL_WEIGHTS.read_bytes()[:100_000])
    result = run_cli("train", "--method", "mcm", "--model", "promptkit-tiny", "--pretrained", str(truncated),
                     "--output", str(tmp_path / "out"), cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, "truncated.safetensors")
    assert not (tmp_path / "out").exists()


def test_prompts_for_another_method_are_refused(trained, tmp_path, cache):
    out, _ = trained
    meta = json.loads((out / "prompts.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prompts.json").write_text(json.dumps({**meta, "method": "coop"}))
    (broken / "prompts.safetensors").write_bytes((out / "prompts.safetensors").read_bytes())
    result = run_cli("score", "--prompts", str(broken), "--images", "embedded:digits", "--output",
                     str(tmp_path / "s.csv"), cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, "needs ['ctx']")
    assert not (tmp_path / "s.csv").exists()
