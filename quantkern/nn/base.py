"""``QuantModule``: what every quantized linear module of quantkern shares.

The family: :class:`~quantkern.nn.QuantLinear` (weight-only int2..8, GPTQ layout),
:class:`~quantkern.nn.W8A8Linear` (int8 x int8), :class:`~quantkern.nn.FP8Linear` (fp8 E4M3,
weight-only or W8A8), :class:`~quantkern.nn.FP4Linear` (E2M1 weight-only) and
:class:`~quantkern.nn.ZeroQuantLinear` (ZeroQuant-style int weights and activations). Each holds its
tensors as buffers (what its checkpoint format stores) and answers :meth:`kernel_spec` (what it is) and
:meth:`weight_tensors` (the tensors kernels are prepared from). The forward is the same for all: the
kernel chosen per (device, dtype, M bucket) from the one registry (:mod:`quantkern.kernels.registry`),
in the one backend vocabulary (:class:`~quantkern.kernels.Backend`), runs ``[M, K] -> [M, N]`` as one
custom op.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.registry import Backend, KernelCache, KernelSpec, QuantKernel, WeightTensors, check_same_device

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelOwner:
    """The kernel choice a module that runs registered kernels shares (mixed into an ``nn.Module``):
    ``backend``, :meth:`kernel_for`, :meth:`build_kernels`, :meth:`reset_kernels`, and the prepared
    kernels forgotten when the buffers move, change dtype or are loaded. Subclasses implement
    :meth:`kernel_spec`, :meth:`weight_tensors` and :meth:`describe`, and set ``in_features``."""

    def _init_kernels(self, backend) -> None:
        self._kernels = KernelCache()
        self.backend = backend

    def kernel_spec(self) -> KernelSpec:
        raise NotImplementedError

    def weight_tensors(self) -> WeightTensors:
        raise NotImplementedError

    @property
    def backend(self) -> Backend:
        """The backend this module runs on (``auto``: the first registered kernel that fits). Setting
        it (a :class:`~quantkern.kernels.Backend` or its name) forgets the kernels chosen so far."""
        return self._backend

    @backend.setter
    def backend(self, value) -> None:
        self._backend = Backend.parse(value)
        self._kernels.clear()

    def kernel_for(self, x: torch.Tensor) -> QuantKernel:
        """The kernel that runs ``x`` (``[M, K]``): chosen once per (device, dtype, M bucket) and prepared
        (repacked) once per (device, dtype, backend)."""
        k = self._kernels.lookup(x)
        if k is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"{self.describe()}: no kernel is prepared for {x.device} / {x.dtype} with "
                                   f"{x.shape[0]} rows inside torch.compile; call quantkern.nn.build_kernels(model, "
                                   "device, dtype) before compiling")
            check_same_device(self, x, self.named_buffers(recurse=False))
            k = self._kernels.get(x, self.kernel_spec(), self.weight_tensors, self._backend, self.describe())
        return k

    def build_kernels(self, device, dtype: torch.dtype, max_rows: int | None = None) -> None:
        """Choose and prepare the kernels for every M bucket up to ``max_rows`` rows (None: all) on
        ``device`` / ``dtype`` now, e.g. before ``torch.compile`` traces the model (a choice made inside
        a traced graph would break it)."""
        from ..kernels.registry import M_BUCKETS

        rows = [b for b in M_BUCKETS if max_rows is None or b <= max_rows]
        if max_rows is None or max_rows > M_BUCKETS[-1]:
            rows.append(M_BUCKETS[-1] + 1)
        elif max_rows not in rows:
            rows.append(max_rows)
        for m in rows:
            self.kernel_for(torch.empty(m, self.in_features, device=device, dtype=dtype))

    def reset_kernels(self) -> None:
        """Forget the chosen kernels (call after changing buffers in place)."""
        self._kernels.clear()

    # --- the kernels follow the buffers ---------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        self._kernels.clear()  # buffers move or change dtype: prepared copies are stale
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == n_err:
            self._kernels.clear()  # the buffers kernels were prepared from were replaced


class QuantModule(KernelOwner, nn.Module):
    """Base of the quantized linear modules (see the module docstring). Subclasses set
    ``in_features`` / ``out_features`` and implement :meth:`kernel_spec` and :meth:`weight_tensors`."""

    def __init__(self, backend: Backend | str = Backend.AUTO):
        super().__init__()
        self.name = ""
        self._init_kernels(backend)

    def describe(self) -> str:
        return f"{self.name or type(self).__name__}{self.kernel_spec().describe()}"

    #: refuse non-float activations in :meth:`check_input` (False: leave the dtype to the kernels' answers)
    float_inputs_only = True

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for an input the module cannot take (before any kernel sees it)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.describe()}: input has {x.shape[-1]} features, expected {self.in_features}")
        if self.float_inputs_only and x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{self.describe()}: activations must be fp32/fp16/bf16, got {x.dtype}")

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module represents, fp32 ``[out_features, in_features]`` (for the backward
        pass, tests and export)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        kernel = self.kernel_for(x2)
        if x2.requires_grad and torch.is_grad_enabled():
            y = _FrozenWeightLinear.apply(x2, kernel, self)
        else:
            y = kernel.apply(x2)
        return y.reshape(*x.shape[:-1], self.out_features)


class _FrozenWeightLinear(torch.autograd.Function):
    """The kernel's forward, differentiable in the input only: the quantized weights are frozen (buffers),
    so ``grad_x = grad_y @ W`` with ``W`` the dequantized weight, rebuilt in the backward pass instead of
    kept (QLoRA-style: memory stays at the packed size). Activation quantization (W8A8, fp8, ZeroQuant)
    passes the gradient straight through."""

    @staticmethod
    def forward(ctx, x, kernel, module):
        ctx.module = module
        ctx.x_dtype = x.dtype
        return kernel.apply(x)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.module.dequantized_weight()
        grad_x = grad_y.to(torch.float32) @ w.to(device=grad_y.device)
        return grad_x.to(ctx.x_dtype), None, None


def build_kernels(model: nn.Module, device=None, dtype: torch.dtype | None = None, max_rows: int | None = None) -> int:
    """Prepare the kernels of every quantized module of ``model`` for every M bucket (up to ``max_rows``
    rows) on ``device`` / ``dtype`` (default: each module's own device and ``model``'s floating dtype),
    so that ``torch.compile`` traces them without choosing any. Returns the number of modules."""
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    n = 0
    for m in model.modules():
        if isinstance(m, KernelOwner):
            dev = device if device is not None else next(iter(m.buffers())).device
            m.build_kernels(dev, dtype, max_rows)
            n += 1
    return n
