"""The embedded default: a tiny open_clip-architecture CLIP and a small real image set.

Paths only; loading lives in :mod:`promptkit.clip` (model) and :mod:`promptkit.data` (images).
``promptkit.assets.build_default`` rebuilds every file here.
"""

from pathlib import Path

ASSETS_DIR: Path = Path(__file__).resolve().parent
MODEL_NAME: str = "promptkit-tiny"
MODEL_CONFIG: Path = ASSETS_DIR / f"{MODEL_NAME}.json"
MODEL_WEIGHTS: Path = ASSETS_DIR / f"{MODEL_NAME}.safetensors"
EMBEDDED_IMAGES: Path = ASSETS_DIR / "embedded.npz"
EMBEDDED_META: Path = ASSETS_DIR / "embedded.json"
VOCABULARY: Path = ASSETS_DIR / "wordnet_vocabulary.txt.gz"  # NegMine candidates (build_vocabulary.py)

__all__ = ["ASSETS_DIR", "MODEL_NAME", "MODEL_CONFIG", "MODEL_WEIGHTS", "EMBEDDED_IMAGES", "EMBEDDED_META", "VOCABULARY"]
