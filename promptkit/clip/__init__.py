"""The model layer: open_clip loading (any open_clip CLIP, by name or config file) and the CoOp prompt learner with
exact context truncation on every kind of open_clip text tower.

Modules, each importing only those before it: ``errors`` (ModelLoadError), ``text`` (TextEncoder: a frozen text
tower run on token embeddings), ``model`` (loading: ClipModel, ImageTower, load_clip), ``prompts`` (the prompt
learners: PromptLearner, ConditionalPromptLearner).
"""

from promptkit.clip.errors import ModelLoadError
from promptkit.clip.model import (
    ClipModel,
    ImageTower,
    WeightSource,
    load_clip,
    model_config,
    resolve_weights,
)
from promptkit.clip.prompts import ConditionalPromptLearner, PromptLearner
from promptkit.clip.text import TextEncoder

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
