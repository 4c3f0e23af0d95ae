"""Loading saved prompts: a bad prompts.json, another model, a wrong tensor or a damaged file is one clear
PromptsError line, never a traceback or silently different scores."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from promptkit.clip import load_clip
from promptkit.data import EmbeddedSource
from promptkit.data.integrity import save_tensors
from promptkit.methods import MCM, METHODS, CoOp, PromptsError, load_method
from promptkit.methods.config import resolve_config
from promptkit.methods.saved import META_FILE, PROMPTS_FILE, PROMPTS_FORMAT

from ..integrity_helpers import flip_tensor_byte


@pytest.fixture(scope="module")
def clip():
    return load_clip()


@pytest.fixture(scope="module")
def class_names() -> list[str]:
    return EmbeddedSource("test").class_names


@pytest.fixture
def saved(tmp_path: Path, clip, class_names) -> Callable[[type], Path]:
    """Save an (untrained) method of a class into a fresh folder and return the folder."""
    def save(cls: type, seed: int = 1, name: str = "prompts") -> Path:
        method = cls(clip, class_names, cls.Config(seed=seed) if cls is CoOp else None)
        method.threshold = 0.25
        return method.save(tmp_path / name)

    return save


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite prompts.json with ``change`` applied to it in place."""
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        for parent in parents:
            meta = meta[parent]
        meta[key] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        for parent in parents:
            meta = meta[parent]
        del meta[key]

    return change


@pytest.mark.parametrize(("text", "found"), [("null", r"null \(null\)"), ("[]", r"\[\] \(list\)"),
                                           ('"prompts"', r'"prompts" \(string\)'), ("3", r"3 \(number\)")])
def test_metadata_that_is_not_an_object(saved, clip, text: str, found: str) -> None:
    folder = saved(MCM)
    (folder / META_FILE).write_text(text)
    with pytest.raises(PromptsError, match=rf"{folder / META_FILE}: not a prompts description \(a JSON object "
                                           rf"expected, found {found}\)"):
        load_method(folder, clip)


@pytest.mark.parametrize(("change", "message"), [
    (_drop("format"),
     rf"written by an older promptkit \(no format version; this promptkit reads format {PROMPTS_FORMAT}\)"),
    (_set("format", PROMPTS_FORMAT - 1), rf"written by an older promptkit \(format {PROMPTS_FORMAT - 1} \(number\);"),
    (_set("format", 1), r"written by an older promptkit \(format 1 \(number\);"),
    (_set("format", PROMPTS_FORMAT + 1),
     rf"written by a newer promptkit \(format {PROMPTS_FORMAT + 1}; .*upgrade promptkit"),
    (_drop("model"), r"model must be an object with name, pretrained and fingerprint, missing"),
    (_set("model", None), r"model must be an object .*, found null \(null\)"),
    (_drop("model.fingerprint"), r"model.fingerprint must be a string, missing"),
    (_set("model.name", 3), r"model.name must be a string, found 3 \(number\)"),
    (_drop("config"), r"config must be an object of method settings, missing"),
    (_set("config", "fast"), r"config must be an object of method settings, found \"fast\" \(string\)"),
    (_set("config.temperature", "hot"), r"config.temperature must be of type float, found \"hot\" \(string\)"),
    (_set("config.template", None), r"config.template must be of type str, found null"),
    (_drop("class_names"), r"class_names must be a non-empty list of class names, missing"),
    (_set("class_names", []), r"class_names must be a non-empty list"),
    (_set("class_names", [1, 2]), r"class_names must be a non-empty list"),
    (_set("threshold", "0.5"), r"threshold must be a finite number or null, found \"0.5\" \(string\)"),
    (_set("threshold", True), r"threshold must be a finite number or null, found true \(boolean\)"),
    (_set("info", [1]), r"info must be an object, found \[1\] \(list\)"),
    (_drop("tensors_sha256"), r"tensors_sha256 must be the hex sha256 of the saved tensors, missing"),
    (_set("method", "nonsense"), r"unknown method 'nonsense'; known: "),
])
def test_bad_metadata_is_one_clear_line(saved, clip, change, message: str) -> None:
    folder = saved(MCM)
    _edit(folder, change)
    with pytest.raises(PromptsError, match=rf"{folder / META_FILE}: {message}") as info:
        load_method(folder, clip)
    assert "\n" not in str(info.value)


def test_saved_prompts_round_trip(saved, clip) -> None:
    folder = saved(CoOp)
    reloaded = load_method(folder, clip)
    assert reloaded.threshold == 0.25 and isinstance(reloaded, CoOp)
    assert json.loads((folder / META_FILE).read_text())["format"] == PROMPTS_FORMAT


@pytest.mark.parametrize(("change", "why"), [
    (lambda clip: {"fingerprint": "0123456789abcdef"}, "fingerprints differ: the weights file changed since training"),
    (lambda clip: {"fingerprint": clip.fingerprint + "+quickgelu"}, "the QuickGELU setting differs"),
    (lambda clip: {"fingerprint": "0123456789abcdef", "pretrained": "openai"}, "the weights differ"),
    (lambda clip: {"fingerprint": "0123456789abcdef", "name": "ViT-B-16"}, "the model differs"),
])
def test_another_model_says_what_differs(saved, clip, change, why: str) -> None:
    folder = saved(MCM)
    model = change(clip)
    _edit(folder, lambda meta: meta["model"].update(model))
    with pytest.raises(PromptsError, match="learned on model") as info:
        load_method(folder, clip)
    text = str(info.value)
    assert why in text, text
    saved_fp = model["fingerprint"]
    assert f"fingerprint {saved_fp.partition('+')[0][:12]}" in text and f"{clip.fingerprint[:12]} loaded" in text


@pytest.mark.parametrize("tensor", [torch.zeros(64), torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 16, 64,
                                                                                            dtype=torch.int64)])
def test_tensor_of_another_shape_or_dtype_is_refused(saved, clip, tensor: torch.Tensor) -> None:
    folder = saved(CoOp)
    digest = save_tensors(folder / PROMPTS_FILE, {"ctx": tensor})  # consistent checksums, wrong layout
    _edit(folder, _set("tensors_sha256", digest))
    found = re.escape(f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}")
    with pytest.raises(PromptsError, match=rf"tensor 'ctx' is {found}, coop with these settings needs "
                                           r"float32 \[1, 1, 16, 64\]"):
        load_method(folder, clip)


def test_damaged_or_mismatched_prompts_file_is_refused(saved, clip) -> None:
    folder = saved(CoOp)
    flip_tensor_byte(folder / PROMPTS_FILE, "ctx", 17)
    with pytest.raises(PromptsError, match=r"prompts.safetensors: checksum mismatch, the file is corrupt"):
        load_method(folder, clip)
    other = saved(CoOp, seed=2, name="other")
    (folder / PROMPTS_FILE).write_bytes((other / PROMPTS_FILE).read_bytes())
    with pytest.raises(PromptsError, match=r"does not belong to prompts.json beside it"):
        load_method(folder, clip)
    (folder / PROMPTS_FILE).write_bytes(b"junk")
    with pytest.raises(PromptsError, match="cannot read the saved prompts"):
        load_method(folder, clip)
    (folder / PROMPTS_FILE).unlink()
    with pytest.raises(PromptsError, match="cannot read the saved prompts"):
        load_method(folder, clip)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_round_trips_through_the_checks(saved, clip, name: str) -> None:
    cls = METHODS[name]
    reloaded = load_method(saved(cls), clip)
    assert type(reloaded) is cls and reloaded.config == resolve_config(cls.Config)
