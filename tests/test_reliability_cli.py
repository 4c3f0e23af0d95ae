"""The command line under failure (issue 11): a full or read-only disk, damaged prompts and cache files, symlink
loops, 16-bit images, bad list-file labels, unreadable images and the umask. Each case runs the real command."""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .integrity_helpers import flip_tensor_byte

RUN_FILES = ["metrics.json", "metrics.md", "prompts.json", "prompts.safetensors"]


def _cli(*args: str, cwd: Path, cache: Path, umask: int | None = None, check: bool = True,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """``promptkit ARGS`` in a fresh process with warnings shown (as a user sees them), optionally under a umask."""
    env = {**os.environ, "PROMPTKIT_CACHE": str(cache)}
    for name in ("PROMPTKIT_DEBUG", "PYTHONWARNINGS"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "promptkit", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, preexec_fn=None if umask is None else lambda: os.umask(umask))
    if check and result.returncode != 0:
        raise AssertionError(f"promptkit {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("promptkit "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def _warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("promptkit: warning:")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    """MCM on the embedded default, trained under umask 022."""
    out = tmp_path_factory.mktemp("run") / "mcm"
    _cli("train", "--method", "mcm", "--output", str(out), cwd=out.parent, cache=cache, umask=0o022)
    return out


@pytest.fixture(scope="module")
def coop_prompts(tmp_path_factory) -> Path:
    """An untrained CoOp saved on the embedded model: learned tensors to damage, without a training run."""
    from promptkit.clip import load_clip
    from promptkit.data import EmbeddedSource
    from promptkit.methods import CoOp

    return CoOp(load_clip(), EmbeddedSource("test").class_names).save(tmp_path_factory.mktemp("coop") / "prompts")


# -- F8: modes ------------------------------------------------------------------------------------------

def test_run_and_cache_files_honour_the_umask(trained, cache, tmp_path) -> None:
    for path in [*trained.iterdir(), *cache.iterdir()]:
        assert _mode(path) == 0o644, path
    assert _mode(trained) == 0o755
    out, private_cache = tmp_path / "private", tmp_path / "private-cache"
    _cli("train", "--method", "mcm", "--output", str(out), "--cache-dir", str(private_cache), cwd=tmp_path,
         cache=cache, umask=0o077)
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    for path in [*out.iterdir(), *private_cache.iterdir()]:
        assert _mode(path) == 0o600, path
    assert _mode(out) == 0o700


# -- F2: a full or read-only disk -----------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fill(disk: Path, free_pages: int) -> None:
    """Fill the tmpfs ``disk`` with a ``filler`` file so that exactly ``free_pages`` pages stay free."""
    filler, page = disk / "filler", os.statvfs(disk).f_frsize
    filler.unlink(missing_ok=True)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(page))
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_blocks * 512 - free_pages * page)
    assert os.statvfs(disk).f_bavail == free_pages


def test_full_disk_leaves_no_partial_run_and_the_previous_one_intact(small_disk, tmp_path, cache) -> None:
    run, fresh = small_disk / "run", small_disk / "fresh"
    _cli("train", "--method", "mcm", "--output", str(run), cwd=tmp_path, cache=cache)
    before = _snapshot(run)
    assert sorted(before) == RUN_FILES

    _fill(small_disk, 0)
    result = _cli("train", "--method", "mcm", "--output", str(fresh), cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, f"cannot write {fresh}/prompts.safetensors: No space left on device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "run"]  # no folder, no staging left

    failed_at = []
    for free in range(1, len(RUN_FILES) + 4):  # every file takes one page; the last value leaves room for the run
        _fill(small_disk, free)
        result = _cli("train", "--method", "mcm", "--output", str(run), cwd=tmp_path, cache=cache, check=False)
        if result.returncode == 0:
            break
        line = _one_line_error(result, f"cannot write {run}/", "No space left on device")
        failed_at.append(line.split(f"{run}/")[1].split(":")[0])
        assert _snapshot(run) == before, f"{free} free pages: the previous run changed"
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "run"]
    else:
        pytest.fail(f"the run never fitted; it failed writing {failed_at}")
    # Failures came after some of the run was written (the partial states of issue 11), and none left a trace.
    assert {"prompts.json", "metrics.md"} <= set(failed_at), failed_at
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES

    (small_disk / "filler").unlink()
    before = _snapshot(run)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = _cli("train", "--method", "mcm", "--output", str(run), cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, str(run))  # the CLI may refuse it before the run, or the write fails
    assert _snapshot(run) == before


# -- F4, F5, F6: damaged prompts --------------------------------------------------------------------------

def _rewrite_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "prompts.json").read_text())
    change(meta)
    (folder / "prompts.json").write_text(json.dumps(meta))


def _drop_model(folder: Path) -> None:
    _rewrite_meta(folder, lambda meta: meta.pop("model"))


def _wrong_shape(folder: Path) -> None:
    import torch

    from promptkit.data.integrity import save_tensors

    digest = save_tensors(folder / "prompts.safetensors", {"ctx": torch.zeros(64)})
    _rewrite_meta(folder, lambda meta: meta.update(tensors_sha256=digest))


def _flip(folder: Path) -> None:
    flip_tensor_byte(folder / "prompts.safetensors", "ctx", 40)


@pytest.mark.parametrize(("damage", "message"), [
    (_drop_model, "model must be an object with name, pretrained and fingerprint, missing"),
    (_wrong_shape, "tensor 'ctx' is float32 [64], coop with these settings needs float32 [1, 1, 16, 64]"),
    (_flip, "prompts.safetensors: checksum mismatch, the file is corrupt"),
])
def test_damaged_prompts_are_refused_in_one_line(coop_prompts, tmp_path, cache, damage, message: str) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    for path in coop_prompts.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    damage(folder)
    result = _cli("score", "--prompts", str(folder), "--images", "embedded:digits", "--output",
                  str(tmp_path / "s.csv"), cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, message)
    assert not (tmp_path / "s.csv").exists()


# -- F6: a damaged feature cache ----------------------------------------------------------------------------

def test_damaged_cache_entries_are_rebuilt_with_one_warning_each(trained, cache, tmp_path) -> None:
    copy = tmp_path / "cache"
    copy.mkdir()
    for path in cache.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    entries = {json.loads(p.read_text())["source"].split(": ")[1].split("[")[0]: p for p in copy.glob("*.json")}
    damaged = {"embedded:digits": "features", "embedded:test": "kept"}  # wrong scores / an IndexError before
    for source, tensor in damaged.items():
        flip_tensor_byte(entries[source].with_suffix(".safetensors"), tensor, 7)
    result = _cli("eval", "--prompts", str(trained), "--id", "embedded:test", "--ood", "digits=embedded:digits",
                  "--output", str(tmp_path / "eval"), "--cache-dir", str(copy), cwd=tmp_path, cache=cache)
    warnings = _warnings(result)
    assert len(warnings) == 2, result.stderr
    for warning, source in zip(warnings, ["embedded:test", "embedded:digits"], strict=True):
        assert f"ignoring unreadable feature cache entry {entries[source]}" in warning, warning
        assert "checksum mismatch" in warning and warning.endswith("rebuilding it")
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    reference = json.loads((trained / "metrics.json").read_text())
    assert evaluated["ood"]["digits"] == reference["ood"]["digits"]
    assert evaluated["id_accuracy"] == reference["id_accuracy"]


# -- F7: symlink loops ----------------------------------------------------------------------------------------

def test_symlink_loops_do_not_hang_extraction(tmp_path, cache) -> None:
    root = tmp_path / "classes"
    rng = np.random.default_rng(0)
    for rel in ("cat/a.png", "dog/b.png", "dog/c.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / rel)
    (root / "up").symlink_to("..")
    (root / "again").symlink_to(".")
    (root / "x").symlink_to("x")
    (root / "dog" / "back").symlink_to("..")
    result = _cli("extract", "--images", str(root), cwd=tmp_path, cache=cache, timeout=120)
    assert result.stdout.startswith("3 image features"), result.stdout
    (warning,) = _warnings(result)
    assert warning.startswith("promptkit: warning: skipped 4 broken or looping links") and "(first: " in warning


# -- F10: 16-bit images ----------------------------------------------------------------------------------------

def test_16_bit_copy_scores_like_the_8_bit_image(trained, tmp_path, cache) -> None:
    from promptkit.data import EmbeddedSource

    gray = EmbeddedSource("fashion-heldout").images[0]
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(gray).save(folder / "eight.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "sixteen.png")
    _cli("score", "--prompts", str(trained), "--images", str(folder), "--output", str(tmp_path / "s.csv"),
         cwd=tmp_path, cache=cache)
    with open(tmp_path / "s.csv", newline="") as handle:
        scores = {Path(row["image"]).stem: float(row["score"]) for row in csv.DictReader(handle)}
    assert scores["sixteen"] == pytest.approx(scores["eight"], abs=1e-4), scores


# -- F12: list-file labels -------------------------------------------------------------------------------------

def test_list_file_with_a_word_label_is_refused(tmp_path, cache) -> None:
    Image.new("L", (28, 28), 90).save(tmp_path / "a.png")
    Image.new("L", (28, 28), 160).save(tmp_path / "img.png")
    (tmp_path / "list.txt").write_text("a.png 0\nimg.png cat\n")
    result = _cli("extract", "--images", str(tmp_path / "list.txt"), cwd=tmp_path, cache=cache, check=False)
    _one_line_error(result, "list.txt:2: label 'cat' is not an integer")


# -- item 7: skipped images ------------------------------------------------------------------------------------

def test_skipped_images_are_one_line_and_counted_in_metrics(trained, tmp_path, cache) -> None:
    ood = tmp_path / "ood"
    ood.mkdir()
    for i in range(2):
        Image.new("L", (28, 28), 60 + 90 * i).save(ood / f"{i}.png")
    (ood / "broken.png").write_bytes(b"\x89PNG not really")
    result = _cli("eval", "--prompts", str(trained), "--id", "embedded:test", "--ood", f"odd={ood}", "--output",
                  str(tmp_path / "eval"), cwd=tmp_path, cache=cache)
    assert _warnings(result) == [f"promptkit: warning: skipped 1 of 3 unreadable images (first: {ood / 'broken.png'})"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["skipped_images"] == {"id": {"count": 0, "first": None},
                                         "odd": {"count": 1, "first": str(ood / "broken.png")}}
