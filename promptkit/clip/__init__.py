"""The model layer: open_clip loading and the CoOp prompt learner with exact context truncation."""

from promptkit.clip.model import ClipModel, ModelLoadError, WeightSource, load_clip, resolve_weights
from promptkit.clip.prompts import ConditionalPromptLearner, PromptLearner, TextEncoder

__all__ = [
    "ClipModel",
    "ModelLoadError",
    "PromptLearner",
    "TextEncoder",
    "WeightSource",
    "load_clip",
    "resolve_weights",
]
