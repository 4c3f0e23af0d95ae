"""Load a frozen CLIP with open_clip: the embedded tiny model, an open_clip name or config file + a pretrained tag
or a local weights file.

No download is ever attempted: a pretrained tag is used only if its weights are already in the local open_clip
(URL) or Hugging Face cache; otherwise loading fails with a message that says to pass a local weights file. The
same holds for the Hugging Face text models and tokenizers that some configs name (SigLIP, roberta towers).

``load_clip(..., text_tower=False)`` builds the image tower alone (a deployed detector scores with saved text
features): for a weights file it reads only the ``visual.*`` tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from promptkit.assets import MODEL_CONFIG, MODEL_NAME, MODEL_WEIGHTS
from promptkit.clip.errors import ModelLoadError
from promptkit.clip.text import TextEncoder
from promptkit.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

EMBEDDED_NAME = MODEL_NAME
EMBEDDED_CONFIG = MODEL_CONFIG
EMBEDDED_WEIGHTS = MODEL_WEIGHTS

PRECISIONS = ("fp32", "fp16", "bf16")
_LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
_CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip.add_model_config registers
_WARNED: set[str] = set()  # weights files whose QuickGELU warning was shown
_EXPLICIT = "set explicitly (--quick-gelu)"


@dataclass(eq=False)
class ClipModel:
    """A frozen open_clip model plus what the rest of promptkit needs to know about it.

    Attributes:
        model: the open_clip ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` module, or an :class:`ImageTower` when loaded
            without its text tower; in eval mode, no parameter requires grad.
        preprocess: open_clip's eval image transform, ``PIL.Image -> Tensor[3, H, W]``.
        tokenizer: ``open_clip.get_tokenizer(name)``, ``list[str] -> Tensor[N, context_length]`` (int64); None
            without the text tower.
        name: open_clip model name (``"ViT-B-16"``, ``"promptkit-tiny"``) or the absolute path of the model config
            file it was loaded from.
        pretrained: the tag (``"openai"``), the weights file path, ``"embedded"`` or ``"random"``.
        fingerprint: stable id of what computes the features: the first 16 hex digits of the weights file's
            sha256, or ``name:tag`` for tags (``name:random`` for seeded random weights), with ``+quickgelu``
            appended when the QuickGELU activation is in use (the same weights give other features without it).
        embed_dim: E, the width of image and text features.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (open_clip's low-precision weight conversion).
        quick_gelu: whether the MLPs use QuickGELU.
        quick_gelu_from: how that was decided (the flag, the tag, the file's hash or name, the config).
    """

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor] | None
    name: str
    pretrained: str
    fingerprint: str
    embed_dim: int
    precision: str = "fp32"
    quick_gelu: bool = False
    quick_gelu_from: str = ""

    @property
    def device(self) -> torch.device:
        """Device the model's weights live on."""
        return next(self.model.parameters()).device

    @property
    def has_text_tower(self) -> bool:
        """False for a model loaded with ``text_tower=False`` (image features only)."""
        return self.tokenizer is not None

    @property
    def context_length(self) -> int:
        """Number of token positions of the text tower (77 for OpenAI CLIP)."""
        return self.text_encoder.context_length

    @cached_property
    def text_encoder(self) -> TextEncoder:
        """The frozen text tower as a truncating :class:`~promptkit.clip.text.TextEncoder`, built on first use;
        ``del clip.text_encoder`` rebuilds it on the next use (after a change to the tower's settings)."""
        if not self.has_text_tower:
            raise ModelLoadError(f"model {self.name!r} was loaded without its text tower (text_tower=False)")
        return TextEncoder(self)

    def describe(self) -> dict[str, Any]:
        """The model as ``prompts.json`` records it: name, weights, fingerprint, activation and text tower."""
        info: dict[str, Any] = {"name": self.name, "pretrained": self.pretrained, "fingerprint": self.fingerprint,
                                "quick_gelu": self.quick_gelu, "quick_gelu_from": self.quick_gelu_from}
        if self.has_text_tower:
            info["text_tower"] = self.text_encoder.describe()
        return info

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
        (exact: see :class:`~promptkit.clip.text.TextEncoder`); texts longer than the context are cut
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
            length = encoder.run_length(eot[rows])
            out[rows] = encoder(encoder.embed(tokens[rows, :length]), eot[rows], length=length).float()
        return out


class ImageTower(nn.Module):
    """The image half of an open_clip model, with the full model's ``encode_image``.

    Args:
        visual: the model's ``visual`` module.
        normalize: L2-normalise the features (CoCa's ``encode_image`` does, CLIP's does not).
    """

    def __init__(self, visual: nn.Module, normalize: bool = False) -> None:
        super().__init__()
        self.visual = visual
        self.normalize = normalize

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, E]`` image features, as the full model's ``encode_image`` computes them."""
        out = self.visual(images)
        if isinstance(out, tuple):  # towers with output_tokens (CoCa) return (pooled, tokens)
            out = out[0]
        return F.normalize(out, dim=-1) if self.normalize else out


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights come from, resolved without touching the network.

    ``kind`` is ``"file"`` (``path`` is set: a local file, the embedded weights, or a cached tag download) or
    ``"random"`` (seeded random init). ``preprocess`` holds the image-transform overrides a pretrained tag
    declares (mean, std, interpolation, resize_mode). ``quick_gelu_from`` says how ``quick_gelu`` was decided.
    """

    kind: str
    path: Path | None
    quick_gelu: bool
    preprocess: dict[str, Any]
    base_fingerprint: str | None  # None: the sha256 of ``path`` (computed when loading)
    quick_gelu_from: str = ""


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that exists here (a CUDA device needs a GPU); ConfigError otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"invalid device {device!r}: {err}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(parsed)!r} requested but no CUDA GPU is available")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(parsed)!r} requested but this machine has {torch.cuda.device_count()} GPUs")
    return parsed


def load_clip(
    name: str = EMBEDDED_NAME,
    pretrained: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    text_tower: bool = True,
) -> ClipModel:
    """Load a frozen CLIP model.

    Everything that can fail on the user's input (the config, a Hugging Face dependency, the weights' origin,
    the tokenizer, a text tower that cannot take learned context) is checked before the weights are read.

    Args:
        name: an open_clip model name (``open_clip.list_models()``), ``"promptkit-tiny"``, or the path of an
            open_clip model config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``), registered under its
            file name.
        pretrained: one of
            - ``None`` / ``"embedded"``: the weights shipped in ``promptkit/assets`` (``promptkit-tiny`` only);
            - an open_clip tag (``"openai"``): used only if already downloaded to the open_clip URL cache
              (``~/.cache/clip`` or ``cache_dir``) or the Hugging Face cache; never downloaded;
            - a path to a local weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, including
              OpenAI's original TorchScript ``.pt``);
            - ``"random"``: seeded random weights (tests and benchmarks).
        device: where the model is put.
        precision: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` weights (open_clip's conversion; LayerNorms stay fp32).
        quick_gelu: the MLP activation; ``None`` decides from what is known (see :func:`resolve_weights`) and
            warns, once per file, where nothing is.
        cache_dir: open_clip's download cache to look in for tags (the default caches otherwise).
        text_tower: False builds the image tower alone (an :class:`ImageTower`, no tokenizer): the features of
            ``encode_images`` are the same, the text tower is never built or read.
    Raises:
        ModelLoadError: unknown model, tag or config, uncached tag, missing/unreadable/mismatching weights file,
            a missing optional dependency, a text tower that cannot take learned context.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"load_clip: precision must be one of {PRECISIONS}, got {precision!r}")
    device = parse_device(device)
    arch, config = model_config(name)
    label = model_label(name)
    if text_tower:
        _check_text_dependencies(label, config)
    source = resolve_weights(name, pretrained, quick_gelu=quick_gelu, cache_dir=cache_dir)
    tokenizer = _tokenizer(label, arch, config) if text_tower else None
    image_only = None
    if not text_tower and source.path is not None:
        image_only = _load_image_tower(label, config, source, precision)
    if image_only is not None:
        model, preprocess = image_only
    else:
        model, preprocess = create_model(arch, source.quick_gelu, precision, source.preprocess,
                                         random=source.kind == "random")
    base = source.base_fingerprint or file_fingerprint(source.path)
    clip = ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=label,
        pretrained="embedded" if _is_embedded(name, pretrained) else str(pretrained),
        fingerprint=f"{base}+quickgelu" if source.quick_gelu else str(base),
        embed_dim=int(config["embed_dim"]),
        precision=precision,
        quick_gelu=source.quick_gelu,
        quick_gelu_from=source.quick_gelu_from,
    )
    if text_tower:
        _ = clip.text_encoder  # built now: a tower that cannot take learned context fails before the weights are read
    if image_only is None and source.path is not None:
        _load_weights(model, label, source.path)
    if not text_tower and image_only is None:
        clip.model = ImageTower(model.visual, normalize=isinstance(model, open_clip.CoCa))
    clip.model.to(device).eval().requires_grad_(False)
    return clip


def model_config(name: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The open_clip name and config of ``name``: a known model name, or a config JSON file (registered with
    ``open_clip.add_model_config`` under its file name).

    Raises:
        ModelLoadError: an unknown name, a config file that is missing, not JSON or not a CLIP config, or one
            named like another registered model but different from it.
    """
    text = os.fspath(name)
    if text.startswith(("hf-hub:", "local-dir:")):  # open_clip would fetch these configs from the hub
        raise ModelLoadError(
            f"model {text!r}: hf-hub:/local-dir: names are not supported; pass an open_clip architecture name or "
            "a model config JSON with --model and the weights file with --pretrained PATH"
        )
    if text == EMBEDDED_NAME:
        _register_embedded_config()
    path = Path(text).expanduser()
    if text.endswith(".json") or (os.sep in text and path.exists()):
        return _register_config_file(path)
    config = open_clip.get_model_config(text)
    if config is None:
        raise ModelLoadError(
            f"unknown model {text!r}: use {EMBEDDED_NAME!r}, an open_clip name such as 'ViT-B-16' "
            "(open_clip.list_models() lists them) or the path of a model config JSON"
        )
    return text, config


def model_label(name: str | os.PathLike[str]) -> str:
    """How a model is named in fingerprints and ``prompts.json``: its open_clip name, or the absolute path of its
    config file (so that a run can be reloaded from any folder)."""
    arch, _ = model_config(name)
    text = os.fspath(name)
    return text if arch == text else str(Path(text).expanduser().resolve())


def _register_config_file(path: Path) -> tuple[str, dict[str, Any]]:
    if not path.is_file():
        raise ModelLoadError(f"model config {path} is not a file" if path.exists() else
                             f"model config file not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"model config {path} is not readable JSON ({_one_line(err)})") from None
    missing = [key for key in _CLIP_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise ModelLoadError(f"model config {path} does not describe an open_clip CLIP: no {', '.join(missing)} "
                             f"(a config needs {', '.join(_CLIP_KEYS)})")
    wrong = [key for key, kind in (("embed_dim", int), ("vision_cfg", dict), ("text_cfg", dict))
             if not isinstance(config[key], kind) or isinstance(config[key], bool)]
    if wrong:
        raise ModelLoadError(f"model config {path}: {wrong[0]} must be "
                             f"{'an integer' if wrong[0] == 'embed_dim' else 'an object'}, got {config[wrong[0]]!r}")
    arch = path.stem
    known = open_clip.get_model_config(arch)
    if known is not None and known != config:
        raise ModelLoadError(f"model config {path} is named like the registered model {arch!r} but differs from "
                             "it; rename the file")
    if known is None:
        open_clip.add_model_config(path)
    return arch, config


def resolve_weights(
    name: str,
    pretrained: str | os.PathLike[str] | None,
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> WeightSource:
    """Decide where ``name``'s weights come from and which activation they need (no network, no loading).

    QuickGELU, unless ``quick_gelu`` is given: a tag's own setting (``openai`` weights were trained with QuickGELU
    although open_clip's ``ViT-B-16`` config says GELU); for a file, in this order: a ``-quickgelu`` config, an
    OpenAI TorchScript archive, a Hugging Face cache copy of a tag, a sha256 that open_clip's registry records
    (OpenAI's downloads, open_clip's releases), a registry file name, and the model having no QuickGELU weights at
    all. Where none of these tells, GELU (the config's) with a warning, once per file, naming the flag.

    A file's sha256 is computed here (``base_fingerprint``). See :func:`load_clip` for the arguments.
    """
    arch, config = model_config(name)
    label = model_label(name)
    config_quick_gelu = bool(config.get("quick_gelu", False))
    from_config = f"the model config of {arch!r}"

    if _is_embedded(name, pretrained):
        if not EMBEDDED_WEIGHTS.is_file():
            raise ModelLoadError(
                f"the embedded weights {EMBEDDED_WEIGHTS} are missing: rebuild them with "
                "`python -m promptkit.assets.build_default --out promptkit/assets` or pass a weights file with "
                "--pretrained PATH"
            )
        return _source("file", EMBEDDED_WEIGHTS, quick_gelu, (config_quick_gelu, from_config), {}, None)
    if pretrained is None or str(pretrained) == "embedded":
        raise ModelLoadError(
            f"model {name!r} has no embedded weights: pass a pretrained tag (e.g. --pretrained openai), "
            f"a local weights file with --pretrained PATH, or use --model {EMBEDDED_NAME}"
        )
    pretrained = str(pretrained)
    if pretrained == "random":
        return _source("random", None, quick_gelu, (config_quick_gelu, from_config), {}, f"{label}:random")

    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        path = _cached_tag_file(tag_cfg, cache_dir)
        if path is None:
            raise ModelLoadError(
                f"pretrained weights {arch}:{pretrained} are not in the local open_clip or Hugging Face cache "
                "and promptkit does not download: pass a local weights file with --pretrained PATH"
            )
        preprocess = {k: tag_cfg[k] for k in _PREPROCESS_KEYS if tag_cfg.get(k) is not None}
        tag_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or config_quick_gelu
        return _source("file", path, quick_gelu, (tag_quick_gelu, f"the pretrained tag {arch}:{pretrained}"),
                       preprocess, f"{label}:{pretrained}")

    path = Path(pretrained).expanduser()
    if not path.exists():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f" (its known tags: {', '.join(tags)})" if tags else ""
        raise ModelLoadError(
            f"weights file not found: {path}; {pretrained!r} is neither a file nor a pretrained tag of "
            f"{name!r}{known}; pass an existing file with --pretrained PATH"
        )
    if not path.is_file():
        raise ModelLoadError(f"weights path {path} is not a file: pass a weights file with --pretrained PATH")
    # a file downloaded by open_clip into the Hugging Face cache carries its tag's settings
    cache_tag, cache_cfg = _tag_of_hf_cache_file(arch, path)
    preprocess = {k: cache_cfg[k] for k in _PREPROCESS_KEYS if cache_cfg.get(k) is not None}
    digest = file_sha256(path)
    if quick_gelu is not None:
        return WeightSource("file", path, bool(quick_gelu), preprocess, digest[:16], _EXPLICIT)
    decided, why, warning = _decide_quick_gelu(arch, path, config_quick_gelu, cache_tag, cache_cfg, digest)
    if warning and str(path.resolve()) not in _WARNED:
        _WARNED.add(str(path.resolve()))
        warnings.warn(warning, stacklevel=3)
    return WeightSource("file", path, decided, preprocess, digest[:16], why)


def _source(kind: str, path: Path | None, explicit: bool | None, automatic: tuple[bool, str],
            preprocess: dict[str, Any], base: str | None) -> WeightSource:
    """A source whose activation is ``explicit`` when given, else ``automatic`` (value, how it was decided)."""
    if explicit is not None:
        return WeightSource(kind, path, bool(explicit), preprocess, base, _EXPLICIT)
    return WeightSource(kind, path, automatic[0], preprocess, base, automatic[1])


def _decide_quick_gelu(arch: str, path: Path, config_quick_gelu: bool, cache_tag: str, cache_cfg: dict[str, Any],
                       digest: str) -> tuple[bool, str, str | None]:
    """``(quick_gelu, how it was decided, warning or None)`` for a weights file of model ``arch``."""
    if config_quick_gelu:
        return True, f"the model config of {arch!r}", None
    if _is_torchscript(path):
        return True, "an OpenAI TorchScript checkpoint", None
    if cache_cfg:
        return bool(cache_cfg.get("quick_gelu", False)), f"the Hugging Face cache copy of {arch}:{cache_tag}", None
    tags = {tag: open_clip.get_pretrained_cfg(arch, tag) for tag in open_clip.list_pretrained_tags_by_model(arch)}
    for tag, cfg in tags.items():
        known = _registry_sha256(cfg)
        if known and digest.startswith(known):
            return bool(cfg.get("quick_gelu", False)), f"the sha256 of open_clip's {arch}:{tag} download", None
    for tag, cfg in tags.items():  # a registry name without a recorded hash (a matching hash was checked above)
        if cfg.get("url") and os.path.basename(cfg["url"]) == path.name and not _registry_sha256(cfg):
            return bool(cfg.get("quick_gelu", False)), f"the file name of open_clip's {arch}:{tag} download", None
    hub = {tag: bool(cfg.get("quick_gelu", False)) for tag, cfg in tags.items() if path.name in _hub_names(cfg)}
    if hub and len(set(hub.values())) == 1:
        return next(iter(hub.values())), f"the Hugging Face file name of {arch}:{', '.join(hub)}", None
    quick = [tag for tag, cfg in tags.items() if cfg.get("quick_gelu", False)]
    if not quick:
        return False, f"no QuickGELU weights are known for {arch!r}", None
    gelu = [tag for tag in tags if tag not in quick]
    origin = f"{path.name} is the file name of both" if hub else "the file does not tell; open_clip lists"
    warning = (f"weights file {path}: QuickGELU or GELU cannot be known ({origin} QuickGELU weights of {arch} "
               f"({', '.join(quick[:3])}) and GELU ones ({', '.join(gelu[:3])})); using the config's GELU. Pass "
               "--quick-gelu yes (quick_gelu=True) for OpenAI-trained or other QuickGELU weights, --quick-gelu no "
               "to confirm GELU")
    return False, "assumed: the model config's GELU (the file does not tell)", warning


def _registry_sha256(cfg: dict[str, Any]) -> str:
    """The sha256 (or its leading hex digits) open_clip checks a tag's URL download against; '' if none."""
    url = cfg.get("url", "")
    if "openaipublic" in url:
        known = url.split("/")[-2]
    elif "mlfoundations" in url:
        known = os.path.splitext(os.path.basename(url))[0].split("-")[-1]
    else:
        return ""
    return known if re.fullmatch(r"[0-9a-f]{8,64}", known) else ""


def _hub_names(cfg: dict[str, Any]) -> set[str]:
    """File names a tag's Hugging Face weights have (open_clip prefers a safetensors copy of a pickle file)."""
    hf_hub = cfg.get("hf_hub", "")
    if not hf_hub:
        return set()
    filename = os.path.split(hf_hub)[1] or HF_WEIGHTS_NAME
    names = {filename}
    if filename == HF_WEIGHTS_NAME:
        names.add(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.add(filename[:-4] + ".safetensors")
    return names


def create_model(
    name: str,
    quick_gelu: bool,
    precision: str = "fp32",
    preprocess: dict[str, Any] | None = None,
    random: bool = False,
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """Build ``name``'s architecture on the CPU, without weights, and its eval transform.

    Args:
        name: an open_clip model name, ``promptkit-tiny`` or a model config JSON path.
        quick_gelu: use QuickGELU (``x * sigmoid(1.702 x)``) instead of GELU in every MLP.
        precision: see :func:`load_clip`.
        preprocess: image-transform overrides (mean, std, interpolation, resize_mode).
        random: seed the random init (so that ``pretrained="random"`` gives the same weights every time).
    Returns:
        ``(model, preprocess)``.
    """
    arch, config = model_config(name)
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
        **_local_hf_text(arch, config),
    )
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            if random:
                torch.manual_seed(0)
            model, _, preprocess_val = open_clip.create_model_and_transforms(arch, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"cannot build open_clip model {arch!r}: {_one_line(err)}") from None
    return model, preprocess_val


def _local_hf_text(arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The ``text_cfg`` override that builds a Hugging Face text tower from a local folder (no download), or {}."""
    text_cfg = config["text_cfg"]
    hf_name = text_cfg.get("hf_model_name")
    if not hf_name:
        return {}
    folder = Path(hf_name).expanduser()
    if not folder.is_dir():
        folder = _hf_cache_folder(hf_name)
    if folder is None:
        raise ModelLoadError(
            f"model {arch!r}: its Hugging Face text model {hf_name!r} is neither a local folder nor in the local "
            "Hugging Face cache, and promptkit does not download; save it to a folder and point text_cfg."
            "hf_model_name of a model config JSON (--model CONFIG.json) at it"
        )
    # the CLIP checkpoint (or the seeded random init) provides the weights, never the Hugging Face hub
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}}


def _hf_cache_folder(repo_id: str) -> Path | None:
    """The Hugging Face cache snapshot that holds ``repo_id``'s config.json, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # no huggingface_hub, or not a valid repo id
        return None
    return Path(hit).parent if isinstance(hit, str) and os.path.isfile(hit) else None


def _check_text_dependencies(name: str, config: dict[str, Any]) -> None:
    """Fail before any work when the text tower or tokenizer needs ``transformers`` and it is missing."""
    text_cfg = config["text_cfg"]
    if text_cfg.get("hf_model_name"):
        what = f"Hugging Face text tower {text_cfg['hf_model_name']!r}"
    elif text_cfg.get("hf_tokenizer_name"):
        what = f"tokenizer {text_cfg['hf_tokenizer_name']!r}"
    else:
        return
    if importlib.util.find_spec("transformers") is None:
        raise ModelLoadError(f"model {name!r}: its {what} needs the transformers package: "
                             "pip install 'promptkit[hf]'")


def _tokenizer(name: str, arch: str, config: dict[str, Any]) -> Callable[..., torch.Tensor]:
    text_cfg = config["text_cfg"]
    hf_tokenizer = text_cfg.get("hf_tokenizer_name")
    if not hf_tokenizer and "siglip" in arch.lower():
        raise ModelLoadError(f"model {name!r}: without text_cfg.hf_tokenizer_name open_clip downloads a SigLIP "
                             "vocabulary; name a local tokenizer folder there")
    try:
        # Hugging Face tokenizers: the local cache or a folder only, never the hub
        return open_clip.get_tokenizer(arch, **({"local_files_only": True} if hf_tokenizer else {}))
    except Exception as err:  # e.g. a Hugging Face tokenizer that is not cached
        where = (f" (tokenizer {hf_tokenizer!r} must be a local folder or in the local Hugging Face cache)"
                 if hf_tokenizer else "")
        raise ModelLoadError(f"cannot build the tokenizer of model {name!r}: {_one_line(err)}{where}") from None


def _load_image_tower(name: str, config: dict[str, Any], source: WeightSource, precision: str
                      ) -> tuple[ImageTower, Callable[[Image.Image], torch.Tensor]] | None:
    """The image tower alone, with the ``visual.*`` weights of ``source.path``, and its eval transform.

    The tower is built on the meta device (no init cost) and takes the file's tensors as they are. None when the
    file needs open_clip's full loader (another key layout, resized position embeddings) or the tower computes
    buffers at init: the caller then loads the whole model and drops its text tower.
    """
    from open_clip.model import _build_vision_tower

    cast_dtype = open_clip.get_cast_dtype(precision)
    try:
        with torch.device("meta"):
            visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], source.quick_gelu, cast_dtype)
    except Exception:  # a tower that cannot be built on the meta device
        return None
    # assign keeps a tensor's dtype: cast to the tower's own, as a copy into it would (fp16 files, fp32 towers)
    dtypes = {key: t.dtype for key, t in visual.state_dict().items()}
    state = {key: t.to(dtypes[key]) if key in dtypes else t for key, t in _visual_state(name, source.path).items()}
    try:
        visual.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        return None
    if any(t.is_meta for t in chain(visual.parameters(), visual.buffers())):
        return None
    if precision in _LOW_PRECISION:  # open_clip's mixed precision, as create_model applies it
        dtype = _LOW_PRECISION[precision]
        if "timm_model_name" in config["vision_cfg"]:
            visual.to(dtype)
            for module in visual.modules():
                if isinstance(module, open_clip.transformer.LayerNormFp32):
                    module.float()
        else:
            open_clip.convert_weights_to_lp(visual, dtype=dtype)
    return ImageTower(visual, normalize="multimodal_cfg" in config), _eval_transform(visual, source.preprocess)


def _visual_state(name: str, path: Path) -> dict[str, torch.Tensor]:
    """The ``visual.*`` tensors of a CLIP checkpoint, prefix removed; a safetensors file is read for those only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k[7:]: handle.get_tensor(k) for k in handle.keys() if k.startswith("visual.")}
        state = open_clip.factory.load_state_dict(str(path), weights_only=not _is_torchscript(path))
    except Exception as err:
        raise ModelLoadError(
            f"cannot read weights file {path} (truncated, corrupt or not a checkpoint: {_one_line(err)}); "
            "re-download or re-export it"
        ) from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"weights file {path} does not fit model {name!r} (it holds a "
                             f"{type(state).__name__}, not a state dict); pass the --model the file was saved from")
    return {k[7:]: v for k, v in state.items() if k.startswith("visual.")}


def _eval_transform(visual: nn.Module, preprocess: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform for an image tower, as ``create_model_and_transforms`` derives it."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    cfg = asdict(PreprocessCfg())
    if hasattr(visual, "image_size"):
        cfg["size"] = visual.image_size
    cfg = merge_preprocess_dict(cfg, {k: preprocess.get(k) for k in _PREPROCESS_KEYS})
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """First 16 hex digits of the sha256 of a file's bytes."""
    return file_sha256(path)[:16]


def _is_embedded(name: str, pretrained: str | os.PathLike[str] | None) -> bool:
    return name == EMBEDDED_NAME and (pretrained is None or str(pretrained) == "embedded")


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


def _tag_of_hf_cache_file(arch: str, path: Path) -> tuple[str, dict[str, Any]]:
    """The tag of ``arch`` (and its pretrained config) whose Hugging Face cache folder holds ``path``, or ('', {})."""
    repo_dirs = {part for part in path.resolve().parts if part.startswith("models--")}
    if not repo_dirs:
        return "", {}
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        repo_id = os.path.split(cfg.get("hf_hub", ""))[0]
        if repo_id and "models--" + repo_id.replace("/", "--") in repo_dirs:
            return tag, cfg
    return "", {}


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
