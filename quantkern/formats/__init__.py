"""Packed layouts: pack / unpack / repack, one module per layout."""

from .bitpack import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows
from .gptq import (CHECKPOINT_FORMATS, GPTQTensors, gptq_shapes, pack_gptq, packable, unpack_gptq,
                   zeros_v1_to_v2, zeros_v2_to_v1)

__all__ = [
    "pack_rows", "unpack_rows", "pack_cols", "unpack_cols", "packed_length", "CHECKPOINT_FORMATS",
    "GPTQTensors", "pack_gptq", "unpack_gptq", "packable", "gptq_shapes", "zeros_v1_to_v2",
    "zeros_v2_to_v1",
]
