"""CUDA backend (csrc/cuda): tensor-core W4A16 / W8A16 GEMM and a 2..8-bit GEMV for decode.

Importing this package registers :class:`~.backend.CudaKernel`; it never builds or loads the
extension (that happens in ``can_implement`` / the kernel constructor, see :mod:`.build`).
"""

from .backend import CudaKernel
from .build import extension_status, load_extension, require_extension

__all__ = ["CudaKernel", "extension_status", "load_extension", "require_extension"]
