"""Saved prompts: ``prompts.safetensors`` (the learned tensors and the deployable head) and ``prompts.json``.

``write_prompts`` writes both files as one atomic step; ``read_metadata`` checks the JSON sidecar;
``load_method`` rebuilds a saved method on a model, ``load_scorer`` the method scoring from its saved head
without a text tower. Every refusal is one ``PromptsError`` line naming the file and the fix. This module works on
any class that follows the ``Method`` contract (``promptkit.methods.base``) and imports none.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from promptkit.data.atomic import atomic_dir, atomic_write
from promptkit.data.integrity import CHECKSUM_KEY, IntegrityError, load_tensors, save_tensors
from promptkit.errors import UserError
from promptkit.methods.config import resolve_config

PROMPTS_FILE = "prompts.safetensors"
META_FILE = "prompts.json"
# Version of the saved layout, recorded in prompts.json. 2: a "format" field and the tensors' sha256 (in both
# files). 3: the head's tensors named by their kind of text features (head.id, head.class_negatives,
# head.label_negatives) and LSN's settings positive_learner and score_rule. A folder of another version is
# refused with a message saying which side is older.
PROMPTS_FORMAT = 3
# prompts.safetensors also holds the frozen text features each score uses, under "head.<kind>", so that a detector
# scores without a text tower (promptkit.detector); its metadata names the method that wrote it.
HEAD_PREFIX = "head."


class PromptsError(UserError, ValueError):
    """Saved prompts that cannot be used here (missing, corrupt, or for another model or class list)."""


def write_prompts(directory: str | os.PathLike, method: str, learned: dict[str, Tensor],
                  head: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``prompts.safetensors`` (``learned`` tensors and ``head`` text features by kind, fp32) and the
    ``prompts.json`` sidecar (``metadata`` plus the format version) into ``directory``, as one atomic step.

    Both files record the sha256 of the tensors, so a damaged file or a pair from two runs is refused on load.
    """
    directory = Path(directory)
    tensors = {**learned, **{HEAD_PREFIX + kind: t.detach().float() for kind, t in head.items()}}
    with atomic_dir(directory) as staging:
        digest = save_tensors(staging / PROMPTS_FILE, tensors, metadata={"method": method})
        with atomic_write(staging / META_FILE) as tmp:
            tmp.write_text(json.dumps({"format": PROMPTS_FORMAT, **metadata, "tensors_sha256": digest}, indent=2))
    return directory


def _describe(value: Any) -> str:
    """A JSON value as a short phrase for messages: its text, cut to 40 characters, and its JSON type."""
    kind = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
    text = json.dumps(value)
    return f"{text[:40]}{'...' if len(text) > 40 else ''} ({kind})"


def _schema_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a (current-format) ``prompts.json``, or None."""
    model = meta.get("model")
    checks = [
        ("method", isinstance(meta.get("method"), str), "a method name"),
        ("model", isinstance(model, dict), "an object with name, pretrained and fingerprint"),
        ("config", isinstance(meta.get("config"), dict), "an object of method settings"),
        ("class_names", isinstance(meta.get("class_names"), list) and bool(meta.get("class_names"))
         and all(isinstance(n, str) for n in meta.get("class_names", [])), "a non-empty list of class names"),
        ("threshold", meta.get("threshold") is None or (isinstance(meta.get("threshold"), (int, float))
         and not isinstance(meta.get("threshold"), bool) and math.isfinite(meta.get("threshold"))),
         "a finite number or null"),
        ("info", isinstance(meta.get("info", {}), dict), "an object"),
        ("tensors_sha256", isinstance(meta.get("tensors_sha256"), str), "the hex sha256 of the saved tensors"),
    ]
    if isinstance(model, dict):
        checks += [(f"model.{key}", isinstance(model.get(key), str), "a string")
                   for key in ("name", "pretrained", "fingerprint")]
    for field, ok, expected in checks:
        if not ok:
            where = meta.get("model", {}) if field.startswith("model.") else meta
            key = field.removeprefix("model.")
            found = f"found {_describe(where[key])}" if key in where else "missing"
            return f"{field} must be {expected}, {found}"
    return None


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of saved prompts, checked: one clear ``PromptsError`` line when it is missing, unreadable,
    of another format version, or has a field missing or of the wrong type."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise PromptsError(f"{path}: no saved prompts here (expected {META_FILE} from `promptkit train`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PromptsError(f"{path}: unreadable prompts metadata ({error})") from error
    if not isinstance(meta, dict):
        raise PromptsError(f"{path}: not a prompts description (a JSON object expected, found {_describe(meta)})")
    version = meta.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < PROMPTS_FORMAT:
        found = "no format version" if version is None else f"format {_describe(version)}"
        raise PromptsError(f"{path}: written by an older promptkit ({found}; this promptkit reads format "
                           f"{PROMPTS_FORMAT}); learn the prompts again with `promptkit train`")
    if version > PROMPTS_FORMAT:
        raise PromptsError(f"{path}: written by a newer promptkit (format {version}; this promptkit reads format "
                           f"{PROMPTS_FORMAT}); upgrade promptkit to use it")
    problem = _schema_problem(meta)
    if problem:
        raise PromptsError(f"{path}: {problem}")
    return meta


def _short(fingerprint: str) -> str:
    """A weights fingerprint cut to 12 hex digits, keeping a ``+quickgelu`` suffix."""
    base, plus, rest = fingerprint.partition("+")
    return base[:12] + plus + rest


def _model_mismatch(directory: str | os.PathLike, saved: dict[str, str], clip) -> str:
    """Why prompts learned on model ``saved`` cannot run on ``clip``: which part differs, both fingerprints."""
    name, pretrained, fingerprint = saved["name"], saved["pretrained"], saved["fingerprint"]
    if name != clip.name:
        why, fix = "the model differs", f"pass --model {name} --pretrained {pretrained}"
    elif pretrained != clip.pretrained:
        why, fix = "the weights differ", f"pass --model {name} --pretrained {pretrained}"
    elif fingerprint.partition("+")[0] == clip.fingerprint.partition("+")[0]:
        why, fix = "the QuickGELU setting differs", "pass the --quick-gelu setting the prompts were learned with"
    else:
        why, fix = ("fingerprints differ: the weights file changed since training",
                    "restore those weights or learn the prompts again")
    return (f"{directory}: these prompts were learned on model {name} ({pretrained}), not on {clip.name} "
            f"({clip.pretrained}): {why} (fingerprint {_short(fingerprint)} saved, {_short(clip.fingerprint)} "
            f"loaded); {fix}")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type hint (JSON has lists where configs have tuples)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list)
    return True  # other types are left to the config's own checks


def _saved_config(path: Path, config_cls: type, saved: dict[str, Any]) -> Any:
    """The method config of ``prompts.json``, each value checked against its field's type."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for field in dataclasses.fields(config_cls):
        if field.name not in saved:
            continue  # a setting added after these prompts were saved: its default (and presets) apply
        value = saved[field.name]
        hint = hints[field.name]
        if not _matches(value, hint):
            raise PromptsError(f"{path}: config.{field.name} must be of type {getattr(hint, '__name__', hint)}, "
                               f"found {_describe(value)}")
        tuple_field = hint is tuple or typing.get_origin(hint) is tuple
        values[field.name] = tuple(value) if tuple_field and isinstance(value, list) else value
    try:
        return resolve_config(config_cls, values)
    except ValueError as error:  # ConfigError, or a config's own range checks
        raise PromptsError(f"{path}: config: {error}") from error


def _read_saved(directory: str | os.PathLike, clip, registry: dict[str, type]
                ) -> tuple[dict[str, Any], type, Any, dict[str, Tensor], dict[str, str]]:
    """A run's ``prompts.json`` and ``prompts.safetensors``, checked against each other and against ``clip``.

    Returns the metadata, the method class, its config, the tensors and the tensor file's own metadata. Refuses,
    with one ``PromptsError`` line: a ``prompts.json`` of another format or with bad fields, prompts learned on
    another model (saying whether the name, the weights or only the weights' bytes differ), a
    ``prompts.safetensors`` that is unreadable, corrupt or from another run (checksums).
    """
    meta = read_metadata(directory)
    meta_path = Path(directory) / META_FILE
    if meta["method"] not in registry:
        raise PromptsError(f"{meta_path}: unknown method {meta['method']!r}; known: {', '.join(sorted(registry))}")
    if meta["model"]["fingerprint"] != clip.fingerprint:
        raise PromptsError(_model_mismatch(directory, meta["model"], clip))
    cls = registry[meta["method"]]
    config = _saved_config(meta_path, cls.Config, meta["config"])
    tensor_path = Path(directory) / PROMPTS_FILE
    try:
        tensors, stored = load_tensors(tensor_path)
    except IntegrityError as error:
        raise PromptsError(f"{error}; learn the prompts again or restore the file") from error
    except (OSError, ValueError, SafetensorError) as error:  # missing, truncated or not safetensors
        raise PromptsError(f"{tensor_path}: cannot read the saved prompts ({error})") from error
    if meta["tensors_sha256"] != stored[CHECKSUM_KEY]:
        raise PromptsError(f"{tensor_path}: does not belong to {META_FILE} beside it (its tensors' sha256 differs "
                           "from the one recorded there); copy the two files of one run together")
    return meta, cls, config, tensors, stored


def load_method(directory: str | os.PathLike, clip, registry: dict[str, type], backend: str = "auto") -> Any:
    """Rebuild a saved method on ``clip``.

    Refuses, with one ``PromptsError`` line, what ``_read_saved`` refuses and any learned tensor whose name, shape
    or dtype is not exactly that of the method's own ``state()`` (the saved head is not checked: it is derived).
    """
    meta, cls, config, tensors, _ = _read_saved(directory, clip, registry)
    method = cls(clip, meta["class_names"], config, backend=backend)
    tensor_path = Path(directory) / PROMPTS_FILE
    learned = {name: t for name, t in tensors.items() if not name.startswith(HEAD_PREFIX)}
    expected = method.state()
    if set(learned) != set(expected):
        raise PromptsError(f"{tensor_path}: holds {sorted(learned)} but {cls.name} needs {sorted(expected)}")
    for name, want in expected.items():
        got = learned[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise PromptsError(f"{tensor_path}: tensor {name!r} is {_layout(got)}, {cls.name} with these settings "
                               f"needs {_layout(want)}")
    method.load_state(learned)
    method.threshold = meta["threshold"]
    method.info = meta.get("info", {})
    return method


def load_scorer(directory: str | os.PathLike, clip, registry: dict[str, type], backend: str = "auto"
                ) -> Any | None:
    """The saved method scoring with its saved head (``Method.from_head``): ``clip`` needs no text tower.

    None when the run has no head for its method (a score that needs the text tower at test time, such as LSN's
    CoCoOp positive, or a tensor file written by another method): ``load_method`` on the full model then applies.
    Refuses what ``_read_saved`` refuses, and a head whose kinds are not the method's ``text_kinds``.
    """
    meta, cls, config, tensors, stored = _read_saved(directory, clip, registry)
    head = {name: t for name, t in tensors.items() if name.startswith(HEAD_PREFIX)}
    if not head or stored.get("method") != cls.name:
        return None
    expected = {HEAD_PREFIX + kind for kind in cls.text_kinds}
    if set(head) != expected:
        raise PromptsError(f"{Path(directory) / PROMPTS_FILE}: holds the text features {sorted(head)} but "
                           f"{cls.name} scores with {sorted(expected)}")
    # moved to the model's device once, not at every score
    text = {name.removeprefix(HEAD_PREFIX): t.to(clip.device) for name, t in head.items()}
    method = cls.from_head(clip, meta["class_names"], config, text, backend=backend)
    method.threshold = meta["threshold"]
    method.info = meta.get("info", {})
    return method


def _layout(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def recorded_model(meta: dict[str, Any], model: str | None = None, pretrained: str | os.PathLike | None = None,
                   quick_gelu: bool | None = None) -> tuple[str, str | os.PathLike | None, bool | None]:
    """The model to rebuild saved prompts on: the one ``prompts.json`` records, unless the caller names one.

    ``pretrained`` alone gives other weights for the recorded model (e.g. the same file moved); the recorded
    QuickGELU setting applies to the recorded model unless ``quick_gelu`` is given. Returns (name, pretrained,
    quick_gelu) for ``load_clip``.
    """
    saved = meta["model"]
    if model is not None:
        return model, pretrained, quick_gelu
    if quick_gelu is None and isinstance(saved.get("quick_gelu"), bool):
        quick_gelu = saved["quick_gelu"]  # decided once, at training
    return saved["name"], pretrained if pretrained is not None else saved["pretrained"], quick_gelu
