"""What every OOD method shares: the interface, its configuration with presets, saving/loading learned prompts.

The training loop and the optimiser settings live in ``promptkit.methods.training``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from safetensors import SafetensorError
from torch import Tensor

import promptkit
from promptkit.data.atomic import atomic_dir, atomic_write
from promptkit.data.integrity import CHECKSUM_KEY, IntegrityError, load_tensors, save_tensors
from promptkit.errors import ConfigError, UserError

PROMPTS_FILE = "prompts.safetensors"
META_FILE = "prompts.json"
# Version of the saved layout, recorded in prompts.json. 2: a "format" field and the tensors' sha256 (in both
# files). A folder of another version is refused with a message saying which side is older.
PROMPTS_FORMAT = 2
# prompts.safetensors also holds the frozen text features each score uses, under "head.<name>", so that a detector
# scores without a text tower (promptkit.detector); its metadata names the method that wrote it.
HEAD_PREFIX = "head."


class PromptsError(UserError, ValueError):
    """Saved prompts that cannot be used here (missing, corrupt, or for another model or class list)."""


def resolve_config(config_cls: type, overrides: dict[str, Any] | None = None) -> Any:
    """A method's config: the paper defaults, then the presets that its choice fields select, then ``overrides``.

    A config class may declare ``PRESETS = {field: {value: {other_field: value, ...}}}``: choosing that value (by
    default or in ``overrides``) sets those fields, e.g. ``compat="official-code"`` sets the released code's
    learning rates. The user's ``overrides`` are applied last, so an explicit setting always wins.
    """
    overrides = dict(overrides or {})
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    for choice_field, table in getattr(config_cls, "PRESETS", {}).items():
        choice = overrides.get(choice_field, defaults[choice_field])
        if choice not in table:
            raise ConfigError(f"{choice_field} must be one of {', '.join(map(str, table))}, got {choice!r}")
        values.update(table[choice])
    values.update(overrides)
    return config_cls(**values)


class Method:
    """An OOD detector on a frozen CLIP: ``fit`` on image features, ``score`` new ones (higher = more ID).

    Subclasses set ``name`` and ``Config`` (a dataclass whose defaults are the paper's), implement ``fit`` when
    they learn something, ``_text_features`` and ``score``, and list their learned tensors in ``state()``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    trainable: ClassVar[bool] = True
    # True for methods that learn from images collected for their labels (LAPT), not from --train images.
    collects_training_images: ClassVar[bool] = False
    # Training images per class of the paper's main table (``--shots`` overrides it; 0: all images).
    default_shots: ClassVar[int] = 16
    # The names of text_features()' parts in the saved head ("head.<name>"), in the order text_features() has.
    head_names: ClassVar[tuple[str, ...]] = ("text",)

    def __init__(self, clip, class_names: list[str], config: Any = None, backend: str = "auto") -> None:
        if not class_names:
            raise ValueError(f"{self.name}: the class list is empty; give at least one in-distribution class")
        self.clip = clip
        self.class_names = list(class_names)
        self.config = config if config is not None else resolve_config(self.Config)
        self.backend = backend
        self.threshold: float | None = None
        self.info: dict[str, Any] = {}

    # -- learning and scoring -------------------------------------------------------------------------

    def mine(self, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> object:
        """Prepare what the method derives from the model before training (NegLabel/LAPT: negative labels)."""
        return None

    def fit(self, features: Tensor, labels: Tensor, progress: bool = True) -> "Method":
        """Learn from image features [N, E] with labels [N] (int64, class indices)."""
        return self

    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """OOD score [N] (higher = more in-distribution) and predicted class [N] for image features [N, E]."""
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """The learned tensors that ``save`` stores (empty for zero-shot methods)."""
        return {}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore what ``state`` returned."""

    # -- persistence ----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The ``prompts.json`` fields that describe the method (``save`` adds the tensors' checksum)."""
        return {
            "format": PROMPTS_FORMAT,
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "model": self.clip.describe(),
            "class_names": self.class_names,
            "threshold": self.threshold,
            "info": self.info,
            "promptkit_version": promptkit.__version__,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``prompts.safetensors`` and the ``prompts.json`` sidecar into ``directory``, as one atomic step.

        Both files record the sha256 of the tensors, so a damaged file or a pair from two runs is refused on load.
        """
        directory = Path(directory)
        with atomic_dir(directory) as staging:
            digest = save_tensors(staging / PROMPTS_FILE, {**self.state(), **self.head()},
                                  metadata={"method": self.name})
            with atomic_write(staging / META_FILE) as tmp:
                tmp.write_text(json.dumps({**self.metadata(), "tensors_sha256": digest}, indent=2))
        return directory

    # -- deployment: scoring from the saved text features ---------------------------------------------------

    def head_text(self) -> Tensor | tuple[Tensor, ...] | None:
        """What ``text_features()`` returns, computed in this process alone (``save`` runs on one rank only);
        None when the score needs the text tower at test time (then no head is saved)."""
        return self.text_features()

    def head(self) -> dict[str, Tensor]:
        """The frozen text features the score uses, named ``head.<name>`` (fp32; {} when there is no head)."""
        text = self.head_text()
        if text is None:
            return {}
        parts = text if isinstance(text, tuple) else (text,)
        return {HEAD_PREFIX + name: t.detach().float() for name, t in zip(self.head_names, parts, strict=True)}

    @classmethod
    def from_head(cls, clip, class_names: list[str], config: Any, head: dict[str, Tensor],
                  backend: str = "auto") -> "Method":
        """The method scoring with saved text features ``head`` (what ``head()`` returned): ``score`` needs no text
        tower, so ``clip`` may be an image-only model; ``fit`` and ``state`` do not work.

        The subclass's ``__init__``, which builds prompt learners on the text tower, is not run.
        """
        method = cls.__new__(cls)
        Method.__init__(method, clip, class_names, config, backend)
        parts = tuple(head[HEAD_PREFIX + name] for name in cls.head_names)
        text = parts if len(parts) > 1 else parts[0]
        method.text_features = lambda: text  # shadows the class's text_features: score() reads the saved features
        return method


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


def load_method(directory: str | os.PathLike, clip, registry: dict[str, type], backend: str = "auto") -> Method:
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
                ) -> Method | None:
    """The saved method scoring with its saved head (``Method.from_head``): ``clip`` needs no text tower.

    None when the run has no head for its method (a score that needs the text tower at test time, such as LSN's
    CoCoOp positive, or a tensor file written by another method): ``load_method`` on the full model then applies.
    Refuses what ``_read_saved`` refuses, and a head whose parts are not the method's ``head_names``.
    """
    meta, cls, config, tensors, stored = _read_saved(directory, clip, registry)
    head = {name: t for name, t in tensors.items() if name.startswith(HEAD_PREFIX)}
    if not head or stored.get("method") != cls.name:
        return None
    expected = {HEAD_PREFIX + name for name in cls.head_names}
    if set(head) != expected:
        raise PromptsError(f"{Path(directory) / PROMPTS_FILE}: holds the text features {sorted(head)} but "
                           f"{cls.name} scores with {sorted(expected)}")
    head = {name: t.to(clip.device) for name, t in head.items()}  # once, not at every score
    method = cls.from_head(clip, meta["class_names"], config, head, backend=backend)
    method.threshold = meta["threshold"]
    method.info = meta.get("info", {})
    return method


def _layout(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
