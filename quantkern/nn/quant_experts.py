"""``QuantExperts``: a drop-in replacement for transformers 5's fused MoE experts modules
(``Qwen3MoeExperts``, ``MixtralExperts``, ``DeepseekV3Experts``, ``GptOssExperts``, ...) holding every
expert's weights packed in the GPTQ layout, stacked over the experts.

Buffers (``E`` experts, ``K`` in, ``N`` out per projection, ``G`` groups, ``b`` bits), one
:class:`StackedGPTQ` per projection: ``gate_up_proj`` (``K = H``, ``N = 2I``, gate and up fused in the
replaced module's row order) and ``down_proj`` (``K = I``, ``N = H``), each with ``qweight`` int32
``[E, K*b/32, N]``, ``qzeros`` int32 ``[E, G, N*b/32]``, ``scales`` ``[E, G, N]``, ``g_idx`` int32
``[E, K]`` and, where the family has biases (gpt-oss), ``bias`` ``[E, N]``: slice ``[e]`` of each is
exactly one :class:`~quantkern.nn.QuantLinear`'s canonical tensors (zeros in the v2 convention).

The forward has the replaced module's signature and semantics: ``forward(hidden_states [T, H],
top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``; the model's own router and top-k run before it.
The routing becomes (token, expert) pairs sorted by expert (:func:`quantkern.kernels.moe.route`); each
projection is one grouped kernel call over all pairs (:mod:`quantkern.kernels.moe`: chosen per device,
dtype and M bucket from the registry, like the dense layers' kernels; ``backend`` picks one), the
gating (``act(gate) * up``, gpt-oss's clamped SwiGLU) is the replaced module's own ``_apply_gate``, and
the routing weights scale each pair before the pairs are summed per token.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core import QuantizedWeight, ScaleOverflowError, WeightScheme, dtype_overflow
from ..formats.gptq import GPTQTensors, gptq_shapes, pack_gptq, packable, unpack_gptq
from ..kernels.moe import EXPERTS_LAYOUT, route
from ..kernels.reference import dequantize_gptq
from ..kernels.registry import Backend, KernelSpec, WeightTensors
from ._scheme import SchemeAttributes
from .base import KernelOwner


class StackedGPTQ(KernelOwner, nn.Module):
    """The canonical GPTQ tensors of ``num_experts`` Linears of one shape, stacked on a leading dim."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, scheme: WeightScheme,
                 bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.scheme = num_experts, in_features, out_features, scheme
        shapes = gptq_shapes(in_features, out_features, scheme.bits, scheme.num_groups(in_features))
        e = num_experts
        self.register_buffer("qweight", torch.zeros((e, *shapes["qweight"]), dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros((e, *shapes["qzeros"]), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones((e, *shapes["scales"]), dtype=dtype, device=device))
        gs = scheme.group_size if scheme.group_size != -1 else in_features
        g_idx = (torch.arange(in_features, dtype=torch.int32, device=device) // gs).expand(e, -1).contiguous()
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", torch.zeros(e, out_features, dtype=dtype, device=device) if bias else None)
        self.name = ""
        self._init_kernels(Backend.AUTO)

    # --- kernels (KernelOwner) --------------------------------------------------------------------
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(self.scheme, self.in_features, self.out_features, self.scales.dtype,
                          self.bias is not None, layout=EXPERTS_LAYOUT, num_experts=self.num_experts)

    def weight_tensors(self) -> WeightTensors:
        return WeightTensors(self.kernel_spec(), self.name, qweight=self.qweight, qzeros=self.qzeros,
                             scales=self.scales, g_idx=self.g_idx, bias=self.bias)

    def describe(self) -> str:
        return f"{self.name or 'StackedGPTQ'}{self.kernel_spec().describe()}"

    def grouped(self, x: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor) -> torch.Tensor:
        """``[P, N]``: pair ``p`` is ``x[rows[p]] @ W[e] (+ bias[e])`` for the expert owning it (see
        :mod:`quantkern.kernels.moe`)."""
        x = x if x.is_contiguous() else x.contiguous()
        return self.kernel_for(x).apply(x, rows, offsets)

    def set_expert(self, e: int, qw: QuantizedWeight) -> None:
        t = pack_gptq(qw)
        if t.scales.shape != self.scales.shape[1:]:
            raise ValueError(f"expert {e}: scales shape {tuple(t.scales.shape)} != {tuple(self.scales.shape[1:])}")
        self.qweight[e].copy_(t.qweight)
        self.qzeros[e].copy_(t.qzeros)
        self.scales[e].copy_(t.scales.to(self.scales.dtype))
        self.g_idx[e].copy_(t.g_idx)
        self.reset_kernels()

    def tensors(self, e: int) -> GPTQTensors:
        return GPTQTensors(self.qweight[e], self.qzeros[e], self.scales[e], self.g_idx[e])

    def to_quantized(self, e: int) -> QuantizedWeight:
        return unpack_gptq(self.tensors(e), self.scheme, self.in_features, self.out_features)

    def dequantize(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert ``e``'s weight ``[K, N]`` (ready for ``x @ W``)."""
        return dequantize_gptq(self.qweight[e], self.qzeros[e], self.scales[e], self.g_idx[e], self.scheme.bits,
                               self.in_features, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.scheme.describe()}, bias={self.bias is not None}")


def gating_owner(experts: nn.Module) -> nn.Module:
    """A parameter-free copy of a fused experts module, kept only for its ``_apply_gate`` / ``act_fn``
    (and scalars such as gpt-oss's ``alpha`` / ``limit``); the original is left untouched."""
    c = copy.copy(experts)
    for k in ("_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if isinstance(c.__dict__.get(k), dict):
            c.__dict__[k] = type(c.__dict__[k])()
    return c


def apply_gate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The gating of a fused experts module on its gate/up output: its own ``_apply_gate`` (set by
    transformers' ``use_experts_implementation``; gpt-oss has its own), else ``act_fn(gate) * up``."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


class QuantExperts(SchemeAttributes, nn.Module):
    """Weight-only quantized fused MoE experts (see the module docstring)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int = 4,
                 group_size: int = 128, sym: bool = True, desc_act: bool = False, *, layout=None,
                 gate_owner: nn.Module | None = None, bias: bool = False, dtype: torch.dtype = torch.float16,
                 device=None, name: str = ""):
        super().__init__()
        from ..arch.moe import STANDARD

        self.scheme = WeightScheme(bits=bits, group_size=group_size, sym=sym, act_order=desc_act)
        self.name = name
        what = name or "QuantExperts"
        for k, n, label in ((hidden_size, intermediate_size, "gate/up"), (intermediate_size, hidden_size, "down")):
            reason = packable(k, n, bits)
            if group_size != -1 and group_size > k:
                reason = (reason + "; " if reason else "") + f"group_size={group_size} > in_features={k}"
            if reason:
                raise ValueError(f"{what}: {label} projection ({k}->{n} per expert) cannot be packed with "
                                 f"bits={bits}: {reason}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.layout = layout or STANDARD
        self.gate_up_proj = StackedGPTQ(num_experts, hidden_size, 2 * intermediate_size, self.scheme, bias, dtype, device)
        self.down_proj = StackedGPTQ(num_experts, intermediate_size, hidden_size, self.scheme, bias, dtype, device)
        self.gate_up_proj.name, self.down_proj.name = f"{name}.gate_up_proj", f"{name}.down_proj"
        self.__dict__["_gate_owner"] = gate_owner  # not a submodule: holds no tensors, not in the state dict

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, experts: nn.Module, layout, gate_up: list[QuantizedWeight], down: list[QuantizedWeight],
                       dtype: torch.dtype | None = None, name: str = "", scheme: WeightScheme | None = None
                       ) -> "QuantExperts":
        """Build from the replaced fused experts module (for its activation and biases) and each expert's
        canonical quantized weights (``gate_up[e]``: ``[2I, H]`` in the module's row order; ``down[e]``:
        ``[H, I]``). ``scheme``: the module's (default: expert 0's; an expert quantized with RTN where the
        others used act-order has a plain ``g_idx``, which the act-order layout holds too). Raises :class:`~quantkern.core.ScaleOverflowError` naming the expert for scales
        that are not finite or overflow ``dtype``."""
        from ..arch.moe import experts_shape

        e, h, i = experts_shape(experts, layout)
        if len(gate_up) != e or len(down) != e:
            raise ValueError(f"{name}: {len(gate_up)} / {len(down)} quantized experts for {e} experts")
        s = scheme or gate_up[0].scheme
        dtype = dtype or gate_up[0].scales.dtype
        bias = layout.gate_up_bias is not None
        mod = cls(e, h, i, s.bits, s.group_size, s.sym, s.act_order, layout=layout, gate_owner=gating_owner(experts),
                  bias=bias, dtype=dtype, device=gate_up[0].codes.device, name=name)
        for j in range(e):
            for proj, qw, label in ((mod.gate_up_proj, gate_up[j], "gate_up_proj"), (mod.down_proj, down[j], "down_proj")):
                where = f"{name or 'QuantExperts'}.{j}.{label}"
                qw.validate()
                if not bool(torch.isfinite(qw.scales).all()):
                    raise ScaleOverflowError(f"{where}: the quantized weight's scales are not finite")
                err = dtype_overflow(qw.scales, dtype) if qw.scales.dtype != dtype else None
                if err:
                    raise ScaleOverflowError(f"{where}: scales: {err}; keep them in float32")
                proj.set_expert(j, qw)
        mod.reset_kernels()
        if bias:
            with torch.no_grad():
                mod.gate_up_proj.bias.copy_(getattr(experts, layout.gate_up_bias).detach().to(dtype))
                mod.down_proj.bias.copy_(getattr(experts, layout.down_bias).detach().to(dtype))
        return mod

    # --- properties -----------------------------------------------------------------------------

    @property
    def in_features(self) -> int:  # for the format rules (LayerPlan)
        return self.hidden_size

    @property
    def out_features(self) -> int:
        return self.hidden_size

    def describe(self) -> str:
        return (f"{self.name or 'QuantExperts'}[{self.num_experts} experts, {self.hidden_size}->"
                f"{self.intermediate_size}->{self.hidden_size}, {self.scheme.describe()}]")

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, {self.scheme.describe()}")

    def dense_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert dequantized, as ``nn.Linear`` weights: ``(gate_up [E, 2I, H], down [E, H, I])``."""
        gu = torch.stack([self.gate_up_proj.dequantize(e, dtype).t() for e in range(self.num_experts)])
        dn = torch.stack([self.down_proj.dequantize(e, dtype).t() for e in range(self.num_experts)])
        return gu, dn

    # --- execution ------------------------------------------------------------------------------
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__.get("_gate_owner")
        if owner is None or not (hasattr(owner, "_apply_gate") or hasattr(owner, "act_fn")):
            raise RuntimeError(f"{self.describe()}: no activation known (built without the replaced module)")
        return apply_gate(owner, gate_up)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x [M, H]`` (no routing weight)."""
        w = self.gate_up_proj.dequantize(e, x.dtype)
        y = x @ w
        if self.gate_up_proj.bias is not None:
            y = y + self.gate_up_proj.bias[e].to(y.dtype)
        h = self._apply_gate(y)
        out = h @ self.down_proj.dequantize(e, h.dtype)
        if self.down_proj.bias is not None:
            out = out + self.down_proj.bias[e].to(out.dtype)
        return out

    # --- kernels ----------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The grouped kernels' backend for both projections (see :class:`StackedGPTQ`)."""
        return self.gate_up_proj.backend

    @backend.setter
    def backend(self, value) -> None:
        self.gate_up_proj.backend = value
        self.down_proj.backend = value

    def reset_kernels(self) -> None:
        """Forget the chosen kernels (call after changing buffers in place)."""
        self.gate_up_proj.reset_kernels()
        self.down_proj.reset_kernels()

    def build_kernels(self, device, dtype: torch.dtype, max_rows: int | None = None) -> None:
        self.gate_up_proj.build_kernels(device, dtype, max_rows)
        self.down_proj.build_kernels(device, dtype, max_rows)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if top_k_index is None:
            top_k_index = kwargs.pop("router_indices", None)
        if top_k_weights is None:
            top_k_weights = kwargs.pop("routing_weights", None)
        if top_k_index is None or top_k_weights is None:
            raise TypeError(f"{self.describe()}: forward(hidden_states, top_k_index, top_k_weights) needs the routing")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"{self.describe()}: input has {hidden_states.shape[-1]} features, "
                             f"expected {self.hidden_size}")
        x = hidden_states.reshape(-1, self.hidden_size)
        idx = top_k_index.reshape(x.shape[0], -1)
        r = route(idx, self.num_experts)
        y = self.gate_up_proj.grouped(x, r.rows, r.offsets)
        out = self.down_proj.grouped(self._apply_gate(y), None, r.offsets)
        out = out * top_k_weights.reshape(-1)[r.order, None]
        final = torch.zeros_like(x)
        final.index_add_(0, r.rows, out.to(final.dtype))
        return final.reshape(hidden_states.shape)
