"""The Triton fused-MoE grouped kernel (issue #15): the grouped conformance grid, the stacked layout, the
launch's block -> expert map at small tiles, the op, and a quantized Qwen3-MoE against the reference.

As in test_triton_kernels.py: without CUDA the kernel runs on Triton's interpreter, so
``TRITON_INTERPRET=1`` is set while ``quantkern.triton_kernels`` is first imported and, through an
autouse fixture, during each test of this module only; if triton was imported earlier without it, the
interpreted tests skip with that reason. Under the interpreter the grid is reduced (T = 1, 17, 129;
4 experts; K <= 64); on CUDA the conformance grid is the full one (marked ``gpu``).
"""

import os
import subprocess
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
_saved_env = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton (and the kernels) are imported
pytest.importorskip("triton")
import quantkern.triton_kernels as tk  # noqa: E402

if _saved_env is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved_env

from conformance import GroupedConformance, grouped_oracle, routing_cases, stacked_experts  # noqa: E402
from quantkern.kernels import Backend  # noqa: E402
from quantkern.kernels.moe import route  # noqa: E402
from quantkern.kernels.registry import kernel_query  # noqa: E402
from quantkern.kernels.triton_backend import TritonGroupedKernel  # noqa: E402
from quantkern.triton_kernels.moe_wna16 import moe_grid_m  # noqa: E402

INTERPRETED = tk.kernels_interpreted()
DEVICE = "cuda" if _CUDA else "cpu"
runnable = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="kernels were not built for the "
                              "interpreter (triton_kernels imported before TRITON_INTERPRET=1)")
# the smallest tiles (BLOCK_M 16): several row blocks an expert and several tail blocks at small T
SMALL_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


class TestGroupedTriton(GroupedConformance):
    """The grouped conformance grid on the Triton kernel (the interpreter here, the GPU where there is one)."""

    backend = Backend.TRITON
    device = DEVICE
    OP = "quantkern::moe_wna16_triton"
    if not _CUDA:  # the interpreter's cost is per program and K tile: fewer experts and tokens, shorter K
        TS = (1, 17, 129)  # (tiny T = 2 and BLOCK_M 16: test_small_tiles_many_blocks_an_expert_and_a_long_tail)
        NUM_EXPERTS = 4
        # each scheme keeps its group mode (BLOCK_K 32 / 64 / 16 / 16) and a ragged last group or K tile
        SCHEMES = ((4, 32, False, False, 48, 40), (3, -1, True, True, 64, 96), (8, 48, True, False, 52, 44),
                   (2, 16, False, True, 48, 48))
    pytestmark = [pytest.mark.gpu] if _CUDA else []

    @classmethod
    def available(cls):
        if cls.device == "cpu" and not INTERPRETED:
            return "kernels were not built for the interpreter"
        return None


def _check(y, want, offsets, dtype):
    n_valid = int(offsets[-1])
    y = y.float().cpu()
    assert torch.equal(y[n_valid:], torch.zeros_like(y[n_valid:]))
    err = float((y - want).norm()) / max(float(want.norm()), 1e-6)
    assert err < GroupedConformance.tolerance(dtype), f"rel err {err:.2e}"


G32, ACTORDER = (4, 32, False, False, 64, 40), (4, 16, True, True, 48, 40)


@runnable
@pytest.mark.parametrize("t,case,scheme", [(129, "all_to_one", ACTORDER), (40, "top4", G32), (37, "no_expert_index", G32),
                                           (2, "one_starved", ACTORDER)])
def test_small_tiles_many_blocks_an_expert_and_a_long_tail(t, case, scheme):
    """BLOCK_M 16 pinned: an expert spans up to 9 row blocks, the "no expert" tail several blocks (each
    written zero), empty experts own none; both call forms, with and without act-order."""
    e = 4
    proj = stacked_experts(e, scheme, torch.float16, Backend.TRITON, seed=3).to(DEVICE)
    kern = proj.kernel_for(torch.empty(t, scheme[4], dtype=torch.float16, device=DEVICE))
    x = torch.randn(t, scheme[4], generator=torch.Generator().manual_seed(t)).half()
    idx = routing_cases(t, e, seed=t)[case]
    if case == "no_expert_index":
        idx[: t // 2] = -1  # about half the pairs in the tail
    r = route(idx, e)
    dense = [(proj.dequantize(i, torch.float32).cpu(), proj.bias[i].float().cpu()) for i in range(e)]
    for rows, inp in ((r.rows, x), (None, x[r.rows])):
        y = tk.moe_wna16_matmul(inp.to(DEVICE), None if rows is None else rows.to(DEVICE), r.offsets.to(DEVICE),
                                kern.weight, kern.bias, config=SMALL_CFG)
        _check(y, grouped_oracle(proj, inp, rows, r.offsets, dense), r.offsets, torch.float16)


def test_grid_bound_covers_every_block():
    """The grid's M slots cover every expert's row blocks plus the tail's, for random routings and the worst
    case (every active expert one pair past a multiple of BLOCK_M)."""
    gen = torch.Generator().manual_seed(0)
    for p, e, bm in ((8, 128, 16), (2048, 128, 64), (1, 1, 16), (200, 3, 16), (17, 8, 128), (1000, 7, 32)):
        splits = []
        for _ in range(50):
            valid = int(torch.randint(0, p + 1, (1,), generator=gen))
            splits.append(torch.bincount(torch.randint(0, e, (valid,), generator=gen), minlength=e))
        worst = torch.zeros(e, dtype=torch.long)
        for i in range(min(e, p)):
            worst[i] = 1
        left = p - int(worst.sum())
        worst[: min(e, p)] += (left // (bm * min(e, p))) * bm  # k * BLOCK_M + 1 pairs each
        splits.append(worst)
        for counts in splits:
            tail = p - int(counts.sum())
            need = int(((counts + bm - 1) // bm).sum()) + -(-tail // bm)
            assert need <= moe_grid_m(p, e, bm), (p, e, bm, counts.tolist())


# ---------------------------------------------------------------- layout (pure torch)
def test_stacked_layout_shares_gptq_words_and_sorts_act_order_per_expert():
    plain = stacked_experts(3, (4, 32, True, False, 64, 40), torch.float16)
    w = tk.experts_from_gptq(plain.qweight, plain.qzeros, plain.scales, plain.g_idx, 4, 64, 32)
    assert w.qweight is plain.qweight and w.scales.data_ptr() == plain.scales.data_ptr()  # no copy
    assert w.perm is None and w.group_size == 32 and w.zero_point == 8 and w.zeros.numel() == 0
    act = stacked_experts(3, (3, 16, False, True, 48, 40), torch.float16)
    w = tk.experts_from_gptq(act.qweight, act.qzeros, act.scales, act.g_idx, 3, 48, 16)
    assert w.perm.dtype == torch.int32 and tuple(w.perm.shape) == (3, 48) and w.zero_point == -1
    assert tuple(w.zeros.shape) == (3, 3, 40) and w.group_size == 16  # sorted act-order groups are regular
    for e in range(3):
        torch.testing.assert_close(w.expert(e).dequantize(), act.dequantize(e, torch.float32), rtol=0, atol=0)


# ---------------------------------------------------------------- the op and the backend
def _op_args(p_rows=True):
    proj = stacked_experts(4, (4, 32, False, True, 64, 40), torch.float16, Backend.TRITON)
    w = tk.experts_from_gptq(proj.qweight, proj.qzeros, proj.scales, proj.g_idx, 4, 64, 32)
    r = route(routing_cases(5, 4)["no_expert_index"], 4)
    x = torch.randn(5, 64).half()
    return [x if p_rows else x[r.rows], r.rows if p_rows else None, r.offsets, w.qweight, w.scales, w.zeros, w.g_idx,
            w.perm, proj.bias, w.bits, w.group_size, w.zero_point]


@runnable
@pytest.mark.parametrize("p_rows", [True, False], ids=["gathered", "pair_ordered"])
def test_opcheck(p_rows):
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in _op_args(p_rows)]
    torch.library.opcheck(tk.moe_wna16_triton, tuple(args))


@pytest.mark.parametrize("index,value,match", [
    (1, torch.zeros(3, 2, dtype=torch.long), "rows must be a contiguous 1-D"),
    (2, torch.zeros(4, dtype=torch.long), r"offsets must be int64 \[5\]"),
    (2, torch.zeros(5, dtype=torch.int32), r"offsets must be int64 \[5\]"),
    (3, torch.zeros(8, 40, dtype=torch.int32), r"qweight must be int32 \[E, R, N\]"),
    (4, torch.ones(3, 2, 40).half(), "scales must be 3-D with 4 experts"),
    (7, torch.zeros(4, 64, dtype=torch.int64), r"perm must be int32 \[4, 64\]"),
    (8, torch.zeros(4, 41).half(), r"bias must be float \[40\]"),
    (0, torch.randn(5, 64), "float16 or bfloat16"),
])
def test_bad_inputs_raise_early(index, value, match):
    args = _op_args()
    args[index] = value
    with pytest.raises(ValueError, match=match):
        tk.moe_wna16(*args)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    proj = stacked_experts(2, (4, 32, True, False, 64, 40), torch.float16)
    ok, reason = TritonGroupedKernel.can_implement(*kernel_query(proj, torch.randn(2, 64).half()))
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.moe_wna16(*_op_args())


@runnable
def test_auto_picks_triton_for_fp16_and_another_backend_for_fp32():
    """Triton takes fp16 / bf16 only: fp32 goes to the next grouped kernel that fits (the C++ one on a
    CPU tensor where it builds, else the reference)."""
    proj = stacked_experts(2, (4, 32, True, False, 64, 40), torch.float16).to(DEVICE)
    assert proj.kernel_for(torch.empty(3, 64, dtype=torch.float16, device=DEVICE)).backend is Backend.TRITON
    from quantkern.kernels.cpu.moe import CpuGroupedKernel

    x32 = torch.empty(3, 64, device=DEVICE)
    cpu_ok = CpuGroupedKernel.can_implement(*kernel_query(proj, x32))[0]
    assert proj.kernel_for(x32).backend is (Backend.CPU if cpu_ok else Backend.REFERENCE)


# ---------------------------------------------------------------- a quantized MoE model
@runnable
def test_qwen3_moe_triton_experts_match_the_reference():
    """RTN W4 g32 Qwen3-MoE in fp16: the experts on Triton against the same experts on the reference,
    per module on a routing with a starved expert and through the whole model."""
    import copy

    import quantkern as qk
    from api.test_moe import ids, tiny_moe
    from quantkern.nn.quant_experts import QuantExperts

    model = tiny_moe()
    qk.RTNQuantizer(model, bits=4, group_size=32, verbose=False).quantize()
    model = model.half().to(DEVICE)
    for m in model.modules():
        if isinstance(m, qk.QuantLinear):
            m.backend = "reference"
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert experts
    ref = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, QuantExperts):
            m.backend = "triton"
    for m in ref.modules():
        if isinstance(m, QuantExperts):
            m.backend = "reference"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 64, generator=gen).half().to(DEVICE)
    idx = torch.tensor([[0, 1]] * 5 + [[1, 3]] * 5, device=DEVICE)  # expert 2 gets no token
    w = torch.rand(10, 2, generator=gen).half().to(DEVICE)
    qexp, rexp = model.model.layers[0].mlp.experts, ref.model.layers[0].mlp.experts
    with torch.no_grad():
        got, want = qexp(x, idx, w), rexp(x, idx, w)
        assert qexp.gate_up_proj.kernel_for(x).backend is Backend.TRITON
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
        inp = ids(n=1, L=12).to(DEVICE)
        got, want = model(inp).logits.float(), ref(inp).logits.float()
    assert float((got - want).norm() / want.norm()) < 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ---------------------------------------------------------------- GPU targets without a GPU
_AOT_SCRIPT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from quantkern.triton_kernels._checks import group_mode
from quantkern.triton_kernels._tuning import MOE_CONFIGS
from quantkern.triton_kernels.aot import compile_ahead
from quantkern.triton_kernels.moe_wna16 import _moe_wna16_kernel

arch = int(sys.argv[1])
smem_limit = {80: 166912, 90: 232448}[arch]
variants = [(4, 128, -1, "fp16", True, False), (3, 64, 4, "bf16", False, True), (2, 32, -1, "fp16", True, True),
            (8, -1, 128, "bf16", True, False), (4, 0, -1, "fp16", False, False)]
bad = []
for cfg in MOE_CONFIGS:
    for bits, gs, zp, dt, has_rows, has_perm in variants:
        bk = min(cfg["BLOCK_K"], gs) if gs > 0 else cfg["BLOCK_K"]
        mode = group_mode(gs, bk)
        const = dict(BITS=bits, GROUP_MODE=mode, GROUP_SIZE=gs if mode == 1 else 1, ZERO_POINT=zp, HAS_ROWS=has_rows,
                     HAS_PERM=has_perm, HAS_BIAS=True, DOT_FP32=False, BLOCK_E=128, BLOCK_M=cfg["BLOCK_M"],
                     BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk)
        try:
            k = compile_ahead(_moe_wna16_kernel, const, dt, arch, cfg["num_warps"], cfg["num_stages"],
                              unaligned=("M", "E"))
        except Exception as e:
            bad.append(f"{cfg} W{bits} g{gs} {dt}: {type(e).__name__} {str(e)[-300:]}")
            continue
        if (bits, gs, dt) == (4, 128, "fp16") and k.metadata.shared > smem_limit:
            bad.append(f"{cfg}: {k.metadata.shared} B shared memory > {smem_limit}")
print("\n".join(bad) or "all compiled")
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_moe_config_compiles_for_gpu_targets(arch):
    """Every autotune config of the MoE kernel compiles for sm_80 / sm_90 (Triton's AOT path, bundled
    ptxas, no GPU), in a fresh process (this one holds the interpreted kernels)."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
