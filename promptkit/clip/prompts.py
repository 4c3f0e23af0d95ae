"""CoOp prompt learning on any frozen open_clip text tower, with exact context truncation.

A prompt is ``<start> ctx_1 .. ctx_n <class-name tokens> <suffix> <end> <padding>``, where the ``ctx`` vectors are
learned and everything else is the frozen word embedding of the tokenised prompt. ``<start>`` is CLIP's [SOS] or
a Hugging Face tokenizer's [CLS] / ``<s>``; SigLIP's tokenizers have none, and the context then starts at 0.

The text tower runs on the shortest context that gives the same features as the full one: see
:mod:`promptkit.clip.text`. Both learners build their prompts with :meth:`PromptLearner.prompt_embeddings`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from promptkit.clip.errors import ModelLoadError
from promptkit.clip.model import ClipModel
from promptkit.clip.text import TextEncoder
from promptkit.data.errors import DataError
from promptkit.errors import ConfigError

_PLACEHOLDER = "X"


class _Layout:
    """Where a tokenizer puts the context placeholders: found by tokenising probes, not assumed.

    Attributes:
        pad: the padding id (the last position of the tokenised empty string).
        start: position of the first context token (1 after CLIP's [SOS] or a [CLS]; 0 for SigLIP's tokenizers).
        empty: positions the empty string fills (start and end tokens).
        placeholder_ids: the ids a placeholder word can get (BPE tokenizers mark a word after a space).
    """

    def __init__(self, clip: ClipModel, length: int) -> None:
        empty = clip.tokenizer([""], context_length=length)[0]
        probe = clip.tokenizer([" ".join([_PLACEHOLDER] * 3)], context_length=length)[0]
        self.pad = int(empty[-1])
        self.empty = int(_content_end(empty[None], self.pad)[0])
        differs = torch.nonzero(probe != empty).flatten()
        self.start = int(differs[0]) if len(differs) else 0
        if int(_content_end(probe[None], self.pad)[0]) - self.empty != 3:
            raise ModelLoadError(
                f"PromptLearner: the tokenizer of {clip.name!r} does not give one token per context placeholder"
            )
        self.placeholder_ids = probe[self.start : self.start + 3].unique()

    def count(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[P]`` of each text's own words in ``tokens`` ``[P, L]`` (without start and end tokens)."""
        return _content_end(tokens, self.pad) - self.empty


class PromptLearner(nn.Module):
    """CoOp prompts ``<start> + ctx + class name + suffix + <end>`` with learnable context vectors.

    The only parameter is ``ctx``: ``[n_sets, C if class_specific else 1, n_ctx, W]``. Set ``k`` of class ``c``
    uses ``ctx[k, c]`` (class-specific) or ``ctx[k, 0]`` (shared). The frozen text tower is not registered as a
    submodule, so ``parameters()`` and ``state_dict()`` hold ``ctx`` alone; the learner's buffers are created on
    the model's device and the learner should stay there.

    Args:
        clip: the loaded model (frozen).
        class_names: C class names.
        n_ctx: number of context vectors (replaced by the token count of ``ctx_init`` when that is given).
        n_sets: K, number of independent context sets (e.g. LSN/NegPrompt negative prompts per class).
        class_specific: one context per class (CSC) instead of one shared by all classes.
        ctx_init: initialise every context from the word embeddings of this phrase (e.g. ``"a photo of a"``).
        init_std: standard deviation of the N(0, std^2) random init (used without ``ctx_init``).
        suffix: text appended to each class name (CoOp: ``"."``).
        truncate: see :class:`TextEncoder`.
    """

    def __init__(
        self,
        clip: ClipModel,
        class_names: Sequence[str],
        n_ctx: int = 16,
        n_sets: int = 1,
        class_specific: bool = False,
        ctx_init: str | None = None,
        init_std: float = 0.02,
        suffix: str = ".",
        truncate: bool = True,
    ) -> None:
        super().__init__()
        if n_sets < 1:
            raise ValueError(f"PromptLearner: n_sets must be >= 1, got {n_sets}")
        encoder = TextEncoder(clip, truncate=truncate)
        object.__setattr__(self, "encoder", encoder)  # frozen: kept out of parameters() and state_dict()
        self.clip = clip
        self.suffix = suffix
        self.n_sets = int(n_sets)
        self.class_specific = bool(class_specific)
        self._layout = _Layout(clip, encoder.context_length)
        if ctx_init is not None:
            init = self._init_vectors(ctx_init)
            n_ctx = init.shape[0]
        else:
            if n_ctx < 1:
                raise ValueError(f"PromptLearner: n_ctx must be >= 1, got {n_ctx}")
            if not init_std > 0:
                raise ValueError(f"PromptLearner: init_std must be > 0, got {init_std}")
        self.n_ctx = int(n_ctx)
        self.set_class_names(class_names)
        rows = self.n_classes if self.class_specific else 1
        shape = (self.n_sets, rows, self.n_ctx, encoder.width)
        if ctx_init is not None:
            ctx = init.expand(shape).clone()
        else:
            ctx = torch.empty(shape, device=clip.device).normal_(std=init_std)
        self.ctx = nn.Parameter(ctx.float())

    @property
    def n_classes(self) -> int:
        """C, the number of classes."""
        return len(self.class_names)

    @property
    def ctx_start(self) -> int:
        """Position of the first context vector in a prompt (after the tokenizer's start token, if any)."""
        return self._layout.start

    def set_class_names(self, class_names: Sequence[str]) -> None:
        """Tokenise a (new) class list. Shared contexts transfer to any list; class-specific ones need the same C.

        Raises:
            DataError: empty list, a non-string or blank name, or a name too long to fit after ``n_ctx``.
        """
        if isinstance(class_names, str) or not class_names:
            raise DataError("PromptLearner: class_names must be a non-empty list of strings")
        names = list(class_names)
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"PromptLearner: class name {i} is {name!r}; expected a non-empty string")
        ctx = getattr(self, "ctx", None)
        if ctx is not None and self.class_specific and len(names) != ctx.shape[1]:
            raise ValueError(
                f"PromptLearner: class-specific contexts were learned for {ctx.shape[1]} classes, got {len(names)}"
            )
        length, start = self.encoder.context_length, self.ctx_start
        placeholder = " ".join([_PLACEHOLDER] * self.n_ctx)
        prompts = [f"{placeholder} {name}{self.suffix}" for name in names]
        # one spare position: a prompt fits iff it leaves that position to the padding
        tokens = self.clip.tokenizer(prompts, context_length=length + 1).to(self.clip.device)
        too_long = torch.nonzero(_content_end(tokens, self._layout.pad) > length).flatten().tolist()
        if too_long:
            i = too_long[0]
            raise DataError(
                f"PromptLearner: class name {names[i]!r} (index {i}) is too long: with n_ctx={self.n_ctx} its "
                f"prompt exceeds the model's {length} tokens; shorten the name or use fewer context tokens"
            )
        tokens = tokens[:, :length]
        slots = tokens[:, start : start + self.n_ctx]
        if not bool(torch.isin(slots, self._layout.placeholder_ids.to(slots.device)).all()):
            raise ModelLoadError(
                f"PromptLearner: the tokenizer of {self.clip.name!r} does not give one token per context placeholder"
            )
        eot = self.encoder.eot_index(tokens)
        with torch.no_grad():
            embeddings = self.encoder.embed(tokens)
        self.class_names = names
        self.register_buffer("tokens", tokens, persistent=False)  # [C, L]
        self.register_buffer("eot_index", eot, persistent=False)  # [C]
        self.register_buffer("token_prefix", embeddings[:, :start].clone(), persistent=False)  # [C, start, W]
        self.register_buffer("token_suffix", embeddings[:, start + self.n_ctx :].clone(), persistent=False)
        self._eot_cpu = eot.cpu()  # lengths of class subsets without a device sync

    def forward(
        self, classes: torch.Tensor | Sequence[int] | None = None, sets: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """Raw (not normalised) text features of the prompts of the chosen classes and sets.

        Args:
            classes: ``[C']`` class indices (default: all C).
            sets: ``[K']`` context-set indices (default: all ``n_sets``).
        Returns:
            ``[K', C', E]`` features, differentiable with respect to ``ctx``.
        """
        class_idx = _indices(classes, self.n_classes, "classes")
        set_idx = _indices(sets, self.n_sets, "sets")
        ctx = self.ctx if set_idx is None else self.ctx[set_idx.to(self.ctx.device)]
        if self.class_specific and class_idx is not None:
            ctx = ctx[:, class_idx.to(self.ctx.device)]
        return self.encode_context(ctx, class_idx)

    def prompt_embeddings(
        self, ctx: torch.Tensor, classes: torch.Tensor | Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token embeddings of the prompts of the chosen classes around the given context vectors.

        Each of the ``S`` groups of ``ctx`` (context sets, or one shifted context per image) gives one prompt per
        chosen class: its start token, its context vectors, then the class name, suffix and end token.

        Args:
            ctx: ``[S, 1, n_ctx, W]`` contexts shared by the chosen classes, or ``[S, C', n_ctx, W]`` one per
                chosen class, in the order of ``classes``.
            classes: ``[C']`` class indices (default: all C).
        Returns:
            ``(embeddings, eot_index, length)``: ``[S * C', length, W]`` token embeddings of the prompts (group
            major) cut to the ``length`` positions the text tower runs (``TextEncoder.run_length``), and ``[S * C']``
            the position of each prompt's end token; the input of :class:`TextEncoder`.
        """
        class_idx = _indices(classes, self.n_classes, "classes")
        if class_idx is None:
            eot_cpu, prefix, suffix, eot = self._eot_cpu, self.token_prefix, self.token_suffix, self.eot_index
        else:
            eot_cpu = self._eot_cpu[class_idx]
            device_idx = class_idx.to(self.token_prefix.device)
            prefix, suffix = self.token_prefix[device_idx], self.token_suffix[device_idx]
            eot = self.eot_index[device_idx]
        n_classes, width = prefix.shape[0], prefix.shape[-1]
        if ctx.ndim != 4 or ctx.shape[1] not in (1, n_classes) or tuple(ctx.shape[2:]) != (self.n_ctx, width):
            raise ValueError(f"PromptLearner: expected contexts of shape [S, 1 or {n_classes}, {self.n_ctx}, "
                             f"{width}], got {list(ctx.shape)}")
        n_groups = ctx.shape[0]
        length = self.encoder.run_length(eot_cpu)
        suffix = suffix[:, : length - self.ctx_start - self.n_ctx]  # positions past the run never reach a feature
        embeddings = torch.cat(
            [
                prefix.expand(n_groups, n_classes, prefix.shape[1], width),
                ctx.to(prefix.dtype).expand(n_groups, n_classes, self.n_ctx, width),
                suffix.expand(n_groups, n_classes, suffix.shape[1], width),
            ],
            dim=2,
        ).reshape(n_groups * n_classes, length, width)
        return embeddings, eot.repeat(n_groups), length

    def encode_context(self, ctx: torch.Tensor, classes: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Raw (not normalised) text features of the prompts :meth:`prompt_embeddings` builds.

        Args:
            ctx: ``[S, 1, n_ctx, W]`` shared or ``[S, C', n_ctx, W]`` class-specific context vectors.
            classes: ``[C']`` class indices (default: all C).
        Returns:
            ``[S, C', E]`` features, differentiable with respect to ``ctx``.
        """
        embeddings, eot, length = self.prompt_embeddings(ctx, classes)
        features = self.encoder(embeddings, eot, length=length)
        return features.reshape(ctx.shape[0], -1, features.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"n_classes={self.n_classes}, n_ctx={self.n_ctx}, n_sets={self.n_sets}, "
            f"class_specific={self.class_specific}, truncate={self.encoder.truncate}"
        )

    def _init_vectors(self, ctx_init: str) -> torch.Tensor:
        """Word embeddings ``[n, W]`` of the tokens of ``ctx_init`` (without start and end tokens)."""
        tokens = self.clip.tokenizer([ctx_init.replace("_", " ")], context_length=self.encoder.context_length)
        tokens = tokens.to(self.clip.device)
        count = int(self._layout.count(tokens)[0])
        if count < 1:
            raise ConfigError(f"PromptLearner: ctx_init {ctx_init!r} has no tokens")
        start = self.ctx_start
        with torch.no_grad():
            return self.encoder.embed(tokens)[0, start : start + count].float()


class ConditionalPromptLearner(nn.Module):
    """CoCoOp prompts: a shared context shifted, per image, by a meta-net of the image feature.

    ``meta_net`` is Linear(E, E // 16) -> ReLU -> Linear(E // 16, W), as in CoCoOp; its output is added to every
    context vector, so each image gets its own C prompts. Parameters: the base context ``prompts.ctx`` and the
    meta-net.

    Args:
        clip: the loaded model (frozen).
        class_names: C class names.
        n_ctx: number of context vectors (replaced by the token count of ``ctx_init`` when that is given).
        ctx_init: initialise the context from the word embeddings of this phrase (None: random init).
    """

    def __init__(self, clip: ClipModel, class_names: Sequence[str], n_ctx: int = 4,
                 ctx_init: str | None = "a photo of a") -> None:
        super().__init__()
        self.prompts = PromptLearner(clip, class_names, n_ctx=n_ctx, ctx_init=ctx_init)
        hidden = max(1, clip.embed_dim // 16)
        self.meta_net = nn.Sequential(nn.Linear(clip.embed_dim, hidden), nn.ReLU(),
                                      nn.Linear(hidden, self.prompts.encoder.width)).to(clip.device)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) text features of each image's own class prompts.

        Args:
            image_features: ``[B, E]`` image features (raw or normalised: the meta-net sees them normalised).
        Returns:
            ``[B, C, E]`` features, differentiable with respect to ``prompts.ctx`` and the meta-net.
        """
        shift = self.meta_net(nn.functional.normalize(image_features.float(), dim=-1))  # [B, W]
        ctx = self.prompts.ctx[0, 0][None] + shift[:, None, :]  # [B, n_ctx, W]: one shared context per image
        return self.prompts.encode_context(ctx[:, None])


def _content_end(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """Positions ``[P]`` up to and including each row's last token that is not ``pad``, in ``tokens`` ``[P, L]``."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return ((tokens != pad) * positions).amax(dim=-1)


def _indices(index: torch.Tensor | Sequence[int] | None, size: int, what: str) -> torch.Tensor | None:
    """Validate an optional 1-D index into ``range(size)``; returned on the CPU (None means all)."""
    if index is None:
        return None
    index = torch.as_tensor(index).cpu()
    if index.ndim != 1 or index.numel() == 0 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"PromptLearner: {what} must be a non-empty 1-D integer index, got {index!r}")
    if int(index.min()) < 0 or int(index.max()) >= size:
        raise ValueError(f"PromptLearner: {what} indices must lie in [0, {size}), got {index.tolist()}")
    return index.long()
