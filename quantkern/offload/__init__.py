"""Quantize models larger than memory: stream decoder blocks from safetensors, write shards as blocks
finish, resume after a crash. See :func:`quantize_streaming`."""

from .source import OFFLOAD_MODES, SourceCheckpoint
from .state import StreamStateError
from .stream import quantize_streaming

__all__ = ["quantize_streaming", "SourceCheckpoint", "StreamStateError", "OFFLOAD_MODES"]
