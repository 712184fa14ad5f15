"""Registers, spills, shared memory and main-loop instructions per weight of every GPU kernel, from SASS.

No GPU needed: every CUDA kernel variant of ``csrc/cuda`` (each template instantiation: activation
dtype x bits x M tile for the GEMM, dtype x bits for the GEMV, the split-K reduction) is compiled with
nvcc to a cubin, and every config of the Triton autotune lists (``GEMM_CONFIGS``, ``GEMV_CONFIGS`` of
``quantkern/triton_kernels/_tuning.py``, for the main case W4 g128 asymmetric fp16, BLOCK_K shrunk as
the autotuner's ``prune`` does) is compiled by Triton's AOT path, for sm_80 and sm_90. Then, per kernel:

- ``regs``, ``stack_bytes``, ``smem_static``: ``cuobjdump -res-usage`` of the cubin;
  ``smem_dynamic``: the launch's dynamic shared memory (Triton: ``metadata.shared``; the CUDA GEMM:
  ``GemmSmem<MT, BITS>::kTotal`` of gemm_wna16.cu, recomputed by :func:`gemm_smem`);
- ``spill_stores`` / ``spill_loads``: STL / LDL instructions in the SASS (local memory traffic: register
  spills, or a local array the compiler could not keep in registers; either is a regression here);
- ``loop_instr``: the static instruction count of the main loop. Method: ``cuobjdump -sass`` lists
  each instruction with its address; every branch whose target is at or before its own address closes a
  loop ``[target, branch]``. The main loop is the innermost loop that holds at least half of the
  kernel's math instructions (HMMA / HGMMA tensor-core ops, else FFMA / FMUL / FADD / HFMA2 / ...): for
  the GEMMs that is the K loop around the mma instructions, not the small cp.async copy loops nested
  in it. ``loop_instr`` counts every instruction between the loop's first instruction and its backward
  branch (NOPs excluded; never-true ``@!PT`` fillers included, they issue), each once: nested loops
  (the GEMM's copy loops, one or two trips a thread) and rarely taken paths (the GEMV's group change
  inside a chunk) are counted once, and so are the rows m < 8 the GEMV unrolls but skips at M = 1, so
  the figure is a static size of one iteration, not a profile.
- ``unroll``: how many source iterations one pass of that loop executes (the compiler may unroll):
  CUDA GEMM = HMMA count / (16 * MT), CUDA GEMV = FFMA count / 256 (32 codes x 8 rows an iteration);
  Triton loops are taken as 1 (Triton does not unroll its K loop).
- ``weights_per_thread``: weights one thread processes per pass = unroll x weights the CTA (program)
  covers per source iteration / its threads. CUDA GEMM: 64 x 128 / 128 = 64; CUDA GEMV: a warp takes a
  32 x 32 chunk, 32 per lane; Triton: BLOCK_K x BLOCK_N / (32 * num_warps).
- ``instr_per_weight`` = loop_instr / weights_per_thread: the thread-level issue cost of a weight
  (Marlin's W4 loop is about 1.5). ``warp_instr_per_512B`` = the same per 512 bytes of packed weights
  (loop_instr x 512 / (weights_per_thread x 32 lanes x bits / 8)): with the GPU's warp issue rate
  (SMs x 4 schedulers x clock) it bounds the weight bandwidth an instruction-bound kernel can reach
  (``hbm_ceiling_pct``: for an H200, 132 SMs x 4 x 1.98 GHz against 4.8 TB/s).

Writes ``benchmarks/results/sass_report.csv`` and ``sass_report.txt`` (a summary). The recorded CSV
is the baseline of ``tests/benchmarks/test_sass_report.py``: the suite fails when a kernel recorded spill-free
spills (one recorded with spills may not spill more), or when its ``instr_per_weight`` grows more than
5% over the recorded value (regenerate and commit the report when a kernel improves).

    python benchmarks/sass_report.py                      # everything (a few minutes on 2 cores)
    python benchmarks/sass_report.py --arch 90 --filter 'gemm_wna16.*half.*W4' --out /tmp/r
    python benchmarks/sass_report.py --no-triton          # CUDA kernels only (seconds)

Needs nvcc (``CUDA_HOME`` / ``PATH``) for the CUDA kernels and triton (with its bundled ``cuobjdump``
and ``ptxas``) for the Triton ones and for the disassembly.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CUDA_DIR = ROOT / "csrc" / "cuda"
RESULTS = ROOT / "benchmarks" / "results"
ARCHS = (80, 90)
CUDA_FILES = ("gemm_wna16.cu", "gemv_wna16.cu")
# what torch's extension build passes (quantkern/kernels/cuda/build.py adds -O3 -lineinfo)
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
TC_MATH = ("HMMA", "HGMMA", "IMMA", "IGMMA")
MATH = ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FFMA2", "FMUL2", "FADD2", "DFMA")
# the breakdown columns: floating-point arithmetic and conversions, memory instructions
FP = MATH + ("HSUB2", "HFMA2.MMA", "F2F", "F2FP", "I2F", "I2FP", "F2I", "HMNMX2", "FMNMX", "FSETP", "HSETP2")
MEM = ("LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "LDL", "STL", "LDC", "ATOM", "RED", "UTMALDG", "LDGDEPBAR")
H200 = dict(sms=132, clock_ghz=1.98, tbps=4.8)
TRITON_CASE = dict(bits=4, group_size=128, zero_point=-1, dtype="fp16")  # W4 g128 asym fp16
FIELDS = ["kind", "kernel", "variant", "arch", "regs", "stack_bytes", "spill_stores", "spill_loads", "smem_static",
          "smem_dynamic", "loops", "loop_instr", "loop_mma", "loop_fp", "loop_mem", "unroll", "weights_per_thread", "instr_per_weight",
          "warp_instr_per_512B", "hbm_ceiling_pct", "bits", "tool"]

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


# --- tools --------------------------------------------------------------------------------------------
def triton_bin(tool: str) -> str | None:
    """A tool bundled with triton (cuobjdump, nvdisasm, ptxas), else one on PATH, else None."""
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which(tool)


def find_nvcc() -> str | None:
    from quantkern.kernels.cuda.build import find_nvcc as f

    return f()


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    m = re.search(r"release ([\d.]+), V([\d.]+)", "\n".join(out))
    return m.group(2) if m else (out[-1] if out else "?")


# --- SASS parsing ---------------------------------------------------------------------------------------
def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """``cuobjdump -sass`` text -> {mangled function name: [(address, instruction text)]}."""
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        if "Function :" in line:
            cur = funcs.setdefault(line.split("Function :", 1)[1].strip(), [])
            continue
        m = _INSN.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def opcode(insn: str) -> str:
    """The opcode of an instruction text (predicate stripped): ``@!P0 BRA 0x120`` -> ``BRA``."""
    parts = insn.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def loops(insns: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """``(start, end)`` address ranges closed by backward branches, innermost (smallest) first."""
    out = []
    for addr, text in insns:
        if opcode(text) == "BRA":
            m = re.search(r"\b(0x[0-9a-f]+)\b", text.split("BRA", 1)[1])
            if m and int(m.group(1), 16) <= addr:
                out.append((int(m.group(1), 16), addr))
    return sorted(set(out), key=lambda r: (r[1] - r[0], r[0]))


def count(insns, lo, hi, ops) -> int:
    return sum(1 for a, t in insns if lo <= a <= hi and opcode(t).split(".")[0] in ops)


def main_loop(insns: list[tuple[int, str]]) -> tuple[tuple[int, int] | None, int]:
    """The innermost loop holding at least half of the function's math instructions (tensor-core ops if
    it has any, else FMA-class ops), and how many loops the function has."""
    ls = loops(insns)
    if not insns:
        return None, 0
    lo, hi = insns[0][0], insns[-1][0]
    ops = TC_MATH if count(insns, lo, hi, TC_MATH) else MATH
    total = count(insns, lo, hi, ops)
    for rng in ls:
        if total and count(insns, *rng, ops) * 2 >= total:
            return rng, len(ls)
    return None, len(ls)


def loop_size(insns, rng) -> int:
    return sum(1 for a, t in insns if rng[0] <= a <= rng[1] and opcode(t) != "NOP")


def local_traffic(insns) -> tuple[int, int]:
    return (sum(1 for _, t in insns if opcode(t).startswith("STL")),
            sum(1 for _, t in insns if opcode(t).startswith("LDL")))


def res_usage(cuobjdump: str, cubin: Path) -> dict[str, dict[str, int]]:
    text = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            cur = None
    return out


# --- CUDA kernels ---------------------------------------------------------------------------------------
def gemm_smem(mt: int, bits: int, stages: int = 4, bk: int = 64, bn: int = 128) -> int:
    """GemmSmem<MT, BITS>::kTotal of gemm_wna16.cu: stages x (x tile + weight tile + scales + zeros)."""
    return stages * (mt * 16 * bk * 2 + bk * bn * bits // 8 + 2 * bn * 2)


_DT = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}


def cuda_variant(name: str) -> dict | None:
    """Kernel, variant label, bits, M tile from a mangled name (None for anything else)."""
    m = re.search(r"gemm_wna16_kernelI(6__half|13__nv_bfloat16)Li(\d)ELi(\d)E", name)
    if m:
        dt, bits, mt = _DT[m.group(1)], int(m.group(2)), int(m.group(3))
        return dict(kernel="gemm_wna16", variant=f"{dt} W{bits} MT{mt}", bits=bits, mt=mt, dtype=dt)
    m = re.search(r"gemv_wna16_kernelI(6__half|13__nv_bfloat16)Li(\d)E", name)
    if m:
        dt, bits = _DT[m.group(1)], int(m.group(2))
        return dict(kernel="gemv_wna16", variant=f"{dt} W{bits}", bits=bits, dtype=dt)
    m = re.search(r"reduce_splits_kernelI(6__half|13__nv_bfloat16)E", name)
    if m:
        return dict(kernel="reduce_splits", variant=_DT[m.group(1)], bits=None, dtype=_DT[m.group(1)])
    return None


def compile_cuda(nvcc: str, cu: str, arch: int, out: Path) -> Path:
    cubin = out / f"{Path(cu).stem}.sm{arch}.cubin"
    cmd = [nvcc, *NVCC_FLAGS, "-cubin", "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-I", str(CUDA_DIR),
           str(CUDA_DIR / cu), "-o", str(cubin)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stdout}{p.stderr}")
    return cubin


def _figures(insns, kind: str, info: dict) -> dict:
    rng, nloops = main_loop(insns)
    row = dict(loops=nloops, loop_instr="", loop_mma="", loop_fp="", loop_mem="", unroll="", weights_per_thread="", instr_per_weight="",
               warp_instr_per_512B="", hbm_ceiling_pct="")
    if rng is None:
        return row
    size = loop_size(insns, rng)
    body = [opcode(t) for a, t in insns if rng[0] <= a <= rng[1]]
    row.update(loop_instr=size, loop_mma=sum(o.split(".")[0] in TC_MATH for o in body),
               loop_fp=sum(o.split(".")[0] in FP for o in body), loop_mem=sum(o.startswith(MEM) for o in body))
    per_iter = None
    if kind == "cuda" and info["kernel"] == "gemm_wna16":
        per_iter, unroll = 64, count(insns, *rng, ("HMMA",)) / (16 * info["mt"])
    elif kind == "cuda" and info["kernel"] == "gemv_wna16":
        per_iter, unroll = 32, count(insns, *rng, ("FFMA",)) / 256
    elif kind == "triton":
        per_iter, unroll = info["BLOCK_K"] * info["BLOCK_N"] // (32 * info["num_warps"]), 1
    if per_iter is None:
        return row
    if unroll != int(unroll) or unroll < 1:
        raise RuntimeError(f"{info}: main loop at {rng} holds {unroll} source iterations; the marker count is off")
    w = per_iter * int(unroll)
    per512 = size * 512 / (w * 32 * info["bits"] / 8)
    rate = H200["sms"] * 4 * H200["clock_ghz"] * 1e9  # warp instructions per second
    row.update(unroll=int(unroll), weights_per_thread=w, instr_per_weight=round(size / w, 3),
               warp_instr_per_512B=round(per512, 1),
               hbm_ceiling_pct=round(100 * min(1.0, rate * 512 / per512 / (H200["tbps"] * 1e12)), 1))
    return row


def cuda_rows(archs, pattern, out: Path, jobs: int = 2, files=CUDA_FILES) -> list[dict]:
    nvcc, cuobjdump = find_nvcc(), triton_bin("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"needs nvcc ({nvcc}) and cuobjdump ({cuobjdump})")
    version = f"nvcc {tool_version(nvcc)}"
    tasks = [(cu, arch) for arch in archs for cu in files]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        cubins = list(pool.map(lambda t: compile_cuda(nvcc, t[0], t[1], out), tasks))
    rows = []
    for (cu, arch), cubin in zip(tasks, cubins):
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                         check=True).stdout)
        usage = res_usage(cuobjdump, cubin)
        for name, insns in sass.items():
            info = cuda_variant(name)
            if info is None:
                continue
            label = f"cuda {info['kernel']} {info['variant']} sm_{arch}"
            if info["kernel"] == "reduce_splits":
                info["variant"] += f" ({Path(cu).stem})"
            if pattern and not re.search(pattern, label):
                continue
            u = usage.get(name, {})
            st, ld = local_traffic(insns)
            rows.append(dict(kind="cuda", kernel=info["kernel"], variant=info["variant"], arch=arch,
                             regs=u.get("REG", ""), stack_bytes=u.get("STACK", ""), spill_stores=st, spill_loads=ld,
                             smem_static=u.get("SHARED", ""),
                             smem_dynamic=gemm_smem(info["mt"], info["bits"]) if info["kernel"] == "gemm_wna16" else 0,
                             bits=info["bits"] or "", tool=version, **_figures(insns, "cuda", info)))
    return rows


# --- Triton kernels -------------------------------------------------------------------------------------
def triton_variants():
    """(kernel function, label, constexprs, launch options, info) for every autotune config of the main case."""
    from quantkern.triton_kernels._checks import group_mode
    from quantkern.triton_kernels._tuning import GEMM_CONFIGS, GEMV_CONFIGS, prune
    from quantkern.triton_kernels.gemm_wna16 import GROUP_M, _gemm_wna16_kernel
    from quantkern.triton_kernels.gemv_wna16 import _gemv_wna16_kernel

    bits, gs = TRITON_CASE["bits"], TRITON_CASE["group_size"]
    for fn, configs in ((_gemm_wna16_kernel, GEMM_CONFIGS), (_gemv_wna16_kernel, GEMV_CONFIGS)):
        for cfg in configs:
            (c,) = prune([cfg], 1 if cfg["BLOCK_M"] == 1 else 4096, 1 << 20, gs, bits)  # BLOCK_K as tuned
            mode = group_mode(gs, c["BLOCK_K"])
            const = dict(BITS=bits, GROUP_MODE=mode, GROUP_SIZE=gs if mode == 1 else 1,
                         ZERO_POINT=TRITON_CASE["zero_point"], HAS_BIAS=False, DOT_FP32=False,
                         BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"])
            if fn is _gemm_wna16_kernel:
                const["GROUP_M"] = GROUP_M
            else:
                const["SPLIT_K"] = c["SPLIT_K"]
            short = dict(BLOCK_M="M", BLOCK_N="N", BLOCK_K="K", num_warps="w", num_stages="s", SPLIT_K="sk")
            label = " ".join(f"{short[k]}{v}" for k, v in c.items())
            kernel = "triton_gemm" if fn is _gemm_wna16_kernel else "triton_decode"
            yield fn, kernel, f"{TRITON_CASE['dtype']} W{bits} g{gs} {label}", const, c


def compile_triton(fn, const, cfg, arch: int):
    from quantkern.triton_kernels.aot import compile_ahead

    return compile_ahead(fn, const, TRITON_CASE["dtype"], arch, cfg["num_warps"], cfg["num_stages"])


def triton_rows(archs, pattern, out: Path) -> list[dict]:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    cuobjdump = triton_bin("cuobjdump")
    version = f"triton {triton.__version__}"
    rows = []
    for arch in archs:
        for fn, kernel, variant, const, cfg in triton_variants():
            if pattern and not re.search(pattern, f"triton {kernel} {variant} sm_{arch}"):
                continue
            k = compile_triton(fn, const, cfg, arch)
            cubin = out / f"{kernel}_{abs(hash(variant))}_{arch}.cubin"
            cubin.write_bytes(k.asm["cubin"])
            sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                             check=True).stdout)
            (name, insns), = sass.items()
            u = res_usage(cuobjdump, cubin).get(name, {})
            st, ld = local_traffic(insns)
            info = dict(cfg, bits=TRITON_CASE["bits"])
            rows.append(dict(kind="triton", kernel=kernel, variant=variant, arch=arch, regs=u.get("REG", ""),
                             stack_bytes=u.get("STACK", ""), spill_stores=st, spill_loads=ld,
                             smem_static=u.get("SHARED", ""), smem_dynamic=k.metadata.shared,
                             bits=TRITON_CASE["bits"], tool=version, **_figures(insns, "triton", info)))
    return rows


# --- report, check --------------------------------------------------------------------------------------
def key(row: dict) -> tuple:
    return row["kind"], row["kernel"], row["variant"], str(row["arch"])


def check(rows: list[dict], recorded: list[dict], tolerance: float = 0.05) -> list[str]:
    """Problems of ``rows`` against the ``recorded`` report: a kernel missing from the record, local
    memory traffic (STL / LDL, stack) in a kernel recorded without any, more of it than recorded in one
    of the few recorded with some (those are listed in sass_report.txt as work to do, and may only
    improve), instructions per weight more than ``tolerance`` above the recorded value."""
    rec = {key(r): r for r in recorded}
    bad = []

    def spill(r):
        return int(r["spill_stores"]) + int(r["spill_loads"]), int(r["stack_bytes"] or 0)

    for r in rows:
        label = " ".join(map(str, key(r)))
        old = rec.get(key(r))
        if old is None:
            bad.append(f"{label}: not in the recorded report (regenerate benchmarks/results/sass_report.csv)")
            continue
        (n_now, b_now), (n_old, b_old) = spill(r), spill(old)
        if (n_now or b_now) and (n_now > n_old or b_now > b_old):
            bad.append(f"{label}: spills ({r['spill_stores']} STL, {r['spill_loads']} LDL, {r['stack_bytes']} B "
                       f"stack; recorded {old['spill_stores']} STL, {old['spill_loads']} LDL, {old['stack_bytes']} B)")
        if r["instr_per_weight"] not in ("", None) and old["instr_per_weight"] not in ("", None):
            now, then = float(r["instr_per_weight"]), float(old["instr_per_weight"])
            if now > then * (1 + tolerance):
                bad.append(f"{label}: {now} instructions per weight > recorded {then} + {tolerance:.0%}")
    return bad


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(rows: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sass_report.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = ["Main-loop SASS figures of every kernel variant (benchmarks/sass_report.py; method in its docstring).",
             f"tools: {', '.join(sorted({r['tool'] for r in rows}))}",
             "instr_per_weight = static main-loop instructions / weights a thread processes per pass; "
             "hbm_ceiling_pct = weight bandwidth an issue-bound loop can reach on an H200, % of 4.8 TB/s.", ""]
    spilling = [r for r in rows if int(r["spill_stores"]) or int(r["spill_loads"]) or int(r["stack_bytes"] or 0)]
    lines.append(f"{len(rows)} kernels; spilling (STL / LDL in the SASS): "
                 + ("".join(f"\n  {r['kernel']} {r['variant']} sm_{r['arch']}: {r['regs']} registers, "
                            f"{r['spill_stores']} STL, {r['spill_loads']} LDL, {r['stack_bytes']} B stack"
                            for r in spilling) or "none"))
    lines.append("")
    lines.append("loop = main-loop instructions, of which mma (tensor-core), fp (float math, conversions), mem "
                 "(loads, stores, cp.async); the rest is integer / address / control")
    lines.append(f"{'kernel':<14} {'variant':<38} {'arch':>4} {'regs':>4} {'smem':>6} {'loop':>5} {'mma':>4} "
                 f"{'fp':>4} {'mem':>4} {'instr/w':>8} {'wi/512B':>8} {'ceil%':>6}")
    for r in sorted(rows, key=lambda r: (r["kind"], r["kernel"], str(r["arch"]), r["variant"])):
        smem = int(r["smem_dynamic"] or 0) or int(r["smem_static"] or 0)
        lines.append(f"{r['kernel']:<14} {r['variant']:<38} {r['arch']!s:>4} {r['regs']!s:>4} {smem:>6} "
                     f"{r['loop_instr']!s:>5} {r['loop_mma']!s:>4} {r['loop_fp']!s:>4} {r['loop_mem']!s:>4} "
                     f"{r['instr_per_weight']!s:>8} {r['warp_instr_per_512B']!s:>8} {r['hbm_ceiling_pct']!s:>6}")
    txt = out / "sass_report.txt"
    txt.write_text("\n".join(lines) + "\n")
    return path, txt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--filter", help="regex on 'cuda|triton KERNEL VARIANT sm_ARCH'")
    p.add_argument("--cuda-file", action="append", choices=CUDA_FILES, help="compile only this .cu (repeatable)")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--check", type=Path, help="compare with a recorded sass_report.csv; exit 1 on a problem")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qk-sass-") as tmp:
        if not a.no_cuda:
            rows += cuda_rows(a.arch, a.filter, Path(tmp), files=a.cuda_file or CUDA_FILES)
        if not a.no_triton:
            rows += triton_rows(a.arch, a.filter, Path(tmp))
    csv_path, txt = write(rows, a.out)
    print(txt.read_text(), end="")
    print(f"wrote {csv_path} and {txt}")
    if a.check:
        bad = check(rows, read_csv(a.check))
        print("\n".join(bad) or f"check against {a.check}: ok")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
