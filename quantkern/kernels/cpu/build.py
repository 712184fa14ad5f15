"""Building and loading the C++ CPU extension (``csrc/cpu``).

Two ways in, tried in this order, once per process:

1. a prebuilt library ``quantkern/_C_cpu*.so`` from ``QUANTKERN_BUILD_EXT=1 pip install .``
   (setup.py calls :func:`setuptools_extension`);
2. a JIT build of ``csrc/cpu/*.cpp`` with ninja through ``torch.utils.cpp_extension.load``, cached
   under ``$QUANTKERN_CACHE_DIR`` (default ``~/.cache/quantkern``) in a directory keyed by a digest of
   the sources, the flags and the torch version, so a stale build is never reused.

Either way the library is loaded with ``torch.ops.load_library`` (it registers the
``quantkern_cpu`` torch.library ops; it is not a Python module). A failure is recorded with its full
message (for a build, the compiler's output) and raised as :class:`ExtensionError` every time the
extension is asked for again; the backend's ``can_implement`` reports it as its reason.

This module imports only the standard library at import time: setup.py loads it by path before
quantkern is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import threading
from pathlib import Path

from .._jit_lock import build_lock

logger = logging.getLogger(__name__)

PREBUILT_NAME = "quantkern._C_cpu"
CFLAGS = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
LDFLAGS = ["-fopenmp"]
_MAX_REASON = 4000  # characters of a failure kept in can_implement reasons (the exception keeps all)


class ExtensionError(RuntimeError):
    """The C++ CPU extension could not be built or loaded; the message says why."""


def supported_machine() -> str | None:
    """``None`` on x86-64, else why the kernels (x86 intrinsics, ``__builtin_cpu_supports``) cannot build."""
    m = platform.machine().lower()
    return None if m in ("x86_64", "amd64") else f"the C++ CPU kernels need an x86-64 CPU, this is {m!r}"


def source_dir(root: Path | str | None = None) -> Path:
    """``ROOT/csrc/cpu``: the checkout's (editable installs, setup.py), else the copy a wheel ships
    under ``quantkern/_src``."""
    if root is None:
        here = Path(__file__).resolve()
        root = here.parents[3]
        if not (root / "csrc" / "cpu").is_dir():
            root = here.parents[2] / "_src"
    return Path(root) / "csrc" / "cpu"


def sources(root: Path | str | None = None) -> list[Path]:
    return sorted(source_dir(root).glob("*.cpp"))


def setuptools_extension(root):
    """The ``CppExtension`` setup.py builds into the wheel, or ``None`` where it cannot be built."""
    if supported_machine() is not None:
        return None
    srcs = sources(root)
    if not srcs:
        return None
    from torch.utils.cpp_extension import CppExtension

    root = Path(root)
    return CppExtension(
        name=PREBUILT_NAME,
        sources=[str(p.relative_to(root)) for p in srcs],
        include_dirs=[str(source_dir(root))],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
    )


def cache_dir() -> Path:
    base = os.environ.get("QUANTKERN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantkern")
    return Path(base)


def jit_build(name: str, srcs: list[Path], build_root: Path | None = None, verbose: bool = False) -> Path:
    """Build ``srcs`` into a shared library with ninja and load it into the process.

    The build directory is ``build_root/<name>-<digest>``. Raises :class:`ExtensionError` with the
    compiler's output when the build fails, or naming what is missing (ninja, a compiler).
    """
    import torch
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as exc:
        raise ExtensionError(f"ninja is needed to JIT-build the CPU kernels ({exc}); `pip install ninja` "
                             "(it is in quantkern's `test` extra)") from None
    h = hashlib.sha256()
    for p in srcs:
        h.update(p.name.encode() + p.read_bytes())
    for p in sorted(srcs[0].parent.glob("*.h")) if srcs else []:
        h.update(p.name.encode() + p.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS + [torch.__version__, platform.python_version()]).encode())
    build_dir = (build_root or cache_dir()) / f"{name}-{h.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with build_lock(build_dir):
            cpp_extension.load(name=name, sources=[str(p) for p in srcs], extra_cflags=CFLAGS,
                               extra_ldflags=LDFLAGS, extra_include_paths=[str(srcs[0].parent)] if srcs else [],
                               build_directory=str(build_dir), is_python_module=False, verbose=verbose)
    except Exception as exc:  # the message of cpp_extension's build error holds the compiler output
        raise ExtensionError(f"building the quantkern CPU extension in {build_dir} failed: {exc}") from exc
    return build_dir


_lock = threading.Lock()
_state: dict = {"origin": None, "error": None}


def _load() -> str:
    reason = supported_machine()
    if reason:
        raise ExtensionError(reason)
    import torch

    spec = importlib.util.find_spec(PREBUILT_NAME)
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except Exception as exc:
            raise ExtensionError(f"the prebuilt CPU extension {spec.origin} does not load ({exc}); rebuild it "
                                 "against this torch with QUANTKERN_BUILD_EXT=1 pip install .") from exc
        return spec.origin
    srcs = sources()
    if not srcs:
        raise ExtensionError(f"no prebuilt {PREBUILT_NAME} and no C++ sources in {source_dir()} to JIT-build")
    return str(jit_build("quantkern_cpu_ext", srcs))


def load() -> str:
    """Load the extension (once per process) and return where it came from; raises :class:`ExtensionError`."""
    with _lock:
        if _state["origin"] is None and _state["error"] is None:
            try:
                _state["origin"] = _load()
            except ExtensionError as exc:
                _state["error"] = str(exc)
            else:
                from . import ops

                ops.register_fakes()
        if _state["error"] is not None:
            raise ExtensionError(_state["error"])
        return _state["origin"]


def load_error() -> str | None:
    """``None`` if the extension is loaded (loading it if needed), else the recorded failure (trimmed)."""
    try:
        load()
    except ExtensionError as exc:
        msg = str(exc)
        return msg if len(msg) <= _MAX_REASON else msg[:1000] + "\n...\n" + msg[-(_MAX_REASON - 1000):]
    return None
