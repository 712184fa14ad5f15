"""Checks every kernel backend and quantized module must pass, shared by the test modules.

- :func:`single_op_of`: a module's forward dispatches exactly one non-view op (the registered custom
  op of its kernel), recorded with a ``TorchDispatchMode`` (an op's own implementation is not seen);
- :func:`assert_compiles_fullgraph`: ``torch.compile(fullgraph=True)`` traces a model and gives what
  eager mode gives.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "alias", "t", "transpose", "contiguous"}


class OpLog(TorchDispatchMode):
    """Records the top-level ops a forward dispatches (an op's own implementation is not recorded)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.namespace}::{func._opname}")
        return func(*args, **(kwargs or {}))

    def compute_ops(self) -> list[str]:
        return [o for o in self.ops if o.split("::")[1] not in VIEW_OPS]


def single_op_of(module, x) -> str:
    """The one non-view op ``module(x)`` dispatches (asserted), e.g. ``quantkern::gptq_gemm_ref``."""
    module(x)  # choose and prepare the kernel outside the recording
    with OpLog() as log:
        module(x)
    ops = log.compute_ops()
    assert len(ops) == 1, f"{type(module).__name__}'s forward dispatches {ops}, not one custom op"
    return ops[0]


def assert_compiles_fullgraph(model, xs):
    """``torch.compile(fullgraph=True)`` traces ``model`` for every input of ``xs`` (after one eager call
    each) and gives what eager mode gives."""
    torch._dynamo.reset()
    want = [model(x) for x in xs]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for x, w in zip(xs, want):
        torch.testing.assert_close(compiled(x), w, rtol=0, atol=0)
