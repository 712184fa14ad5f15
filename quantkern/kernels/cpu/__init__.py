"""C++ CPU kernels: build / JIT loader (:mod:`.build`), private layout (:mod:`.layout`), ops
(:mod:`.ops`), the ``Backend.CPU`` kernel (:mod:`.backend`) and its grouped expert kernel
(:mod:`.moe`). Importing this package registers both; it never builds anything."""

from . import backend, moe  # registering Backend.CPU for the "gptq" and "gptq_experts" layouts

__all__ = ["backend", "moe"]
