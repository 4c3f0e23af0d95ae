"""The frozen text tower of a CLIP, run on token embeddings, with exact context truncation.

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

from typing import TYPE_CHECKING

import torch
from open_clip.hf_model import HFTextEncoder
from torch import nn

from promptkit.clip.errors import ModelLoadError

if TYPE_CHECKING:
    from promptkit.clip.model import ClipModel

_POOL_TYPES = ("argmax", "eos", "first", "last")
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
