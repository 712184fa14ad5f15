"""Calibration: data sources, the block-by-block capture loop (the decoder blocks are found by
:mod:`quantkern.arch`)."""

from ..arch import find_decoder_blocks
from .capture import BlockInput, InputCatcher, StopForward, check_finite_inputs, moe_inputs, run_block
from .data import Batch, check_token_ids, group_batches, normalize_calibration_data, sample_windows
from .text import builtin_text, load_text

__all__ = [
    "find_decoder_blocks", "BlockInput", "InputCatcher", "StopForward",
    "check_finite_inputs", "moe_inputs", "run_block", "Batch", "check_token_ids", "group_batches", "normalize_calibration_data",
    "sample_windows", "builtin_text", "load_text",
]
