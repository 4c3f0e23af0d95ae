"""Data layer: image sources, few-shot sampling, class names, benchmark specs and the tensor cache (image features,
word embeddings)."""

from promptkit.data.cache import Features, cache_key, default_cache_dir, extract_features
from promptkit.data.classnames import class_names, class_wnids, read_class_names
from promptkit.data.errors import BadImageError, DataError
from promptkit.data.fewshot import few_shot_indices
from promptkit.data.sources import (
    EmbeddedSource,
    ImageFolderSource,
    ImageSource,
    ListFileSource,
    Subset,
    embedded_splits,
    open_source,
)
from promptkit.data.specs import BenchmarkSpec, benchmark_spec, resolve

__all__ = [
    "BadImageError",
    "BenchmarkSpec",
    "DataError",
    "EmbeddedSource",
    "Features",
    "ImageFolderSource",
    "ImageSource",
    "ListFileSource",
    "Subset",
    "benchmark_spec",
    "cache_key",
    "class_names",
    "class_wnids",
    "default_cache_dir",
    "embedded_splits",
    "extract_features",
    "few_shot_indices",
    "open_source",
    "read_class_names",
    "resolve",
]
