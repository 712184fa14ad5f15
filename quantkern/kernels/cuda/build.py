"""Building and loading the CUDA extension (csrc/cuda), loudly.

Two ways in, tried in this order by :func:`load_extension`:

1. a prebuilt ``quantkern._cuda_kernels`` library, put in the wheel by ``QUANTKERN_BUILD_EXT=1 pip
   install .`` (``setup.py`` calls :func:`setuptools_extension`);
2. a JIT build with ``torch.utils.cpp_extension.load`` and ninja, for the GPUs of this machine
   (``QUANTKERN_CUDA_JIT=0`` turns it off: the extension is then only loaded if prebuilt).

Every failure is recorded with its cause (an ABI mismatch of the prebuilt library, a missing nvcc or
ninja, a compiler error) and returned by :func:`extension_status`; backends turn it into their
``can_implement`` reason and :func:`require_extension` raises it when a CUDA op is asked for
explicitly. Nothing here runs at import time: a CPU-only install never touches nvcc.

This module is also loaded standalone by ``setup.py`` (before quantkern is importable), so it imports
only the standard library and torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import threading
from pathlib import Path

EXT_MODULE = "quantkern._cuda_kernels"
JIT_NAME = "quantkern_cuda_kernels"
SOURCES = ("csrc/cuda/qk_binding.cpp", "csrc/cuda/gemm_wna16.cu", "csrc/cuda/gemv_wna16.cu")
# sm_80 is the floor (mma.sync bf16, cp.async, ldmatrix); +PTX lets newer GPUs JIT the sm_90 code.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
NVCC_FLAGS = ("-O3", "-lineinfo")  # no --use_fast_math: the dequantization relies on IEEE rounding

logger = logging.getLogger("quantkern")
_lock = threading.Lock()
_state: dict = {}  # {"ok": bool, "reason": str | None, "how": str}


def source_root() -> Path | None:
    """The directory holding ``csrc/cuda``: the checkout (editable installs), else the copy a wheel
    ships under ``quantkern/_src``; None when neither has the sources."""
    here = Path(__file__).resolve()
    for root in (here.parents[3], here.parents[2] / "_src"):
        if all((root / s).exists() for s in SOURCES):
            return root
    return None


def find_nvcc() -> str | None:
    """Path of nvcc from ``CUDA_HOME`` / ``CUDA_PATH`` / torch's guess / ``PATH``, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - torch's import of its own helpers; any failure means "no guess"
        CUDA_HOME = None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def toolchain_problem() -> str | None:
    """Why a CUDA build of the extension is impossible here (no CUDA torch, no nvcc), else None."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    from torch.utils.cpp_extension import CUDA_HOME  # what CUDAExtension and load() will use

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return (f"torch.utils.cpp_extension finds no CUDA toolkit (CUDA_HOME={CUDA_HOME}); set CUDA_HOME to the "
                f"toolkit root{f' (nvcc is at {find_nvcc()})' if find_nvcc() else ''}")
    return None


def setuptools_extension(root) -> object | None:
    """The ``CUDAExtension`` for ``setup.py`` (``QUANTKERN_BUILD_EXT=1``), or None when this machine
    has no CUDA build of torch or no nvcc (the wheel then relies on the JIT build or the other backends).
    ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures; it defaults to ``DEFAULT_ARCH_LIST``."""
    if toolchain_problem() is not None:
        return None
    from torch.utils.cpp_extension import CUDAExtension

    root = Path(root)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return CUDAExtension(
        name=EXT_MODULE,
        sources=[os.path.relpath(root / s, root) for s in SOURCES],
        include_dirs=[str(root / "csrc" / "cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": list(NVCC_FLAGS)},
    )


def _load_prebuilt() -> tuple[bool, str | None]:
    import torch

    spec = importlib.util.find_spec(EXT_MODULE)
    if spec is None or spec.origin is None:
        return False, None
    try:
        torch.ops.load_library(spec.origin)
    except OSError as e:  # undefined symbols: built against another torch / CUDA
        return False, (f"prebuilt {spec.origin} failed to load, probably built against another torch or CUDA "
                       f"(this is torch {torch.__version__}, CUDA {torch.version.cuda}): {e}")
    return True, None


def _jit_build() -> tuple[bool, str | None]:
    if os.environ.get("QUANTKERN_CUDA_JIT", "1").strip().lower() in ("0", "false", "no", "off"):
        # benchmarks/gpu_session.sh: the build has its own step; nothing else may start (or wait on) one
        return False, "JIT build disabled (QUANTKERN_CUDA_JIT=0)"
    problem = toolchain_problem()
    if problem:
        return False, f"cannot JIT-build: {problem}"
    from torch.utils import cpp_extension

    from .._jit_lock import build_lock  # here, not at the top: benchmarks/gpu_session.sh's probe loads this file alone

    if not cpp_extension.is_ninja_available():
        return False, "cannot JIT-build: ninja is not installed (pip install ninja)"
    root = source_root()
    if root is None:
        return False, ("cannot JIT-build: csrc/cuda sources are not part of this install; reinstall from a "
                       "source checkout or with QUANTKERN_BUILD_EXT=1")
    try:
        # torch's own default directory, named here so that the build runs under build_lock
        build_dir = Path(cpp_extension._get_build_directory(JIT_NAME, verbose=False))
        with build_lock(build_dir):
            cpp_extension.load(
                name=JIT_NAME,
                build_directory=str(build_dir),
                sources=[str(root / s) for s in SOURCES],
                extra_include_paths=[str(root / "csrc" / "cuda")],
                extra_cflags=["-O3"],
                extra_cuda_cflags=list(NVCC_FLAGS),
                is_python_module=False,
                verbose=os.environ.get("QUANTKERN_VERBOSE_BUILD", "0") == "1",
            )
    except Exception as e:  # noqa: BLE001 - any build / load failure becomes the recorded reason
        msg = str(e).strip()
        if len(msg) > 3000:
            msg = "..." + msg[-3000:]
        return False, f"JIT build failed ({type(e).__name__}): {msg}"
    return True, None


def load_extension() -> tuple[bool, str | None]:
    """Load the extension once per process (prebuilt, else JIT) and register the ops' fake impls.

    Returns ``(True, None)`` or ``(False, reason)``; the outcome is cached, so a failed build is not
    retried on every call (restart the process after fixing the cause).
    """
    with _lock:
        if _state:
            return _state["ok"], _state["reason"]
        ok, reason = _load_prebuilt()
        how = "prebuilt"
        if not ok:
            ok, jit_reason = _jit_build()
            how = "jit"
            reason = jit_reason if reason is None else f"{reason}; then {jit_reason}"
        if ok:
            from .ops import register_fakes

            register_fakes()
            reason = None
        _state.update(ok=ok, reason=reason, how=how if ok else "failed")
        if not ok:  # said once per process; the reason also travels in every can_implement answer
            logger.warning("quantkern: the CUDA extension is unavailable, CUDA kernels are disabled: %s", reason)
        return ok, reason


def extension_status(load: bool = True) -> tuple[bool, str | None]:
    """``(ok, reason)`` of the extension; with ``load=False`` it never builds, and reports "not loaded
    yet" instead of building."""
    if not load and not _state:
        problem = toolchain_problem()
        return False, problem or "not loaded yet (JIT-built with ninja on first use)"
    return load_extension()


def require_extension() -> None:
    """Raise ``RuntimeError`` with the recorded cause if the extension is unavailable."""
    ok, reason = load_extension()
    if not ok:
        raise RuntimeError(f"quantkern CUDA extension unavailable: {reason}")
