"""The one block-by-block calibration loop, and the protocol the calibrated methods implement.

Every calibrated method (GPTQ and FP8-GPTQ, AWQ, SmoothQuant / W8A8 / PTQ / ZeroQuant with static
scales, the sensitivity measurement) is a :class:`BlockProcessor`: given one decoder block, the
planned targets in it and the calibration inputs that reach it, it returns the block's quantized
modules and, where its own forwards already computed them, the block's outputs. :func:`calibrate_block`
wraps one call with what every method needs (the block's device, the finite-input check, the outputs
that feed the next block); :func:`run_blocks` sweeps a model held in memory, and the streaming driver
(:mod:`quantkern.offload.stream`) calls :func:`calibrate_block` itself between reading a block from
disk and writing it out. A method is thus written once and runs both ways.

Which outputs feed the next block is the method's choice: GPTQ returns none, so the loop runs the
block once more with its quantized weights (each block is calibrated on quantized predecessors);
AWQ and SmoothQuant return the float outputs of their observing forward (AutoAWQ's and the
SmoothQuant paper's order).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import block_device
from .capture import BlockInput, check_finite_inputs, run_block

#: ``(quantized modules {full name: module}, block outputs or None)``
BlockResult = tuple[dict[str, nn.Module], "list[torch.Tensor] | None"]


class BlockProcessor(Protocol):
    """What a calibrated method implements (the quantizers in :mod:`quantkern.api` do).

    ``plan`` is its :class:`~quantkern.api.targets.TargetPlan` (``in_block(prefix)`` gives a block's
    targets); ``blocks_name`` the decoder blocks' path."""

    plan: object
    blocks_name: str

    def process_block(self, block: nn.Module, prefix: str, targets: dict[str, nn.Module], experts: dict,
                      inputs: list[BlockInput], device: torch.device) -> BlockResult:
        """Calibrate and quantize ``targets`` (``{name relative to the block: Linear}``) and ``experts``
        (``{relative name: ExpertsSite}``) of ``block`` (at ``prefix``, e.g. ``"model.layers.3."``) on
        ``inputs``. Returns the quantized modules under their full names, not yet swapped in (the
        block's own modules may run with their quantized weights meanwhile), and the block's outputs
        (one tensor per input, on the input's device) or None to have them computed after."""
        ...


def calibrate_block(proc: BlockProcessor, i: int, block: nn.Module, inputs: list[BlockInput], device
                    ) -> tuple[list[BlockInput], dict[str, nn.Module]]:
    """Run ``proc`` on block ``i`` (weights materialised) and return the next block's inputs and the
    block's quantized modules (not swapped in). A block placed by an accelerate device map runs where it
    is; a block without targets is only run forward."""
    device = block_device(block, device)
    prefix = f"{proc.blocks_name}.{i}."
    targets, experts = proc.plan.in_block(prefix)
    done, outputs = {}, None
    if targets or experts:
        check_finite_inputs(inputs, prefix[:-1], f"{proc.blocks_name}.{i - 1}" if i else None)
        done, outputs = proc.process_block(block, prefix, targets, experts, inputs, device)
    if outputs is None:
        outputs = run_block(block, inputs, device)
    return [BlockInput(h, inp.kwargs, inp.token_mask) for inp, h in zip(inputs, outputs)], done


def run_blocks(proc: BlockProcessor, blocks: nn.ModuleList, inputs: list[BlockInput], device, replace,
               desc: str = "blocks", verbose: bool = True) -> None:
    """Calibrate every block in turn, each on the outputs of the one before, swapping the quantized
    modules in with ``replace(name, module)`` once the block's outputs are computed. Only one block's
    activations are alive at a time."""
    for i in tqdm(range(len(blocks)), desc=desc, disable=not verbose):
        inputs, done = calibrate_block(proc, i, blocks[i], inputs, device)
        for name, q in done.items():
            replace(name, q)
