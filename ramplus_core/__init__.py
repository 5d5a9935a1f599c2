"""ramplus: RAM++ (Recognize Anything Plus) image tagging, exact to the paper, batched for Ray.

`RamPlus` and `TagResult` are imported on first use: decode workers import this package
for Pillow-only work and should not pay for importing torch and timm.
"""

from .errors import CheckpointError, ConfigError, ImageError, RamPlusError, VocabularyError

__version__ = "0.1.0"
__all__ = ["RamPlus", "TagResult", "RamPlusError", "CheckpointError", "ImageError", "ConfigError", "VocabularyError"]


def __getattr__(name):
    if name in ("RamPlus", "TagResult"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'ramplus_core' has no attribute {name!r}")
