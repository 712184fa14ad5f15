"""Checks every kernel backend and quantized module must pass, shared by the test modules.

- :func:`single_op_of`: a module's forward dispatches exactly one non-view op (the registered custom
  op of its kernel), recorded with a ``TorchDispatchMode`` (an op's own implementation is not seen);
- :func:`assert_compiles_fullgraph`: ``torch.compile(fullgraph=True)`` traces a model and gives what
  eager mode gives;
- :class:`BackendConformance` (dense kernels), :class:`GroupedConformance` (grouped expert kernels)
  and :class:`FormatConformance` (checkpoint formats): the checks each of them passes.
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


def random_qweight(k, n, bits, group_size, sym, act_order, scale_dtype=torch.float16, seed=0):
    """Random codes / zeros / scales of a valid scheme; act-order shuffles which columns share a group."""
    from quantkern.core import QuantizedWeight, WeightScheme

    gen = torch.Generator().manual_seed(seed)
    scheme = WeightScheme(bits, group_size, sym, act_order)
    g = scheme.num_groups(k)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.int32)
    zeros = (torch.full((g, n), 2 ** (bits - 1), dtype=torch.int32) if sym
             else torch.randint(0, 2 ** bits, (g, n), generator=gen, dtype=torch.int32))
    scales = ((torch.rand(g, n, generator=gen) + 0.5) * (2.0 / 2 ** bits) / k ** 0.5).to(scale_dtype)
    g_idx = torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return QuantizedWeight(codes, scales, zeros, g_idx, scheme)


class Skippable:
    """``available()`` says why the backend cannot run here (None: it can); ``_skip()`` skips then."""

    @classmethod
    def available(cls) -> str | None:
        return None

    def _skip(self):
        import pytest

        why = self.available()
        if why:
            pytest.skip(why)


class BackendConformance(Skippable):
    """The checks every GPTQ-layout kernel backend passes: subclass it as ``TestXxx`` with ``backend``
    (a :class:`~quantkern.kernels.Backend`) and, where the backend runs elsewhere or slower, ``device``,
    ``MS``, ``DTYPES`` or ``SCHEMES``; ``available()`` returns why the backend cannot run here (the
    tests then skip), or None.

    - the awkward-shape grid: M = 1, 2, 3, 17, 127, 128, 129; sizes that are not powers of two;
      2 / 3 / 4 / 8 bits, grouped / per-channel, sym / asym, act-order; fp16 and bf16 (fp32 where the
      backend takes it), with a bias, against the reference in fp32 with dtype-fitting tolerances;
    - the kernel is the backend asked for, and its forward is one registered custom op;
    - ``torch.compile(fullgraph=True)`` traces it and gives the eager result.
    """

    backend = None
    device = "cpu"
    MS = (1, 2, 3, 17, 127, 128, 129)
    DTYPES = (torch.float16, torch.bfloat16)
    # (bits, group_size, sym, act_order, K, N)
    SCHEMES = ((4, 32, False, False, 200, 72), (3, -1, True, True, 96, 160), (8, 64, True, False, 100, 44),
               (2, 16, False, True, 112, 48))
    OP: str | None = None  # the op name the forward dispatches, where the subclass pins it

    def layer(self, scheme, dtype, seed=0):
        from quantkern import QuantLinear

        bits, gs, sym, act, k, n = scheme
        qw = random_qweight(k, n, bits, gs, sym, act, scale_dtype=dtype, seed=seed)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
        return QuantLinear.from_quantized(qw, bias=bias, dtype=dtype, backend=self.backend).to(self.device)

    @staticmethod
    def tolerance(dtype) -> float:
        return {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]

    def test_awkward_shapes_match_the_reference(self):
        from quantkern.kernels.reference import gptq_gemm_reference

        self._skip()
        for si, scheme in enumerate(self.SCHEMES):
            for dtype in self.DTYPES:
                layer = self.layer(scheme, dtype, seed=si)
                k = scheme[4]
                for m in self.MS:
                    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(self.device)
                    y = layer(x)
                    assert layer.kernel_for(x).backend is self.backend, (scheme, dtype, m)
                    ref = gptq_gemm_reference(x.float(), layer.qweight, layer.qzeros, layer.scales.float(),
                                              layer.g_idx, layer.bits, layer.bias.float())
                    assert y.dtype == dtype and y.shape == ref.shape
                    err = float((y.float() - ref).norm() / ref.norm())
                    assert err < self.tolerance(dtype), f"{scheme} {dtype} M={m}: rel err {err:.2e}"

    def test_forward_is_one_custom_op(self):
        self._skip()
        layer = self.layer(self.SCHEMES[0], self.DTYPES[0])
        op = single_op_of(layer, torch.randn(3, self.SCHEMES[0][4]).to(self.DTYPES[0]).to(self.device))
        assert op.startswith("quantkern"), op
        if self.OP is not None:
            assert op == self.OP

    def test_compiles_fullgraph(self):
        self._skip()
        k = self.SCHEMES[0][4]
        model = torch.nn.Sequential(self.layer(self.SCHEMES[0], self.DTYPES[0]), torch.nn.GELU())
        dt = self.DTYPES[0]
        assert_compiles_fullgraph(model, [torch.randn(1, k).to(dt).to(self.device),
                                          torch.randn(2, 9, k).to(dt).to(self.device)])


def stacked_experts(num_experts, scheme, dtype, backend="auto", seed=0, bias=True):
    """A :class:`~quantkern.nn.quant_experts.StackedGPTQ` of random experts (``scheme``: ``(bits,
    group_size, sym, act_order, K, N)``), with a random bias, on ``backend``."""
    from quantkern.core import WeightScheme
    from quantkern.nn.quant_experts import StackedGPTQ

    bits, gs, sym, act, k, n = scheme
    proj = StackedGPTQ(num_experts, k, n, WeightScheme(bits, gs, sym, act), bias=bias, dtype=dtype)
    for e in range(num_experts):
        proj.set_expert(e, random_qweight(k, n, bits, gs, sym, act, scale_dtype=dtype, seed=seed * 1000 + e))
    if bias:
        with torch.no_grad():
            proj.bias.copy_(torch.randn(num_experts, n, generator=torch.Generator().manual_seed(seed)) * 0.1)
    proj.backend = backend
    return proj


def routing_cases(t, num_experts, seed=0):
    """``{name: top_k_index [t, k]}``: random top-2 and top-1, top-k = all experts (8 where there are
    8), every token to expert 0 (top-1), an expert that gets no token, and the "no expert" index -1."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(t)])  # noqa: E731
    cases = {"top2": rand(2), "top1": rand(1), f"top{num_experts}": rand(num_experts),
             "all_to_one": torch.zeros(t, 1, dtype=torch.long)}
    starved = rand(2)
    starved[starved == 1] = 0  # expert 1 gets nothing (duplicates within a token are fine for a kernel)
    cases["one_starved"] = starved
    masked = rand(2)
    masked[::3, 1] = -1
    cases["no_expert_index"] = masked
    return cases


def expert_weights(proj):
    """Every expert's dequantized weight ``[K, N]`` and bias (or 0) in fp32 on the CPU: the oracle's
    operands, computed once per module (the module stays where it is)."""
    return [(proj.dequantize(e, torch.float32).cpu(), proj.bias[e].float().cpu() if proj.bias is not None else 0)
            for e in range(proj.num_experts)]


def grouped_oracle(proj, x, rows, offsets, weights=None):
    """Pair by pair: ``x[rows[p]] @ dequant(W[e]) + bias[e]`` in fp32 (zero beyond ``offsets[E]``), on
    the CPU. ``weights``: :func:`expert_weights` of ``proj``, where the caller keeps them."""
    weights = weights or expert_weights(proj)
    x, offsets = x.cpu(), offsets.cpu()
    rows = rows.cpu() if rows is not None else None
    p_all = rows.numel() if rows is not None else x.shape[0]
    out = torch.zeros(p_all, proj.out_features)
    off = offsets.tolist()
    for e, (w, b) in enumerate(weights):
        if off[e] == off[e + 1]:
            continue
        r = torch.arange(off[e], off[e + 1])
        xe = x[rows[r]] if rows is not None else x[r]
        out[r] = xe.float() @ w + b
    return out


class GroupedConformance(Skippable):
    """The checks every grouped expert kernel (layout ``"gptq_experts"``, :mod:`quantkern.kernels.moe`)
    passes: subclass it as ``TestXxx`` with ``backend`` and, where the backend runs elsewhere or
    slower, ``device``, ``TS``, ``DTYPES``, ``SCHEMES`` or ``NUM_EXPERTS``; ``available()`` returns why
    the backend cannot run here (the tests then skip), or None.

    - the awkward-shape grid: T = 1, 2, 3, 17, 127, 128, 129 tokens; sizes that are not powers of two;
      2 / 3 / 4 / 8 bits, grouped / per-channel, sym / asym, act-order; fp16 and bf16; routings from
      :func:`routing_cases` (top-1, top-2, top-8, all tokens to one expert, an expert with no token,
      the "no expert" index), the gathered call (gate/up) and the pair-ordered one (down), against a
      pair-by-pair fp32 oracle with dtype-fitting tolerances;
    - the kernel is the backend asked for, and a call is one registered custom op;
    - ``torch.compile(fullgraph=True)`` traces a call and gives the eager result.
    """

    backend = None
    device = "cpu"
    TS = (1, 2, 3, 17, 127, 128, 129)
    DTYPES = (torch.float16, torch.bfloat16)
    NUM_EXPERTS = 8
    # (bits, group_size, sym, act_order, K, N)
    SCHEMES = ((4, 32, False, False, 96, 72), (3, -1, True, True, 64, 96), (8, 48, True, False, 100, 44),
               (2, 16, False, True, 80, 48))
    OP: str | None = None
    tolerance = staticmethod(BackendConformance.tolerance)

    def test_awkward_shapes_and_routings_match_the_oracle(self):
        from quantkern.kernels.moe import route

        self._skip()
        for si, scheme in enumerate(self.SCHEMES):
            for dtype in self.DTYPES:
                proj = stacked_experts(self.NUM_EXPERTS, scheme, dtype, self.backend, seed=si).to(self.device)
                weights = expert_weights(proj)  # once: moving the module would drop its prepared kernels
                k = scheme[4]
                for t in self.TS:
                    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)).to(dtype).to(self.device)
                    for case, idx in routing_cases(t, self.NUM_EXPERTS, seed=t).items():
                        r = route(idx.to(self.device), self.NUM_EXPERTS)
                        xp = x[r.rows]  # the pair-ordered input of a down projection
                        for rows, inp in ((r.rows, x), (None, xp)):
                            y = proj.grouped(inp, rows, r.offsets)
                            assert proj.kernel_for(inp).backend is self.backend, (scheme, dtype, t, case)
                            want = grouped_oracle(proj, inp, rows, r.offsets, weights)
                            assert y.dtype == dtype and tuple(y.shape) == tuple(want.shape), (case, y.shape)
                            y = y.float().cpu()
                            n_valid = int(r.offsets[-1])
                            assert torch.equal(y[n_valid:], torch.zeros_like(y[n_valid:])), case
                            scale = max(float(want.norm()), 1e-6)
                            err = float((y - want).norm()) / scale
                            assert err < self.tolerance(dtype), f"{scheme} {dtype} T={t} {case}: rel err {err:.2e}"

    def _call(self):
        from quantkern.kernels.moe import route

        scheme = self.SCHEMES[0]
        proj = stacked_experts(self.NUM_EXPERTS, scheme, self.DTYPES[0], self.backend).to(self.device)
        x = torch.randn(5, scheme[4]).to(self.DTYPES[0]).to(self.device)
        r = route(routing_cases(5, self.NUM_EXPERTS)["top2"].to(self.device), self.NUM_EXPERTS)
        return proj, x, r

    def test_call_is_one_custom_op(self):
        self._skip()
        proj, x, r = self._call()
        proj.grouped(x, r.rows, r.offsets)  # choose and prepare outside the recording
        with OpLog() as log:
            proj.grouped(x, r.rows, r.offsets)
        ops = log.compute_ops()
        assert len(ops) == 1 and ops[0].startswith("quantkern"), ops
        if self.OP is not None:
            assert ops[0] == self.OP

    def test_compiles_fullgraph(self):
        self._skip()
        proj, x, r = self._call()
        want = proj.grouped(x, r.rows, r.offsets)
        torch._dynamo.reset()
        fn = torch.compile(lambda a, rows, off: proj.grouped(a, rows, off), fullgraph=True, backend="aot_eager",
                           dynamic=False)
        torch.testing.assert_close(fn(x, r.rows, r.offsets), want, rtol=0, atol=0)


class FormatConformance:
    """The checks every integer checkpoint format passes: subclass it as ``TestXxxFormat`` with
    ``format`` and the schemes it stores (``STORABLE``: ``(bits, group_size, sym, actorder,
    static_groups)``), refuses (``REFUSED``: scheme -> a substring of the reason) and stores re-quantized
    (``REQUANTIZED``: scheme -> the tensor type ``inspect`` reports for every quantized layer). How a
    file is read back is the format's: :meth:`read_back` (the weights), :meth:`logits_back` (a forward),
    :meth:`quantized_bytes`; the defaults are :func:`quantkern.load_quantized` and ``inspect``.

    - every storable scheme saves from a tiny Llama, ``inspect`` finds it consistent, with nothing
      re-quantized (and the bytes :func:`quantkern.formats.sizes.stored_bytes` predicts, for the
      formats it sizes), and it reads back bit-identically: every quantized layer's dequantized weight
      (:meth:`assert_same_weight`), the same forward (to :meth:`logits_tolerance`, 0 by default);
    - every refused scheme raises ``ValueError`` naming the reason, and nothing is written;
    - every re-quantized scheme saves, and ``inspect`` names every quantized layer as re-quantized.
    """

    format: str = ""
    STORABLE: tuple = ()
    REFUSED: dict = {}
    REQUANTIZED: dict = {}

    @staticmethod
    def quantize(model, scheme):
        import quantkern as qk

        bits, gs, sym, actorder, static = scheme
        if actorder:
            g = torch.Generator().manual_seed(1)
            data = [torch.randint(0, 256, (32,), generator=g) for _ in range(4)]
            qk.GPTQQuantizer(model, bits=bits, group_size=gs, sym=sym, actorder=True, static_groups=static,
                             verbose=False).quantize(data)
        else:
            qk.RTNQuantizer(model, bits=bits, group_size=gs, sym=sym, verbose=False).quantize()
        return model

    @staticmethod
    def quantized_layers(model) -> dict:
        import quantkern as qk

        return {n: m for n, m in model.named_modules() if isinstance(m, qk.QuantLinear)}

    # -- how the format reads its file back (the defaults: quantkern's own loader) -----------------
    def read_back(self, path, model) -> dict:
        """``{layer name: dequantized weight [out, in] fp32}`` of ``model``'s quantized layers, as the
        file at ``path`` gives them back."""
        import quantkern as qk

        back = qk.load_quantized(path, backend="reference")
        return {n: back.get_submodule(n).to_quantized().dequantize(torch.float32) for n in self.quantized_layers(model)}

    def logits_back(self, path, x):
        """The logits of ``x`` from the model the file at ``path`` loads as."""
        import quantkern as qk

        with torch.no_grad():
            return qk.load_quantized(path, backend="reference")(x).logits

    def quantized_bytes(self, path, info) -> int:
        """The bytes the file stores for its quantized layers (``info``: its inspection)."""
        return info["quantized_bytes"]

    def assert_same_weight(self, scheme, name, layer, weight):
        """``weight`` (read back) is ``layer``'s dequantized weight, bit for bit."""
        assert torch.equal(layer.to_quantized().dequantize(torch.float32), weight), (scheme, name)

    def logits_tolerance(self, scheme) -> float:
        """rtol = atol of the forward read back against the quantized model's (reference backend)."""
        return 0.0

    # -- the checks --------------------------------------------------------------------------------
    def test_storable_schemes_round_trip_bit_identically(self, tiny_llama, tmp_path):
        import copy

        import quantkern as qk
        from quantkern.formats.sizes import STORED_BYTES_FORMATS, stored_bytes
        from quantkern.io.inspect import inspect_checkpoint

        x = torch.randint(0, 256, (1, 12))
        for i, scheme in enumerate(self.STORABLE):
            model = self.quantize(copy.deepcopy(tiny_llama), scheme)
            path = qk.save_quantized(model, tmp_path / f"ck{i}", format=self.format)
            info = inspect_checkpoint(path)
            assert info["consistent"], (scheme, info["problems"])
            assert not info.get("requantized"), (scheme, info["requantized"])
            layers = self.quantized_layers(model)
            if self.format in STORED_BYTES_FORMATS:
                want = sum(stored_bytes(self.format, m.scheme, m.in_features, m.out_features) for m in layers.values())
                assert self.quantized_bytes(path, info) == want, scheme
            back = self.read_back(path, model)
            assert set(back) == set(layers), scheme
            for name, m in layers.items():
                self.assert_same_weight(scheme, name, m, back[name])
            model.apply(lambda mod: setattr(mod, "backend", "reference") if isinstance(mod, qk.QuantLinear) else None)
            with torch.no_grad():
                ref = model(x).logits
            tol = self.logits_tolerance(scheme)
            torch.testing.assert_close(self.logits_back(path, x), ref, rtol=tol, atol=tol,
                                       msg=lambda why: f"{scheme}: {why}")

    def test_refused_schemes_write_nothing(self, tiny_llama, tmp_path):
        import copy

        import pytest

        import quantkern as qk

        for i, (scheme, reason) in enumerate(self.REFUSED.items()):
            model = self.quantize(copy.deepcopy(tiny_llama), scheme)
            with pytest.raises(ValueError, match=reason):
                qk.save_quantized(model, tmp_path / f"ck{i}", format=self.format)
            assert not (tmp_path / f"ck{i}").exists()

    def test_requantized_schemes_are_reported(self, tiny_llama, tmp_path):
        import copy

        import quantkern as qk
        from quantkern.io.inspect import inspect_checkpoint

        for i, (scheme, stored_as) in enumerate(self.REQUANTIZED.items()):
            model = self.quantize(copy.deepcopy(tiny_llama), scheme)
            info = inspect_checkpoint(qk.save_quantized(model, tmp_path / f"ck{i}", format=self.format))
            assert info["consistent"], (scheme, info["problems"])
            layers = self.quantized_layers(model)
            assert sorted(info["requantized"]) == sorted(layers), scheme
            assert info["tensor_types"].get(stored_as) == len(layers), (scheme, info["tensor_types"])


def family_module(kind: str, backend: str):
    """A W8A8 / fp8 / fp4 / ZeroQuant layer of the family on ``backend``, from a random Linear."""
    from quantkern import FP4Linear, FP8Linear, W8A8Linear
    from quantkern.algorithms.fp4 import quantize_fp4_groups
    from quantkern.nn.w8a8_linear import ZeroQuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    if kind == "w8a8":
        mod = W8A8Linear.from_linear(lin)
    elif kind == "w8a8-static":
        mod = W8A8Linear.from_linear(lin, input_scale=0.02)
    elif kind.startswith("fp8"):
        act = kind.split("-")[1]
        mod = FP8Linear.from_linear(lin, act=act, input_scale=0.01 if act == "static" else None)
    elif kind == "fp4":
        codes, scales = quantize_fp4_groups(lin.weight.detach(), 32)
        mod = FP4Linear.from_codes(codes, scales, 32, bias=lin.bias)
    else:
        mod = ZeroQuantLinear.from_linear(lin, w_bits=4, group_size=32, w_has_zero=True, a_bits=8)
    mod.backend = backend
    return mod
