"""promptkit: prompt learning for out-of-distribution detection with CLIP-style models."""

__version__ = "0.1.0"
