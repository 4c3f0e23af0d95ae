"""The model layer: open_clip loading (any open_clip CLIP, by name or config file) and the CoOp prompt learner with
exact context truncation on every kind of open_clip text tower."""

from promptkit.clip.model import (
    ClipModel,
    ImageTower,
    ModelLoadError,
    WeightSource,
    load_clip,
    model_config,
    resolve_weights,
)
from promptkit.clip.prompts import ConditionalPromptLearner, PromptLearner, TextEncoder

__all__ = [
    "ClipModel",
    "ConditionalPromptLearner",
    "ImageTower",
    "ModelLoadError",
    "PromptLearner",
    "TextEncoder",
    "WeightSource",
    "load_clip",
    "model_config",
    "resolve_weights",
]
