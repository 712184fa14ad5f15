"""Kernel backends, their selection, op schemas and the pure-PyTorch references.

Importing this package registers every backend. Backend modules import their optional toolchains
(triton, the compiled extension) lazily, inside ``can_implement`` / ``__init__``, so that this import
never fails for a missing optional dependency.
"""

from . import reference_backend  # noqa: F401  (registers the reference backend)
from . import triton_backend  # noqa: F401  (registers Backend.TRITON; imports triton lazily)
from . import cpu  # noqa: F401  (registers Backend.CPU; builds nothing until used)
from . import cuda  # noqa: F401  (registers Backend.CUDA; loads the extension lazily)
from . import torch_native  # noqa: F401  (the W8A8 / fp8 / fp4 / ZeroQuant layouts' kernels)
from . import moe  # noqa: F401  (the grouped expert kernels' reference)
from .reference import dequantize_gptq, gptq_gemm_reference
from .registry import (Backend, NoKernelError, QuantKernel, check_same_device, register_kernel, registered_kernels,
                       select_kernel)

__all__ = [
    "Backend", "NoKernelError", "QuantKernel", "check_same_device", "register_kernel", "registered_kernels", "select_kernel",
    "dequantize_gptq", "gptq_gemm_reference",
]
