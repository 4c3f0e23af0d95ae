"""Load a frozen CLIP with open_clip: the embedded tiny model, an open_clip name + pretrained tag, or a local file.

No download is ever attempted: a pretrained tag is used only if its weights are already in the local open_clip
(URL) or Hugging Face cache; otherwise loading fails with a message that says to pass a local weights file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from promptkit.assets import MODEL_CONFIG, MODEL_NAME, MODEL_WEIGHTS
from promptkit.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from promptkit.clip.prompts import TextEncoder

EMBEDDED_NAME = MODEL_NAME
EMBEDDED_CONFIG = MODEL_CONFIG
EMBEDDED_WEIGHTS = MODEL_WEIGHTS

PRECISIONS = ("fp32", "fp16", "bf16")
_LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class ModelLoadError(UserError, ValueError):
    """A model or its weights could not be loaded; the message names the model or file and what to do."""


@dataclass(eq=False)
class ClipModel:
    """A frozen open_clip model plus what the rest of promptkit needs to know about it.

    Attributes:
        model: the open_clip ``CLIP`` / ``CustomTextCLIP`` module, in eval mode, no parameter requires grad.
        preprocess: open_clip's eval image transform, ``PIL.Image -> Tensor[3, H, W]``.
        tokenizer: ``open_clip.get_tokenizer(name)``, ``list[str] -> Tensor[N, context_length]`` (int64).
        name: open_clip model name (``"ViT-B-16"``, ``"promptkit-tiny"``).
        pretrained: the tag (``"openai"``), the weights file path, ``"embedded"`` or ``"random"``.
        fingerprint: stable id of what computes the features: the first 16 hex digits of the weights file's
            sha256, or ``name:tag`` for tags (``name:random`` for seeded random weights), with ``+quickgelu``
            appended when the QuickGELU activation is in use (the same weights give other features without it).
        embed_dim: E, the width of image and text features.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (open_clip's low-precision weight conversion).
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: str
    fingerprint: str
    embed_dim: int
    precision: str = "fp32"
    _text_encoder: TextEncoder | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        """Device the model's weights live on."""
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Number of token positions of the text tower (77 for OpenAI CLIP)."""
        return self.text_encoder.context_length

    @property
    def text_encoder(self) -> TextEncoder:
        """The frozen text tower as a :class:`~promptkit.clip.prompts.TextEncoder` (built once, truncating)."""
        if self._text_encoder is None:
            from promptkit.clip.prompts import TextEncoder  # prompts.py builds on this module

            self._text_encoder = TextEncoder(self)
        return self._text_encoder

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) image features.

        Args:
            images: ``[B, 3, H, W]`` preprocessed images (any float dtype, any device).
        Returns:
            ``[B, E]`` float32 features on the model's device.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images: expected images of shape [B, 3, H, W], got {list(images.shape)}")
        dtype = _LOW_PRECISION.get(self.precision, torch.float32)
        return self.model.encode_image(images.to(self.device, dtype)).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Raw (not normalised) text features of whole sentences, computed in batches.

        Texts are grouped by token length so that each batch runs on the shortest context that holds it
        (exact: see :class:`~promptkit.clip.prompts.TextEncoder`); texts longer than the context are cut
        the way open_clip's tokenizer cuts them.

        Args:
            texts: N strings.
            batch_size: texts per forward pass.
        Returns:
            ``[N, E]`` float32 features on the model's device, in the order of ``texts``.
        """
        if isinstance(texts, str):
            raise ValueError("encode_texts: expected a list of strings, got a single string")
        if not texts:
            raise ValueError("encode_texts: the list of texts is empty")
        if batch_size < 1:
            raise ValueError(f"encode_texts: batch_size must be >= 1, got {batch_size}")
        encoder = self.text_encoder
        tokens = self.tokenizer(list(texts)).to(self.device)
        eot = encoder.eot_index(tokens)
        order = torch.argsort(eot)
        out = torch.empty(len(texts), self.embed_dim, device=self.device)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            length = int(eot[rows].max()) + 1 if encoder.truncate else tokens.shape[1]
            batch = tokens[rows, :length]
            out[rows] = encoder(encoder.embed(batch), eot[rows], length=length).float()
        return out


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights come from, resolved without touching the network.

    ``kind`` is ``"file"`` (``path`` is set: a local file, the embedded weights, or a cached tag download) or
    ``"random"`` (seeded random init). ``preprocess`` holds the image-transform overrides a pretrained tag
    declares (mean, std, interpolation, resize_mode).
    """

    kind: str
    path: Path | None
    quick_gelu: bool
    preprocess: dict[str, Any]
    base_fingerprint: str | None  # None: the sha256 of ``path`` (computed when loading)


def load_clip(
    name: str = EMBEDDED_NAME,
    pretrained: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClipModel:
    """Load a frozen CLIP model.

    Args:
        name: an open_clip model name (``open_clip.list_models()``) or ``"promptkit-tiny"``.
        pretrained: one of
            - ``None`` / ``"embedded"``: the weights shipped in ``promptkit/assets`` (``promptkit-tiny`` only);
            - an open_clip tag (``"openai"``): used only if already downloaded to the open_clip URL cache
              (``~/.cache/clip`` or ``cache_dir``) or the Hugging Face cache; never downloaded;
            - a path to a local weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, including
              OpenAI's original TorchScript ``.pt``);
            - ``"random"``: seeded random weights (tests and benchmarks).
        device: where the model is put.
        precision: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` weights (open_clip's conversion; LayerNorms stay fp32).
        quick_gelu: the MLP activation. ``None`` decides automatically: a tag's own setting (``openai`` weights
            were trained with QuickGELU although open_clip's ``ViT-B-16`` config says GELU); for a file,
            QuickGELU if it is an OpenAI TorchScript checkpoint or a Hugging Face cache copy of a QuickGELU
            tag; otherwise the model config's setting (``-quickgelu`` names). Pass ``True``/``False`` for
            files that cannot be recognised, e.g. OpenAI weights re-saved as safetensors.
        cache_dir: open_clip's download cache to look in for tags (the default caches otherwise).
    Raises:
        ModelLoadError: unknown model or tag, uncached tag, missing/unreadable/mismatching weights file.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"load_clip: precision must be one of {PRECISIONS}, got {precision!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"load_clip: invalid device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_clip: device {str(device)!r} requested but no CUDA GPU is available")
    source = resolve_weights(name, pretrained, quick_gelu=quick_gelu, cache_dir=cache_dir)
    random = source.kind == "random"
    model, preprocess = create_model(name, source.quick_gelu, precision, source.preprocess, random=random)
    if source.path is not None:
        _load_weights(model, name, source.path)
        base = source.base_fingerprint or file_fingerprint(source.path)
    else:
        base = source.base_fingerprint
    model.to(device).eval().requires_grad_(False)
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # e.g. a Hugging Face tokenizer that is not cached
        raise ModelLoadError(f"cannot build the tokenizer of model {name!r}: {_one_line(err)}") from None
    label = "embedded" if _is_embedded(name, pretrained) else str(pretrained)
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=label,
        fingerprint=f"{base}+quickgelu" if source.quick_gelu else str(base),
        embed_dim=int(open_clip.get_model_config(name)["embed_dim"]),
        precision=precision,
    )


def resolve_weights(
    name: str,
    pretrained: str | os.PathLike[str] | None,
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> WeightSource:
    """Decide where ``name``'s weights come from and which activation they need (no network, no loading).

    See :func:`load_clip` for the meaning of the arguments.
    """
    if name.startswith(("hf-hub:", "local-dir:")):  # open_clip would fetch these configs from the hub
        raise ModelLoadError(
            f"model {name!r}: hf-hub:/local-dir: names are not supported; pass an open_clip architecture name "
            "with --model and its weights file with --pretrained PATH"
        )
    if name == EMBEDDED_NAME:
        _register_embedded_config()
    config = open_clip.get_model_config(name)
    if config is None:
        raise ModelLoadError(
            f"unknown model {name!r}: use {EMBEDDED_NAME!r} or an open_clip name such as 'ViT-B-16' "
            "(open_clip.list_models() lists them)"
        )
    config_quick_gelu = bool(config.get("quick_gelu", False))

    if _is_embedded(name, pretrained):
        if not EMBEDDED_WEIGHTS.is_file():
            raise ModelLoadError(
                f"the embedded weights {EMBEDDED_WEIGHTS} are missing: rebuild them with "
                "`python -m promptkit.assets.build_default --out promptkit/assets` or pass a weights file with "
                "--pretrained PATH"
            )
        return WeightSource("file", EMBEDDED_WEIGHTS, _pick(quick_gelu, config_quick_gelu), {}, None)
    if pretrained is None or str(pretrained) == "embedded":
        raise ModelLoadError(
            f"model {name!r} has no embedded weights: pass a pretrained tag (e.g. --pretrained openai), "
            f"a local weights file with --pretrained PATH, or use --model {EMBEDDED_NAME}"
        )
    pretrained = str(pretrained)
    if pretrained == "random":
        return WeightSource("random", None, _pick(quick_gelu, config_quick_gelu), {}, f"{name}:random")

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        path = _cached_tag_file(tag_cfg, cache_dir)
        if path is None:
            raise ModelLoadError(
                f"pretrained weights {name}:{pretrained} are not in the local open_clip or Hugging Face cache "
                "and promptkit does not download: pass a local weights file with --pretrained PATH"
            )
        preprocess = {k: tag_cfg[k] for k in _PREPROCESS_KEYS if tag_cfg.get(k) is not None}
        tag_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or config_quick_gelu
        return WeightSource("file", path, _pick(quick_gelu, tag_quick_gelu), preprocess, f"{name}:{pretrained}")

    path = Path(pretrained).expanduser()
    if not path.exists():
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f" (its known tags: {', '.join(tags)})" if tags else ""
        raise ModelLoadError(
            f"weights file not found: {path}; {pretrained!r} is neither a file nor a pretrained tag of "
            f"{name!r}{known}; pass an existing file with --pretrained PATH"
        )
    if not path.is_file():
        raise ModelLoadError(f"weights path {path} is not a file: pass a weights file with --pretrained PATH")
    # a file downloaded by open_clip into the Hugging Face cache carries its tag's settings
    cache_tag = _tag_of_hf_cache_file(name, path)
    preprocess = {k: cache_tag[k] for k in _PREPROCESS_KEYS if cache_tag.get(k) is not None}
    detected = _is_torchscript(path) or bool(cache_tag.get("quick_gelu", False))
    return WeightSource("file", path, _pick(quick_gelu, detected or config_quick_gelu), preprocess, None)


def create_model(
    name: str,
    quick_gelu: bool,
    precision: str = "fp32",
    preprocess: dict[str, Any] | None = None,
    random: bool = False,
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """Build ``name``'s architecture on the CPU, without weights, and its eval transform.

    Args:
        name: an open_clip model name or ``promptkit-tiny``.
        quick_gelu: use QuickGELU (``x * sigmoid(1.702 x)``) instead of GELU in every MLP.
        precision: see :func:`load_clip`.
        preprocess: image-transform overrides (mean, std, interpolation, resize_mode).
        random: seed the random init (so that ``pretrained="random"`` gives the same weights every time).
    Returns:
        ``(model, preprocess)``.
    """
    if name == EMBEDDED_NAME:
        _register_embedded_config()
    pp = preprocess or {}
    kwargs = dict(
        pretrained=None,
        precision=precision,
        device="cpu",
        pretrained_image=False,
        pretrained_text=False,
        image_mean=pp.get("mean"),
        image_std=pp.get("std"),
        image_interpolation=pp.get("interpolation"),
        image_resize_mode=pp.get("resize_mode"),
        quick_gelu=quick_gelu,  # a model kwarg: overrides the config's setting either way
    )
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            if random:
                torch.manual_seed(0)
            model, _, preprocess_val = open_clip.create_model_and_transforms(name, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"cannot build open_clip model {name!r}: {_one_line(err)}") from None
    return model, preprocess_val


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" log line: the weights are loaded right after."""
    root = logging.getLogger()
    hide = _DropMessage("initialized randomly")
    root.addFilter(hide)
    try:
        yield
    finally:
        root.removeFilter(hide)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """First 16 hex digits of the sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _is_embedded(name: str, pretrained: str | os.PathLike[str] | None) -> bool:
    return name == EMBEDDED_NAME and (pretrained is None or str(pretrained) == "embedded")


def _pick(explicit: bool | None, automatic: bool) -> bool:
    return automatic if explicit is None else bool(explicit)


def _register_embedded_config() -> None:
    if EMBEDDED_NAME in open_clip.list_models():
        return
    if not EMBEDDED_CONFIG.is_file():
        raise ModelLoadError(f"the embedded model config {EMBEDDED_CONFIG} is missing: reinstall promptkit")
    open_clip.add_model_config(EMBEDDED_CONFIG)


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """The local copy of a tag's weights, looked up where open_clip would download it; None if absent."""
    if tag_cfg.get("file"):
        path = Path(tag_cfg["file"])
        return path if path.is_file() else None
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, filename = os.path.split(hf_hub)
            # open_clip prefers a safetensors copy of its default pickle file when the repo has one
            candidates = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME] if not filename else [filename]
            if filename.endswith((".bin", ".pth")):
                candidates.insert(0, filename[:-4] + ".safetensors")
            for candidate in candidates:
                hit = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
    url = tag_cfg.get("url", "")
    if url:
        root = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        path = root / os.path.basename(url)
        if path.is_file():
            return path
    return None


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original checkpoints are TorchScript archives (a zip holding ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _tag_of_hf_cache_file(name: str, path: Path) -> dict[str, Any]:
    """The pretrained config of ``name``'s tag whose Hugging Face cache folder holds ``path`` ({} if none)."""
    repo_dirs = {part for part in path.resolve().parts if part.startswith("models--")}
    if not repo_dirs:
        return {}
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        repo_id = os.path.split(cfg.get("hf_hub", ""))[0]
        if repo_id and "models--" + repo_id.replace("/", "--") in repo_dirs:
            return cfg
    return {}


def _load_weights(model: torch.nn.Module, name: str, path: Path) -> None:
    """Load a full CLIP checkpoint strictly; turn every failure into one ModelLoadError line."""
    torchscript = _is_torchscript(path)
    try:
        # TorchScript archives cannot be read with weights_only; torch.load hands them to torch.jit.load
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=not torchscript)
        return
    except Exception as err:
        load_error = err
    try:
        state = open_clip.factory.load_state_dict(str(path), weights_only=not torchscript)
    except Exception as err:
        raise ModelLoadError(
            f"cannot read weights file {path} (truncated, corrupt or not a checkpoint: {_one_line(err)}); "
            "re-download or re-export it"
        ) from None
    raise ModelLoadError(
        f"weights file {path} does not fit model {name!r} ({_describe_mismatch(model, state, load_error)}); "
        "pass the --model the file was saved from"
    ) from None


def _describe_mismatch(model: torch.nn.Module, state: Any, err: Exception) -> str:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state dict"
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped)):
        if items:
            parts.append(f"{len(items)} {label}, e.g. {items[0]}")
    return "; ".join(parts) or _one_line(err)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first}"[:300]
