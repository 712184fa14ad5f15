"""Calibration: data sources, the block-by-block capture loop, per-architecture specs."""

from .arch import ARCH_SPECS, ArchSpec, find_decoder_blocks
from .capture import BlockInput, InputCatcher, StopForward, check_finite_inputs, run_block
from .data import Batch, check_token_ids, group_batches, normalize_calibration_data, sample_windows
from .text import builtin_text, load_text

__all__ = [
    "ARCH_SPECS", "ArchSpec", "find_decoder_blocks", "BlockInput", "InputCatcher", "StopForward",
    "check_finite_inputs", "run_block", "Batch", "check_token_ids", "group_batches", "normalize_calibration_data",
    "sample_windows", "builtin_text", "load_text",
]
