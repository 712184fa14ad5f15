"""A whole decode step of a Llama-family model as one C++ call (``quantkern_cpu::llama_decode``,
csrc/cpu/decode.cpp).

:class:`FusedDecodeStep` runs every block of a :class:`~quantkern.generation.FastDecoder` for one new
token per row in a single OpenMP parallel region: the threads own column ranges of each GEMM and a share
of the attention heads and meet at five barriers per layer, instead of a fork/join per GEMM and a
dispatch per elementwise kernel. The lm_head runs in the same region (its packed layout on the C++
kernel, or a dense fp32 weight streamed in row ranges); the embedding lookup before it is one call too
(``quantkern_cpu::packed_columns`` for input embeddings tied to a quantized lm_head: the rows
dequantized from the head's packed layout, as :class:`~quantkern.generation.TiedQuantEmbedding`
computes them).

It takes what the decoder already holds: the prepared :class:`~.backend.CpuKernel` of each fused q/k/v,
o, gate/up and down projection (the same packed tensors the compiled graph calls), the decoder's KV
caches (written in place, so prefill through the compiled graph and decode here share them), its RoPE
tables and key mask. Its reference is the decoder's own ``_forward`` (the pure-PyTorch code the
compiled graph is traced from); tests/kernels/test_cpu_decode.py compares the two.
"""

from __future__ import annotations

import torch

from . import build
from .backend import CpuKernel


def unsupported_reason(dec) -> str | None:
    """``None`` if :class:`FusedDecodeStep` can run decoder ``dec``, else why not (one line)."""
    from ...nn import QuantLinear

    if dec.device.type != "cpu":
        return f"the model is on {dec.device.type}"
    if dec.dtype != torch.float32:
        return f"the fused step computes in fp32 and the model runs in {dec.dtype}"
    err = build.load_error()
    if err is not None:
        return f"the C++ CPU extension is unavailable: {err}"
    if dec.head_dim % 2:
        return f"odd head_dim {dec.head_dim}"
    for i, b in enumerate(dec.blocks):
        if b.qkv is None or b.gate_up is None:
            return f"block {i}: q/k/v or gate/up could not be fused into one projection"
        for part in ("qkv", "o", "gate_up", "down"):
            mod = getattr(b, part)
            if not isinstance(mod, QuantLinear):
                return f"block {i} {part} is a {type(mod).__name__}, not a quantized linear layer"
            k = _kernel(mod, dec)
            if not isinstance(k, CpuKernel):
                return f"block {i} {part} runs on {type(k).__name__}, not the C++ CPU kernel"
    if any(t.dtype != torch.float32 for b in dec.blocks for t in (b.ln1, b.ln2)) or dec.norm_w.dtype != torch.float32:
        return "a norm weight is not fp32"
    return None


def _kernel(mod, dec):
    return mod.kernel_for(torch.empty(dec.batch_size, mod.in_features, dtype=dec.dtype, device=dec.device))


class FusedDecodeStep:
    """``step(x [B, H] fp32, slot, pos [B] int64) -> logits [B, V]`` (or ``[B, H]`` without
    :attr:`has_head`): every block, the final norm and the lm_head for one new token per row (see the
    module docstring); :meth:`embed` gives ``x`` for the new tokens. Build it after the decoder's
    kernels are prepared; raises ``ValueError`` with :func:`unsupported_reason` where it cannot run."""

    def __init__(self, dec):
        why = unsupported_reason(dec)
        if why:
            raise ValueError(f"the fused C++ decode step cannot run this decoder: {why}")
        from ...nn import QuantLinear

        self.dec = dec
        params, cbs, kernels = [], [], []
        empty = torch.empty(0)
        for b in dec.blocks:
            params += [b.ln1.contiguous(), b.ln2.contiguous()]
            for part in ("qkv", "o", "gate_up", "down"):
                k = _kernel(getattr(b, part), dec)
                p = k.packed
                bias = k._bias.float().contiguous() if k._bias is not None else empty
                params += [p.w, p.scales, p.zs, p.gptr, p.src if p.src is not None else empty, bias]
                cbs.append(p.cb)
                kernels.append(k)
        self.kernels = kernels
        isas = {k.isa for k in kernels}
        if len(isas) != 1:
            raise ValueError(f"the projections were prepared for different CPU kernel variants {sorted(isas)}")
        self.isa = isas.pop()
        self.params, self.cbs = params, cbs
        self.inter = dec.blocks[0].down.in_features
        # the output layer inside the call where the op runs it: a packed head on the C++ kernel, or a dense
        # fp32 weight without bias (streamed by the threads, row ranges each); else it stays a module call
        head, self._head_kernel = dec.head, None
        self._head = ([], 0, 0)  # (tensors, container bits, output features): none
        k = _kernel(head, dec) if isinstance(head, QuantLinear) else None
        if isinstance(k, CpuKernel) and k.isa == self.isa:
            p = k.packed
            bias = k._bias.float().contiguous() if k._bias is not None else empty
            self._head = ([p.w, p.scales, p.zs, p.gptr, p.src if p.src is not None else empty, bias], p.cb,
                          p.out_features)
            self._head_kernel = k
        elif (type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == torch.float32
              and head.weight.is_contiguous()):
            self._head = ([head.weight.detach()], 0, head.out_features)
        self.has_head = bool(self._head[0])
        self._op = torch.ops.quantkern_cpu.llama_decode.default
        self._embed_args = self._tied_head(dec)
        self._fixed = (dec.n_heads, dec.n_kv, self.inter, float(dec.eps), float(dec.scaling), self.isa)

    @staticmethod
    def _tied_head(dec):
        """The packed head the input embeddings read, where they are a TiedQuantEmbedding over a head that
        runs the C++ CPU kernel (the rows then come from its packed layout in one call), else None."""
        from ...generation import TiedQuantEmbedding

        if not isinstance(dec.embed, TiedQuantEmbedding) or dec.embed.head[0] is not dec.head:
            return None
        k = _kernel(dec.head, dec)
        if not isinstance(k, CpuKernel):
            return None
        p = k.packed
        return (p.w, p.scales, p.zs, p.gptr, p.src, p.cb, p.out_features, p.in_features), dec.head.scales.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``ids [B]`` as fp32 ``[B, H]`` (the op's ``x``)."""
        if self._embed_args is None:
            return self.dec.embed(ids.view(-1, 1)).reshape(ids.numel(), -1).float().contiguous()
        args, dtype = self._embed_args
        rows = torch.ops.quantkern_cpu.packed_columns(ids.reshape(-1).long().contiguous(), *args)
        return rows if dtype == torch.float32 else rows.to(dtype).float()  # TiedQuantEmbedding's rounding

    @property
    def int8_activations(self) -> bool | None:
        """Whether the projections run with int8 activations (None: some do, some do not). Read from the
        prepared kernels on every call, so :func:`~.backend.int8_activations` switches the fused step too."""
        modes = {k.int8_activations for k in self.kernels}
        return modes.pop() if len(modes) == 1 else None

    def __call__(self, x: torch.Tensor, slot: int, pos: torch.Tensor, with_head: bool = True) -> torch.Tensor:
        """The blocks, the final norm and (where :attr:`has_head` and ``with_head``) the lm_head for the
        new tokens' embeddings ``x [B, H]`` (fp32) written at cache position ``slot`` with RoPE positions
        ``pos [B]``: fp32 logits ``[B, V]``, or the lm_head's input ``[B, H]`` without the head."""
        d = self.dec
        tensors, cb, n = self._head if with_head else ([], 0, 0)
        head_int8 = self._head_kernel.int8_activations if self._head_kernel is not None else False
        return self._op(x, self.params, self.cbs, d.k_cache, d.v_cache, d.cos, d.sin, pos, slot, d.key_valid,
                        d.norm_w, *self._fixed, [k.int8_activations for k in self.kernels], tensors, cb, n, head_int8)
