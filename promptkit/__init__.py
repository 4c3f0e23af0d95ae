"""promptkit: prompt learning for out-of-distribution detection with CLIP-style models."""

from promptkit.version import __version__

__all__ = ["Detector", "__version__"]


def __getattr__(name: str) -> object:
    # the detector imports torch and open_clip: loaded on first use, so that `import promptkit` stays light
    if name == "Detector":
        from promptkit.detector import Detector

        return Detector
    raise AttributeError(f"module 'promptkit' has no attribute {name!r}")
