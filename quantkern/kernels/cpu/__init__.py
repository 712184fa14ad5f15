"""C++ CPU kernels: build / JIT loader (:mod:`.build`), private layout (:mod:`.layout`), ops
(:mod:`.ops`) and the ``Backend.CPU`` kernel (:mod:`.backend`). Importing this package registers the
backend; it never builds anything."""

from . import backend  # noqa: F401  (registers Backend.CPU)
