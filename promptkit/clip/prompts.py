"""CoOp prompt learning on any frozen open_clip text tower, with exact context truncation.

A prompt is ``<start> ctx_1 .. ctx_n <class-name tokens> <suffix> <end> <padding>``, where the ``ctx`` vectors are
learned and everything else is the frozen word embedding of the tokenised prompt. ``<start>`` is CLIP's [SOS] or
a Hugging Face tokenizer's [CLS] / ``<s>``; SigLIP's tokenizers have none, and the context then starts at 0.

:class:`TextEncoder` runs a tower on token embeddings, and only on the first ``L'`` positions of the context
where that gives the same features as the full ``context_length`` pass. Which towers allow it (``length_rule``):

- ``"causal"``: causal towers pooled at [EOS] (CLIP, EVA, MetaCLIP, ...): position ``i`` attends only to positions
  ``<= i``, so nothing after the last [EOS] reaches a pooled feature. ``L' = max(eot) + 1`` (22 of 77 positions
  for 16 context tokens).
- ``"padding-mask"``: towers that mask the padding out of attention: CoCa (a class token appended after the
  padding), a ``use_pad_mask`` TextTransformer, and Hugging Face towers (open_clip's ``HFTextEncoder``, whose
  attention mask and mean pooling skip the padding). Dropping positions that no position attends to changes
  nothing: ``L'`` is the last non-padding token + 1, plus one for CoCa, whose (legacy) mask is shifted by one
  position and so lets the first padding token in. CoCa's class token keeps its own position embedding.
- ``"full"``: bidirectional towers without a padding mask (SigLIP, SigLIP2, CLIPA, MobileCLIP2) and towers pooled
  at the last position: every padding position changes the pooled feature, so they always run the full context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.hf_model import HFTextEncoder
from torch import nn

from promptkit.clip.model import ClipModel, ModelLoadError
from promptkit.data.errors import DataError
from promptkit.errors import ConfigError

_POOL_TYPES = ("argmax", "eos", "first", "last")
_PLACEHOLDER = "X"
LENGTH_RULES = {
    "causal": "truncated after the last [EOS] (causal attention: no position sees a later one)",
    "padding-mask": "truncated after the last token (the padding is masked out of attention)",
    "full": "full context (bidirectional attention over the padding: every position changes the feature)",
}


class TextEncoder(nn.Module):
    """The frozen text tower of a :class:`ClipModel`, callable on token embeddings.

    It holds references to the model's own modules (no copies). Masks and the class token are read from the model
    at every call, so they follow the model if it is moved to another device.

    Args:
        clip: the loaded model (an open_clip ``CLIP``, ``CustomTextCLIP`` or ``CoCa``).
        truncate: run only the positions that reach the features (see the module docstring); the towers whose
            ``length_rule`` is ``"full"`` always run the full context.
    Raises:
        ModelLoadError: a text tower that cannot be run on token embeddings (an unknown module, no sentence
            pooling, a padding mask without a padding id).
    """

    def __init__(self, clip: ClipModel, truncate: bool = True) -> None:
        super().__init__()
        model = clip.model
        tower = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
        object.__setattr__(self, "_tower", tower)  # read for masks only; not registered a second time
        self.hf = isinstance(tower, HFTextEncoder)
        if self.hf:
            self._init_hf(clip, tower)
        else:
            self._init_open_clip(clip, tower)
        self.truncate = bool(truncate) and self.length_rule != "full"

    def _init_open_clip(self, clip: ClipModel, tower: nn.Module) -> None:
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
                  "attn_mask")
        missing = [attr for attr in needed if not hasattr(tower, attr)]
        if missing:
            raise ModelLoadError(
                f"model {clip.name!r}: its text tower ({type(tower).__name__}) has no {', '.join(missing)}; "
                "prompt learning needs an open_clip TextTransformer or Hugging Face text tower"
            )
        # CLIP keeps these as text_pool_type / text_eos_id, a standalone TextTransformer as pool_type / eos_id
        self.pool_type: str = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id: int | None = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.class_token = getattr(tower, "cls_emb", None) is not None  # CoCa: appended after the padding
        if self.pool_type not in _POOL_TYPES and not self.class_token:
            raise ModelLoadError(
                f"model {clip.name!r}: text pooling {self.pool_type!r} gives no sentence feature to learn prompts "
                f"for (need one of {', '.join(_POOL_TYPES)}, or a class token)"
            )
        if self.pool_type == "eos" and self.eos_id is None:
            raise ModelLoadError(f"model {clip.name!r}: text pooling 'eos' without an eos_id")
        self.causal = tower.attn_mask is not None
        # the plain CLIP class ignores a config's pad mask; a standalone TextTransformer applies it
        self.pad_mask = self.class_token or bool(getattr(tower, "use_pad_mask", False))
        self.pad_id = int(getattr(tower, "pad_id", 0))
        self.shifted_cls_mask = self.class_token and not getattr(tower, "correct_cls_mask", False)
        self.heads = int(getattr(tower, "heads", 0))
        if self.pad_mask and self.heads < 1:
            raise ModelLoadError(f"model {clip.name!r}: its text tower masks padding but has no head count")
        if self.class_token or (self.pad_mask and self.pool_type != "last"):
            self.length_rule = "padding-mask"
        elif self.causal and self.pool_type != "last":
            self.length_rule = "causal"
        else:
            self.length_rule = "full"
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        # the text positions (CoCa's class token takes one more position embedding)
        self._context_length = int(getattr(tower, "context_length", tower.positional_embedding.shape[0]))
        # open_clip >= 2.24 transformers take [N, L, W] whatever their batch_first (they transpose inside);
        # older ones have no batch_first attribute and take [L, N, W]
        self._sequence_first = not hasattr(self.transformer, "batch_first")

    def _init_hf(self, clip: ClipModel, tower: HFTextEncoder) -> None:
        pad_id = getattr(tower.config, "pad_token_id", None)
        if pad_id is None:
            raise ModelLoadError(f"model {clip.name!r}: its Hugging Face text config has no pad_token_id")
        self.pool_type = type(tower.pooler).__name__
        self.eos_id = None
        self.class_token = False
        self.causal = False
        self.pad_mask = True  # HFTextEncoder's attention mask: the tokens that are not padding
        self.pad_id = int(pad_id)
        self.shifted_cls_mask = False
        self.length_rule = "padding-mask"
        self.token_embedding = tower.transformer.get_input_embeddings()
        self.transformer = tower.transformer
        self.pooler = tower.pooler
        self.proj = tower.proj
        # HF configs give the position-embedding table size; open_clip's tokenizer pads to the config's context
        length = getattr(clip.tokenizer, "context_length", None)
        self._context_length = int(length or tower.context_length)

    @property
    def context_length(self) -> int:
        """L, the number of token positions the tokenizer pads to."""
        return self._context_length

    @property
    def width(self) -> int:
        """W, the width of token embeddings."""
        return int(self.token_embedding.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (its weights' dtype)."""
        get_cast_dtype = getattr(self.transformer, "get_cast_dtype", None)
        return get_cast_dtype() if get_cast_dtype is not None else self.token_embedding.weight.dtype

    def describe(self) -> dict[str, object]:
        """The tower's kind and how it is shortened, for ``prompts.json`` and ``promptkit info``."""
        kind = f"Hugging Face {self._tower.config.model_type}" if self.hf else type(self._tower).__name__
        return {
            "tower": kind,
            "attention": "causal" if self.causal else "bidirectional",
            "pooling": "class token" if self.class_token else self.pool_type,
            "padding_mask": self.pad_mask,
            "length": LENGTH_RULES["full" if not self.truncate else self.length_rule],
        }

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of each prompt's end token in ``tokens`` ``[P, L]`` -> ``[P]`` int64.

        The pooled [EOS] for ``argmax`` / ``eos`` pooling (open_clip's own rule), else the last token that is not
        padding. The features of a prompt depend on no position after it (see ``run_length``).
        """
        if not self.hf and self.pool_type == "argmax":  # the EOT id is the largest in CLIP's vocabulary
            return tokens.argmax(dim=-1)
        if not self.hf and self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        return ((tokens != self.pad_id) * positions).amax(dim=-1).sub(1).clamp(min=0)

    def run_length(self, eot_index: torch.Tensor) -> int:
        """The positions a pass over prompts ending at ``eot_index`` ``[P]`` runs: the shortest exact prefix when
        truncating, else ``context_length`` (one device sync for a device tensor)."""
        if not self.truncate:
            return self.context_length
        # the shifted (legacy) CoCa mask lets the key one position after the last token in
        extra = 2 if self.shifted_cls_mask else 1
        return min(int(eot_index.max()) + extra, self.context_length)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings ``[P, L, W]`` of token ids ``[P, L]``."""
        return self.token_embedding(tokens)

    def forward(self, embeddings: torch.Tensor, eot_index: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Raw (not normalised) text features.

        Args:
            embeddings: ``[P, L, W]`` token embeddings (without positional embeddings), ``L <= context_length``;
                the full ``context_length`` for towers that are not truncated.
            eot_index: ``[P]`` position of each prompt's end token (``eot_index()`` of its tokens).
            length: positions to run when truncating, at least ``run_length(eot_index)``; default that (one device
                sync). Ignored when not truncating.
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
            positions = self.run_length(eot_index) if length is None else int(length)
            if not 0 < positions <= embeddings.shape[1]:
                raise ValueError(f"TextEncoder: length {positions} is outside 1..{embeddings.shape[1]}")
        eot = eot_index.to(embeddings.device)
        x = embeddings[:, :positions].to(self.dtype)
        if self.hf:
            return self._forward_hf(x, eot)
        return self._forward_open_clip(x, eot)

    def _forward_hf(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        # HFTextEncoder's mask is (token != pad): the tokens up to each prompt's last one
        mask = (torch.arange(x.shape[1], device=x.device) <= eot[:, None]).long()
        out = self.transformer(inputs_embeds=x, attention_mask=mask)
        return self.proj(self.pooler(out, mask))

    def _forward_open_clip(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        prompts, positions = x.shape[:2]
        x = x + self.positional_embedding[:positions].to(x.dtype)
        tower = self._tower
        if self.class_token:  # after the padding, at position context_length whatever the run's length
            cls = tower.cls_emb.to(x.dtype) + self.positional_embedding[self.context_length].to(x.dtype)
            x = torch.cat([x, cls.expand(prompts, 1, -1)], dim=1)
        seq = x.shape[1]
        # the kept positions are a prefix (plus the class token, which comes last), so the causal mask of the kept
        # positions is the causal mask cut to their number
        mask = tower.attn_mask[:seq, :seq] if self.causal else None
        if self.pad_mask:
            pad = self._padding_mask(eot, positions, x.dtype)
            mask = pad if mask is None else mask.unsqueeze(0) + pad
        if self._sequence_first:
            x = self.transformer(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        else:
            x = self.transformer(x, attn_mask=mask)
        if self.class_token:
            pooled = x[:, -1]
        else:
            index = {"first": torch.zeros_like(eot), "last": torch.full_like(eot, seq - 1)}.get(self.pool_type, eot)
            pooled = x[torch.arange(prompts, device=x.device), index]
        # LayerNorm is per position, so normalising only the pooled rows gives the same values
        pooled = self.ln_final(pooled)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        if self.text_projection is not None:
            return pooled @ self.text_projection
        return pooled

    def _padding_mask(self, eot: torch.Tensor, positions: int, dtype: torch.dtype) -> torch.Tensor:
        """open_clip's additive key mask ``[P * heads, S, S]`` over the kept positions (S = positions + class token).

        A key is kept where the token is not padding; the class token's key is valid, except in the shifted legacy
        mask (open_clip's ``correct_cls_mask=False``), which marks keys one position late: position 0 always, text
        position j when token j - 1 is not padding, the class token when the context's last token is not.
        """
        index = torch.arange(positions, device=eot.device)
        if self.shifted_cls_mask:
            keys = (index <= eot[:, None] + 1)
            cls_key = (eot >= self.context_length - 1)[:, None]
        else:
            keys = index <= eot[:, None]
            cls_key = torch.ones_like(eot, dtype=torch.bool)[:, None]
        if self.class_token:
            keys = torch.cat([keys, cls_key], dim=1)
        seq = keys.shape[1]
        additive = torch.zeros(keys.shape, dtype=dtype, device=eot.device).masked_fill_(~keys, float("-inf"))
        return additive[:, None, :].expand(-1, seq, -1).repeat_interleave(self.heads, 0)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw features ``[P, E]`` of token ids ``[P, L]`` (what open_clip's ``encode_text`` computes)."""
        eot = self.eot_index(tokens)
        return self(self.embed(tokens), eot)


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
        if class_idx is None:
            eot_cpu, prefix, suffix, eot = self._eot_cpu, self.token_prefix, self.token_suffix, self.eot_index
        else:
            eot_cpu = self._eot_cpu[class_idx]
            device_idx = class_idx.to(self.token_prefix.device)
            prefix, suffix = self.token_prefix[device_idx], self.token_suffix[device_idx]
            eot = self.eot_index[device_idx]
        length = self.encoder.run_length(eot_cpu)
        suffix = suffix[:, : length - self.ctx_start - self.n_ctx]  # positions past the run never reach a feature

        ctx = self.ctx if set_idx is None else self.ctx[set_idx.to(self.ctx.device)]
        if self.class_specific and class_idx is not None:
            ctx = ctx[:, class_idx.to(self.ctx.device)]
        n_sets, n_classes = ctx.shape[0], prefix.shape[0]
        width = prefix.shape[-1]
        prompts = torch.cat(
            [
                prefix.expand(n_sets, n_classes, prefix.shape[1], width),
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
        length = base.encoder.run_length(base._eot_cpu)
        prefix, suffix = base.token_prefix, base.token_suffix[:, : length - base.ctx_start - base.n_ctx]
        B, C, W = shift.shape[0], base.n_classes, shift.shape[1]
        ctx = (base.ctx[0, 0][None] + shift[:, None, :]).to(prefix.dtype)  # [B, n_ctx, W]
        prompts = torch.cat([
            prefix[None].expand(B, C, prefix.shape[1], W),
            ctx[:, None].expand(B, C, base.n_ctx, W),
            suffix[None].expand(B, C, suffix.shape[1], W),
        ], dim=2).reshape(B * C, length, W)
        features = base.encoder(prompts, base.eot_index.repeat(B), length=length)
        return features.reshape(B, C, -1)


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
