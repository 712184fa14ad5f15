"""Save / load / export / import of quantized checkpoints (safetensors + HF configs, GGUF).

Public functions:

- :func:`save_quantized` — write GPTQ (v1 / v2), AWQ GEMM, compressed-tensors or GGUF.
- :func:`load_quantized` — read GPTQ (v1 / v2), AWQ GEMM or compressed-tensors into QuantLinear.
- :func:`inspect_checkpoint` / :func:`format_inspection` — describe a checkpoint without loading it.
"""

from .config import CheckpointConfigError, parse_quantization_config
from .files import CheckpointFileError
from .inspect import format_inspection, inspect_checkpoint, read_gguf
from .load import load_quantized
from .save import SAVE_FORMATS, save_quantized
from .validate import CheckpointTensorError

__all__ = [
    "save_quantized", "load_quantized", "inspect_checkpoint", "format_inspection", "read_gguf", "SAVE_FORMATS",
    "parse_quantization_config",
    "CheckpointConfigError", "CheckpointFileError", "CheckpointTensorError",
]
