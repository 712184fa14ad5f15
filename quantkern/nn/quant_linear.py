"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding GPTQ-layout packed weights.

The module is thin: buffers in the canonical GPTQ layout (what checkpoints store, zeros in the v2
"as-is" convention), the scheme, and the kernels chosen per (device, dtype, M bucket) it runs with
(:class:`~quantkern.kernels.registry.KernelCache`): decode and prefill may run different kernels. A
kernel never sees the module: it is prepared from the tensors (:meth:`QuantLinear.weight_tensors`) and
may repack them once into a private layout; that copy lives in the kernel object, never in the state
dict, so saving always writes the standard format.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import QuantizedWeight, ScaleOverflowError, WeightScheme, dtype_overflow
from ..formats.gptq import gptq_shapes, pack_gptq, packable, unpack_gptq
from ..kernels import Backend
from ..kernels.registry import KernelSpec, WeightTensors
from ._scheme import SchemeAttributes
from .base import QuantModule


def _tensors_in(obj, depth: int = 3):
    """The tensors a kernel object holds: in tuples / lists / dicts and in the attributes of
    quantkern's own objects (kernels, packed layouts), ``depth`` levels deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth == 0:
        return
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif type(obj).__module__.startswith("quantkern.") and hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return
    for v in items:
        yield from _tensors_in(v, depth - 1)


class QuantLinear(SchemeAttributes, QuantModule):
    """Weight-only quantized Linear: ``y = x @ dequant(qweight).T + bias``.

    Shapes (K = in_features, N = out_features, G = groups, b = bits): ``qweight`` int32
    ``[K*b/32, N]``, ``qzeros`` int32 ``[G, N*b/32]``, ``scales`` ``[G, N]``, ``g_idx`` int32 ``[K]``,
    ``bias`` ``[N]`` or None (``bias_dtype``, default ``dtype``: the scales'). Inputs may have any
    leading dims and be fp32 / fp16 / bf16; the output has the input's dtype.

    ``load_state_dict()`` forgets the kernels built so far (they are rebuilt from the loaded buffers on
    the next forward); after :meth:`release_canonical` it brings the canonical buffers back when the
    state dict holds all of them, and raises ``RuntimeError`` otherwise.
    """

    _CANONICAL = ("qweight", "qzeros", "scales", "g_idx")  # what kernels repack and release_canonical drops
    float_inputs_only = False  # another dtype gets the kernels' reasons (NoKernelError), as before

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        desc_act: bool = False,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        backend: Backend | str = Backend.AUTO,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ):
        super().__init__(backend)
        self.scheme = WeightScheme(bits=bits, group_size=group_size, sym=sym, act_order=desc_act)
        reason = packable(in_features, out_features, bits)
        if reason:
            raise ValueError(f"QuantLinear({in_features}, {out_features}, bits={bits}): {reason}")
        if group_size != -1 and group_size > in_features:
            raise ValueError(f"group_size={group_size} is larger than in_features={in_features}")
        self.in_features = in_features
        self.out_features = out_features
        shapes = gptq_shapes(in_features, out_features, bits, self.scheme.num_groups(in_features))
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(shapes["scales"], dtype=dtype, device=device))
        g_idx = torch.arange(in_features, dtype=torch.int32, device=device)
        self.register_buffer("g_idx", g_idx // (group_size if group_size != -1 else in_features))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype or dtype, device=device) if bias
                             else None)
        self._released: str | None = None  # why the canonical buffers are gone (see release_canonical)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None, backend: Backend | str = Backend.AUTO,
                       name: str = "") -> "QuantLinear":
        """Build from the canonical form; ``dtype`` (default: the scales' dtype) is that of scales and
        bias. A bias that ``dtype`` cannot hold (e.g. |b| > 65504 in fp16) keeps its own dtype.

        Raises :class:`~quantkern.core.ScaleOverflowError` (naming ``name``) for scales that are not
        finite or overflow ``dtype``, and for a non-finite bias."""
        qw.validate()
        dtype = dtype or qw.scales.dtype
        what = name or "QuantLinear"
        if not bool(torch.isfinite(qw.scales).all()):
            raise ScaleOverflowError(f"{what}: the quantized weight's scales are not finite "
                                     f"({str(qw.scales.dtype).replace('torch.', '')} overflowed?)")
        err = dtype_overflow(qw.scales, dtype) if qw.scales.dtype != dtype else None
        if err:
            raise ScaleOverflowError(f"{what}: scales: {err}; keep them in float32")
        bias_dtype = dtype
        if bias is not None:
            if not bool(torch.isfinite(bias.detach()).all()):
                raise ScaleOverflowError(f"{what}: the bias is not finite")
            if bias.dtype != dtype and dtype_overflow(bias, dtype):
                bias_dtype = bias.dtype  # e.g. an fp32 bias of 1e5 with fp16 scales stays fp32
        s = qw.scheme
        mod = cls(qw.in_features, qw.out_features, s.bits, s.group_size, s.sym, s.act_order,
                  bias=bias is not None, dtype=dtype, backend=backend, device=qw.codes.device, bias_dtype=bias_dtype)
        mod.name = name
        t = pack_gptq(qw)
        if t.scales.shape != mod.scales.shape:  # act-order without static groups still has ceil(K/g) groups
            raise ValueError(f"scales shape {tuple(t.scales.shape)} != expected {tuple(mod.scales.shape)}")
        mod.qweight.copy_(t.qweight)
        mod.qzeros.copy_(t.qzeros)
        mod.scales.copy_(t.scales.to(dtype))
        mod.g_idx.copy_(t.g_idx)
        if bias is not None:
            mod.bias.copy_(bias.detach().to(bias_dtype))
        return mod

    def to_quantized(self) -> QuantizedWeight:
        """The canonical form of this layer's weight (unpacks; for tests, export and repacking)."""
        from ..formats.gptq import GPTQTensors

        self._check_canonical("to_quantized()")
        t = GPTQTensors(self.qweight, self.qzeros, self.scales, self.g_idx)
        return unpack_gptq(t, self.scheme, self.in_features, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[N, K]`` in the original column order (act-order undone)."""
        return self.to_quantized().dequantize()

    # --- properties -----------------------------------------------------------------------------

    def describe(self) -> str:
        return f"{self.name or 'QuantLinear'}[{self.in_features}->{self.out_features}, {self.scheme.describe()}]"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}, "
                f"bias={self.bias is not None}, backend={self.backend.value}")

    # --- execution ------------------------------------------------------------------------------
    def kernel_spec(self) -> KernelSpec:
        """What a kernel must know of this weight before seeing its tensors."""
        return KernelSpec(self.scheme, self.in_features, self.out_features, self.scales.dtype, self.bias is not None)

    def weight_tensors(self) -> WeightTensors:
        """The canonical tensors (and bias) kernels are prepared from."""
        self._check_canonical("preparing a kernel")
        return WeightTensors(self.kernel_spec(), self.name, qweight=self.qweight, qzeros=self.qzeros,
                             scales=self.scales, g_idx=self.g_idx, bias=self.bias)

    def kernel_for(self, x: torch.Tensor):
        if self._released is not None and self._kernels.lookup(x) is None \
                and (x.device, x.dtype) not in self._kernels.built_for():
            self._check_canonical(f"running on {x.device} / {x.dtype} (no kernel was built for them)")
        return super().kernel_for(x)

    def reset_kernels(self) -> None:
        """Forget chosen kernels (call after changing buffers in place)."""
        self._check_canonical("reset_kernels()")
        super().reset_kernels()

    def _apply(self, fn, *args, **kwargs):
        self._check_canonical("moving or casting the layer (.to / .cuda / .half)")
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loading replaces the buffers the kernels were built (repacked) from: forget the kernels, so
        the next forward rebuilds them from what was loaded. After release_canonical the canonical
        buffers come back when ``state_dict`` holds all of them (else ``RuntimeError``)."""
        for n in ("scales", "bias"):  # copy_ into a narrower float dtype must not turn into inf
            t, buf = state_dict.get(prefix + n), self._buffers.get(n)
            if (isinstance(t, torch.Tensor) and buf is not None and t.is_floating_point() and t.dtype != buf.dtype
                    and not local_metadata.get("assign_to_params_buffers", False)):
                err = dtype_overflow(t, buf.dtype)
                if err:
                    raise ScaleOverflowError(f"{prefix + n}: {err}, the dtype of {self.describe()}'s {n}; "
                                             "build the layer with a dtype that holds them")
        released = self._released is not None
        if released:
            absent = [n for n in self._CANONICAL if prefix + n not in state_dict]
            if absent:
                self._check_canonical(f"load_state_dict() without {', '.join(prefix + n for n in absent)}")
            shapes = gptq_shapes(self.in_features, self.out_features, self.bits, self.scheme.num_groups(self.in_features))
            empty = {n: self._buffers[n] for n in self._CANONICAL}
            for n, buf in empty.items():
                self._buffers[n] = torch.empty(shapes[n], dtype=buf.dtype, device=buf.device)
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if released and len(error_msgs) > n_err:  # not loaded: stay released rather than hold garbage
            self._buffers.update(empty)
            return
        self._kernels.clear()
        self._released = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._check_canonical("state_dict() / saving")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # --- inference-only memory ----------------------------------------------------------------------
    @property
    def released(self) -> bool:
        return self._released is not None

    def release_canonical(self) -> int:
        """Drop the canonical GPTQ buffers (``qweight``, ``qzeros``, ``scales``, ``g_idx``) once the
        kernels built so far hold their own copy of the weights (the CPU kernels' layout, the CUDA
        GEMM's, the Triton one's): a layer that only runs then keeps one copy of its weights instead of
        two. Build the kernels first (run a forward with the activations' device and dtype).

        Afterwards the layer runs only on the device / dtype pairs already built; ``state_dict()``,
        saving, ``to_quantized()``, ``.to()`` and other dtypes raise ``RuntimeError`` (reload the
        checkpoint for those, or ``load_state_dict()`` a state dict holding all four buffers). Returns the bytes freed (buffers whose storage a kernel still shares,
        as Triton shares 4-bit ``qweight``, count 0). Raises ``RuntimeError`` if no kernel is built or
        one still reads the canonical buffers (the reference kernel, the CUDA GEMV's large-M path)."""
        if self._released is not None:
            return 0
        if not self._kernels:
            raise RuntimeError(f"{self.describe()}: no kernel built yet; run one forward with the inference "
                               "activations (device and dtype) before release_canonical()")
        readers = sorted({type(k).__name__ for k in self._kernels.prepared() if not k.owns_weights})
        if readers:
            raise RuntimeError(f"{self.describe()}: kernel(s) {readers} read the canonical buffers at every call; "
                               "nothing can be released")
        kept = {t.untyped_storage().data_ptr() for k in self._kernels.prepared() for t in _tensors_in(k)}
        freed = 0
        for name in self._CANONICAL:
            buf = self._buffers[name]
            if buf.untyped_storage().data_ptr() not in kept:
                freed += buf.numel() * buf.element_size()
            self._buffers[name] = buf.new_empty(0)
        built = ", ".join(f"{d} / {str(t).replace('torch.', '')}" for d, t in self._kernels.built_for())
        self._released = f"its canonical weights were released for inference on {built}"
        return freed

    def _check_canonical(self, what: str) -> None:
        if self._released is not None:
            raise RuntimeError(f"{self.describe()}: {what} needs the canonical GPTQ buffers, but {self._released} "
                               "(release_canonical); load the checkpoint again for that")


def release_canonical(model: nn.Module) -> int:
    """:meth:`QuantLinear.release_canonical` on every QuantLinear of ``model`` (run one forward with the
    inference activations first); returns the bytes freed. For a model that only runs: saving it,
    moving it or running it with another dtype raise afterwards."""
    return sum(m.release_canonical() for m in model.modules() if isinstance(m, QuantLinear))
