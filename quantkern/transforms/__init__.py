"""Model transforms applied before quantization (equivalent dense models)."""

from .conv1d import conv1d_to_linear
from .rotation import SUPPORTED_MODEL_TYPES, RotationError, rotate

__all__ = ["rotate", "RotationError", "SUPPORTED_MODEL_TYPES", "conv1d_to_linear"]
