"""ramplus: RAM++ (Recognize Anything Plus) image tagging, exact to the paper, batched for Ray."""

from .errors import CheckpointError, ConfigError, ImageError, RamPlusError, VocabularyError
from .model import RamPlus, TagResult

__version__ = "0.1.0"
__all__ = ["RamPlus", "TagResult", "RamPlusError", "CheckpointError", "ImageError", "ConfigError", "VocabularyError"]
