"""CoOp prompt learning on a frozen open_clip text tower, with exact context truncation.

A prompt is ``[SOS] ctx_1 .. ctx_n <class-name tokens> <suffix> [EOS] <padding>``, where the ``ctx`` vectors are
learned and everything else is the frozen word embedding of the tokenised prompt.

CLIP's text transformer is causal: position ``i`` attends only to positions ``<= i``, so the feature pooled at
``[EOS]`` never depends on the padding after it. :class:`TextEncoder` therefore runs the transformer only on the
first ``L' = max(eot_index) + 1`` positions (with the causal mask cut to ``L' x L'``): the same features as the full
``context_length`` pass, at a fraction of the cost (about 22 of 77 positions for 16 context tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from promptkit.clip.model import ClipModel

_POOL_TYPES = ("argmax", "eos")
_PLACEHOLDER = "X"


class TextEncoder(nn.Module):
    """The frozen text tower of a :class:`ClipModel`, callable on token embeddings.

    It holds references to the model's own modules (no copies). The causal mask is read from the model at
    every call, so it follows the model if the model is moved to another device.

    Args:
        clip: the loaded model.
        truncate: run only the positions up to the last ``[EOS]`` (exact for causal towers; ignored, i.e. always
            the full length, for towers without a causal mask, where later tokens do change the pooled feature).
    """

    def __init__(self, clip: ClipModel, truncate: bool = True) -> None:
        super().__init__()
        model = clip.model
        tower = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        missing = [attr for attr in needed if not hasattr(tower, attr)]
        if missing:
            raise ValueError(
                f"model {clip.name!r}: its text tower ({type(tower).__name__}) has no {', '.join(missing)}; "
                "prompt learning needs a CLIP-style text transformer"
            )
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ValueError(
                f"model {clip.name!r}: text towers with an appended class token or a padding mask are not supported"
            )
        # CLIP keeps these as text_pool_type / text_eos_id, a standalone TextTransformer as pool_type / eos_id
        self.pool_type: str = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id: int | None = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        if self.pool_type not in _POOL_TYPES:
            raise ValueError(
                f"model {clip.name!r}: text pooling {self.pool_type!r} is not supported (need one of {_POOL_TYPES})"
            )
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        object.__setattr__(self, "_tower", tower)  # read for attn_mask only; not registered a second time
        self.truncate = bool(truncate) and tower.attn_mask is not None
        # open_clip >= 2.24 transformers take [N, L, W] whatever their batch_first (they transpose inside);
        # older ones have no batch_first attribute and take [L, N, W]
        self._sequence_first = not hasattr(self.transformer, "batch_first")

    @property
    def context_length(self) -> int:
        """Number of positions the tower has embeddings for."""
        return int(self.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        """W, the width of token embeddings."""
        return int(self.token_embedding.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (its weights' dtype)."""
        get_cast_dtype = getattr(self.transformer, "get_cast_dtype", None)
        return get_cast_dtype() if get_cast_dtype is not None else self.token_embedding.weight.dtype

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled ``[EOS]`` token in each row of ``tokens`` ``[P, L]`` -> ``[P]`` int64."""
        if self.pool_type == "argmax":  # the EOT id is the largest in CLIP's vocabulary
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings ``[P, L, W]`` of token ids ``[P, L]``."""
        return self.token_embedding(tokens)

    def forward(self, embeddings: torch.Tensor, eot_index: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Raw (not normalised) text features.

        Args:
            embeddings: ``[P, L, W]`` token embeddings (without positional embeddings), ``L <= context_length``.
            eot_index: ``[P]`` position of each prompt's ``[EOS]``.
            length: positions to run when truncating; must exceed every ``eot_index``. Default
                ``max(eot_index) + 1`` (one device sync). Ignored when not truncating.
        Returns:
            ``[P, E]`` features in the transformer's dtype.
        """
        if embeddings.ndim != 3 or embeddings.shape[-1] != self.width:
            raise ValueError(
                f"TextEncoder: expected embeddings [P, L, {self.width}], got {list(embeddings.shape)}"
            )
        prompts, positions = embeddings.shape[:2]
        if positions > self.context_length:
            raise ValueError(f"TextEncoder: {positions} positions exceed the context length {self.context_length}")
        if eot_index.shape != (prompts,):
            raise ValueError(f"TextEncoder: expected eot_index of shape [{prompts}], got {list(eot_index.shape)}")
        if self.truncate:
            positions = int(eot_index.max()) + 1 if length is None else int(length)
            if not 0 < positions <= embeddings.shape[1]:
                raise ValueError(f"TextEncoder: length {positions} is outside 1..{embeddings.shape[1]}")
        dtype = self.dtype
        x = embeddings[:, :positions].to(dtype) + self.positional_embedding[:positions].to(dtype)
        mask = self._tower.attn_mask
        if mask is not None:
            mask = mask[:positions, :positions]
        if self._sequence_first:
            x = self.transformer(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        else:
            x = self.transformer(x, attn_mask=mask)
        # LayerNorm is per position, so normalising only the pooled rows gives the same values
        x = self.ln_final(x[torch.arange(prompts, device=x.device), eot_index.to(x.device)])
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        if self.text_projection is not None:
            return x @ self.text_projection
        return x

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw features ``[P, E]`` of token ids ``[P, L]`` (what open_clip's ``encode_text`` computes)."""
        return self(self.embed(tokens), self.eot_index(tokens))


class PromptLearner(nn.Module):
    """CoOp prompts ``[SOS] + ctx + class name + suffix + [EOS]`` with learnable context vectors.

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

    def set_class_names(self, class_names: Sequence[str]) -> None:
        """Tokenise a (new) class list. Shared contexts transfer to any list; class-specific ones need the same C.

        Raises:
            ValueError: empty list, a non-string or blank name, or a name too long to fit after ``n_ctx``.
        """
        if isinstance(class_names, str) or not class_names:
            raise ValueError("PromptLearner: class_names must be a non-empty list of strings")
        names = list(class_names)
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"PromptLearner: class name {i} is {name!r}; expected a non-empty string")
        ctx = getattr(self, "ctx", None)
        if ctx is not None and self.class_specific and len(names) != ctx.shape[1]:
            raise ValueError(
                f"PromptLearner: class-specific contexts were learned for {ctx.shape[1]} classes, got {len(names)}"
            )
        length = self.encoder.context_length
        placeholder = " ".join([_PLACEHOLDER] * self.n_ctx)
        prompts = [f"{placeholder} {name}{self.suffix}" for name in names]
        # one spare position: a prompt fits iff its [EOS] lands before it
        tokens = self.clip.tokenizer(prompts, context_length=length + 1).to(self.clip.device)
        eot = self.encoder.eot_index(tokens)
        too_long = torch.nonzero(eot >= length).flatten().tolist()
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"PromptLearner: class name {names[i]!r} (index {i}) is too long: with n_ctx={self.n_ctx} its "
                f"prompt exceeds the model's {length} tokens; shorten the name or use fewer context tokens"
            )
        tokens = tokens[:, :length]
        placeholder_id = self.clip.tokenizer([_PLACEHOLDER], context_length=length)[0, 1].item()
        if not bool((tokens[:, 1 : 1 + self.n_ctx] == placeholder_id).all()):
            raise ValueError(
                f"PromptLearner: the tokenizer of {self.clip.name!r} does not give one token per context placeholder"
            )
        with torch.no_grad():
            embeddings = self.encoder.embed(tokens)
        self.class_names = names
        self.register_buffer("tokens", tokens, persistent=False)  # [C, L]
        self.register_buffer("eot_index", eot, persistent=False)  # [C]
        self.register_buffer("token_prefix", embeddings[:, :1].clone(), persistent=False)  # [C, 1, W] SOS
        self.register_buffer("token_suffix", embeddings[:, 1 + self.n_ctx :].clone(), persistent=False)
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
        if class_idx is None:
            eot_cpu, prefix, suffix, eot = self._eot_cpu, self.token_prefix, self.token_suffix, self.eot_index
        else:
            eot_cpu = self._eot_cpu[class_idx]
            device_idx = class_idx.to(self.token_prefix.device)
            prefix, suffix = self.token_prefix[device_idx], self.token_suffix[device_idx]
            eot = self.eot_index[device_idx]
        length = int(eot_cpu.max()) + 1 if self.encoder.truncate else self.encoder.context_length
        suffix = suffix[:, : length - 1 - self.n_ctx]  # the padding after the last [EOS] is never run

        ctx = self.ctx if set_idx is None else self.ctx[set_idx.to(self.ctx.device)]
        if self.class_specific and class_idx is not None:
            ctx = ctx[:, class_idx.to(self.ctx.device)]
        n_sets, n_classes = ctx.shape[0], prefix.shape[0]
        width = prefix.shape[-1]
        prompts = torch.cat(
            [
                prefix.expand(n_sets, n_classes, 1, width),
                ctx.to(prefix.dtype).expand(n_sets, n_classes, self.n_ctx, width),
                suffix.expand(n_sets, n_classes, suffix.shape[1], width),
            ],
            dim=2,
        ).reshape(n_sets * n_classes, length, width)
        features = self.encoder(prompts, eot.repeat(n_sets), length=length)
        return features.reshape(n_sets, n_classes, -1)

    def extra_repr(self) -> str:
        return (
            f"n_classes={self.n_classes}, n_ctx={self.n_ctx}, n_sets={self.n_sets}, "
            f"class_specific={self.class_specific}, truncate={self.encoder.truncate}"
        )

    def _init_vectors(self, ctx_init: str) -> torch.Tensor:
        """Word embeddings ``[n, W]`` of the tokens of ``ctx_init`` (without SOS/EOS)."""
        tokens = self.clip.tokenizer([ctx_init.replace("_", " ")]).to(self.clip.device)
        count = int(self.encoder.eot_index(tokens)[0]) - 1
        if count < 1:
            raise ValueError(f"PromptLearner: ctx_init {ctx_init!r} has no tokens")
        with torch.no_grad():
            return self.encoder.embed(tokens)[0, 1 : 1 + count].float()


class ConditionalPromptLearner(nn.Module):
    """CoCoOp prompts: a shared context shifted, per image, by a meta-net of the image feature.

    ``meta_net`` is Linear(E, E // 16) -> ReLU -> Linear(E // 16, W), as in CoCoOp; its output is added to every
    context vector, so each image gets its own C prompts. Parameters: the base context ``prompts.ctx`` and the
    meta-net.
    """

    def __init__(self, clip: ClipModel, class_names: Sequence[str], n_ctx: int = 4,
                 ctx_init: str | None = "a photo of a") -> None:
        super().__init__()
        self.prompts = PromptLearner(clip, class_names, n_ctx=n_ctx, ctx_init=ctx_init)
        hidden = max(1, clip.embed_dim // 16)
        self.meta_net = nn.Sequential(nn.Linear(clip.embed_dim, hidden), nn.ReLU(),
                                      nn.Linear(hidden, self.prompts.encoder.width)).to(clip.device)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Raw text features [B, C, E] of each image's own class prompts, from image features [B, E]."""
        base = self.prompts
        shift = self.meta_net(nn.functional.normalize(image_features.float(), dim=-1))  # [B, W]
        length = int(base._eot_cpu.max()) + 1 if base.encoder.truncate else base.encoder.context_length
        prefix, suffix = base.token_prefix, base.token_suffix[:, : length - 1 - base.n_ctx]
        B, C, W = shift.shape[0], base.n_classes, shift.shape[1]
        ctx = (base.ctx[0, 0][None] + shift[:, None, :]).to(prefix.dtype)  # [B, n_ctx, W]
        prompts = torch.cat([
            prefix[None].expand(B, C, 1, W),
            ctx[:, None].expand(B, C, base.n_ctx, W),
            suffix[None].expand(B, C, suffix.shape[1], W),
        ], dim=2).reshape(B * C, length, W)
        features = base.encoder(prompts, base.eot_index.repeat(B), length=length)
        return features.reshape(B, C, -1)


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
