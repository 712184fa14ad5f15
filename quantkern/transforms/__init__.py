"""Model transforms applied before quantization (equivalent dense models)."""

from .rotation import SUPPORTED_MODEL_TYPES, RotationError, rotate

__all__ = ["rotate", "RotationError", "SUPPORTED_MODEL_TYPES"]
