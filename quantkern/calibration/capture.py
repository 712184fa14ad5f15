"""The block-by-block calibration loop's plumbing.

:class:`InputCatcher` records what the first decoder block receives (hidden states and every keyword
argument: masks, positions, rotary embeddings) and stops the forward there, so calibration never runs
the rest of the model. :func:`run_block` then feeds one block at a time, optionally with hooks that
collect each Linear's inputs for the algorithm; only one block's activations are alive at a time.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised by the catcher to end a calibration forward at the first decoder block."""


@dataclass
class BlockInput:
    """One calibration batch as seen by a decoder block."""

    hidden: torch.Tensor  # [B, L, H]
    kwargs: dict
    token_mask: torch.Tensor  # bool [B, L]: real (non-padding) tokens


@dataclass
class InputCatcher:
    """Installed by ``prepare``: a pre-hook on block 0 plus a wrapper on ``model.forward`` that turns the
    hook's :class:`StopForward` into a ``None`` return, so users can drive calibration with ordinary
    ``model(**batch)`` calls."""

    model: nn.Module
    first_block: nn.Module
    offload_device: torch.device | None = None
    inputs: list[BlockInput] = field(default_factory=list)
    _mask: torch.Tensor | None = None

    def install(self) -> "InputCatcher":
        self._hook = self.first_block.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        original = self.model.forward
        catcher = self

        def forward(model_self, *args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if mask is None and isinstance(ids, torch.Tensor):
                mask = torch.ones_like(ids)
            catcher._mask = mask
            kwargs.setdefault("use_cache", False)
            try:
                return original(*args, **kwargs)
            except StopForward:
                return None

        self._original_forward = original
        self.model.forward = types.MethodType(forward, self.model)
        return self

    def remove(self) -> None:
        self._hook.remove()
        if "forward" in self.model.__dict__:
            del self.model.__dict__["forward"]

    def _pre_hook(self, module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra_args = args[1:]
        if extra_args:  # e.g. GPT-2 passes past_key_values / attention_mask positionally: name them
            names = [n for n in inspect.signature(module.forward).parameters if n not in ("self", "hidden_states")]
            if len(extra_args) > len(names) or any(n in kwargs for n in names[:len(extra_args)]):
                raise RuntimeError("decoder block received extra positional arguments; cannot replay them")
            kwargs.update(zip(names, extra_args))
        mask = self._mask
        if mask is None or mask.shape != hidden.shape[:2]:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        dev = self.offload_device
        kwargs = {k: _to(v, dev) for k, v in kwargs.items()}
        self.inputs.append(BlockInput(_to(hidden.detach(), dev), kwargs, _to(mask.bool(), dev)))
        raise StopForward


def check_finite_inputs(inputs: list[BlockInput], block_name: str, previous: str | None = None) -> None:
    """Raise ``ValueError`` if the hidden states fed to block ``block_name`` hold inf / NaN (one host sync
    for all batches). ``previous``: what produced them (the block before), for the message."""
    if not inputs:
        return
    flags = [torch.isfinite(inp.hidden).all() for inp in inputs]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).all()
    if not bool(ok):
        i = next(k for k, f in enumerate(flags) if not bool(f))
        src = f"the outputs of {previous}" if previous else "the model's embeddings"
        raise ValueError(f"{block_name}: non-finite inputs (inf/NaN) in its hidden states (calibration batch {i}): "
                         f"{src} are not finite on the calibration data")


def _to(x, device):
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def block_output(out) -> torch.Tensor:
    """Decoder blocks return a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def moe_inputs(args, kwargs, token_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(hidden_states [R, H], top_k_index [R, k])`` a fused MoE experts module is called with (its
    pre-hook's ``args`` / ``kwargs``), rows of padding (``token_mask``, when it covers them) removed."""
    x = args[0] if args else kwargs["hidden_states"]
    idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    x2 = x.reshape(-1, x.shape[-1])
    idx2 = idx.reshape(x2.shape[0], -1)
    if token_mask is not None and token_mask.numel() == x2.shape[0]:
        keep = token_mask.reshape(-1).to(x2.device).bool()
        x2, idx2 = x2[keep], idx2[keep]
    return x2, idx2


def run_block(block: nn.Module, inputs: list[BlockInput], device: torch.device | None = None,
              collect: dict[str, nn.Module] | None = None, on_input=None, keep_outputs: bool = True,
              stop_after: set[str] | None = None, on_batch=None) -> list[torch.Tensor]:
    """Run ``block`` over every calibration batch.

    ``collect`` maps names to sub-modules whose inputs are passed to ``on_input(name, x2d)`` with
    padding rows removed. ``stop_after``: names of modules after which the forward may stop (their
    inputs are all that is needed), which saves compute when only early Linears are calibrated.
    Returns the block outputs (on the inputs' device) when ``keep_outputs``. ``on_batch(inp)`` is
    called with each :class:`BlockInput` before its forward (hooks of the caller's own read its
    ``token_mask``); a :class:`StopForward` raised by such a hook ends that batch's forward.
    """
    hooks = []
    seen: set[str] = set()
    current_mask: list[torch.Tensor] = []
    for name, mod in (collect or {}).items():
        def hook(m, args, _name=name):
            x = args[0]
            mask = current_mask[0]
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] == mask.numel():
                x2 = x2[mask.reshape(-1).to(x2.device)]
            on_input(_name, x2)
            if stop_after is not None:
                seen.add(_name)
                if stop_after <= seen:
                    raise StopForward
        hooks.append(mod.register_forward_pre_hook(hook))
    outs = []
    try:
        for inp in inputs:
            current_mask[:] = [inp.token_mask]
            seen.clear()
            if on_batch is not None:
                on_batch(inp)
            dev = device or inp.hidden.device
            try:
                out = block(inp.hidden.to(dev), **_to(inp.kwargs, dev))
            except StopForward:
                continue
            if keep_outputs:
                outs.append(block_output(out).to(inp.hidden.device))
    finally:
        for h in hooks:
            h.remove()
    return outs
