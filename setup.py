"""Package build. Pure Python by default; compiled extensions are opt-in.

``QUANTKERN_BUILD_EXT=1 pip install .`` builds the C++ CPU kernels (and the CUDA kernels where nvcc
and a CUDA build of torch are present) into the wheel. Without it, the extensions are JIT-built with
ninja the first time a kernel is used (see quantkern/kernels/*/build.py), and the pure-PyTorch
reference path works everywhere.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class build_py_with_sources(build_py):
    """Ship csrc/ inside the package (as quantkern/_src/csrc) so a wheel built without the compiled
    extensions can still JIT-build them (quantkern/kernels/*/build.py look there after the checkout)."""

    def run(self):
        super().run()
        import shutil

        if (ROOT / "csrc").is_dir():
            dst = Path(self.build_lib) / "quantkern" / "_src" / "csrc"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(ROOT / "csrc", dst, ignore=shutil.ignore_patterns("*.o", "*.so", "build*"))


def _load_build_spec(rel: str):
    path = ROOT / rel
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(path.stem + "_spec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ext_modules():
    if os.environ.get("QUANTKERN_BUILD_EXT", "0") != "1":
        return [], {"build_py": build_py_with_sources}
    from torch.utils.cpp_extension import BuildExtension

    exts = []
    for rel in ("quantkern/kernels/cpu/build.py", "quantkern/kernels/cuda/build.py"):
        mod = _load_build_spec(rel)
        if mod is not None:
            ext = mod.setuptools_extension(ROOT)
            if ext is not None:
                exts.append(ext)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": build_py_with_sources}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
