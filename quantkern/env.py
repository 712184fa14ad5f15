"""Environment report: ``python -m quantkern.env``.

Prints the versions that matter (python, torch and its CUDA, triton, transformers, nvcc, ninja), the
devices, and for every registered kernel backend whether it can run a few representative layers on
each device / dtype, with the backend's own reason when it cannot. The backends are asked through
their ``can_implement``, exactly as kernel selection asks them, so the report stays right as backends
are added. Asking may build an extension (a JIT build takes minutes the first time); a failed build
shows up as that backend's reason.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import subprocess
import sys

import torch

# (label, bits, group_size, sym, act_order): what a backend is asked to run
PROBE_SCHEMES = (
    ("W4 g128 sym", 4, 128, True, False),
    ("W4 g128 asym act-order", 4, 128, False, True),
    ("W8 per-channel sym", 8, -1, True, False),
    ("W3 g128 asym", 3, 128, False, False),
)
PROBE_FEATURES = 256  # small, divisible by everything the layouts need
MAX_INLINE_REASON = 240


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as e:  # noqa: BLE001 - report any import problem verbatim
        return f"unavailable ({type(e).__name__}: {e})"


def _tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{path} (version query failed: {e})"
    return f"{out.splitlines()[-1] if out else '?'} ({path})"


def devices() -> list[torch.device]:
    """CPU plus every visible CUDA device."""
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


class DeviceUnavailableError(RuntimeError):
    """A device string that names no usable device here (bad syntax, no CUDA, index out of range)."""


def check_device(device) -> torch.device:
    """``torch.device(device)`` if that device can be used here, else :class:`DeviceUnavailableError`
    saying why, before any work is done (torch itself fails late, some builds with an
    ``AssertionError``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceUnavailableError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None and \
                getattr(torch.version, "hip", None) is None else "no CUDA device is visible"
            raise DeviceUnavailableError(f"device {device!r}: CUDA is not available ({why})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type not in ("cpu", "meta"):
        ok = getattr(torch, dev.type, None)
        if ok is None or not getattr(ok, "is_available", lambda: False)():
            raise DeviceUnavailableError(f"device {device!r}: {dev.type} is not available in this torch build")
    return dev


def probe_layer(bits: int, group_size: int, sym: bool, act_order: bool, dtype: torch.dtype, device):
    """A ``QuantLinear`` of ``PROBE_FEATURES`` squared with a valid (all-zero-code) weight; act-order
    layers get a shuffled ``g_idx`` like a real act-order checkpoint."""
    from .nn.quant_linear import QuantLinear

    layer = QuantLinear(PROBE_FEATURES, PROBE_FEATURES, bits, group_size, sym, act_order, dtype=dtype, device=device)
    if act_order:
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(PROBE_FEATURES, generator=gen)
        layer.g_idx.copy_(layer.g_idx.cpu()[perm].to(layer.g_idx.device))
    layer.name = "probe"
    return layer


def backend_table(rows: int = 1) -> list[tuple[str, str, str, str, bool, str | None]]:
    """``(backend, device, dtype, scheme, ok, reason)`` for every registered backend, device, activation
    dtype and probe scheme, with ``rows`` activation rows."""
    from .kernels import registered_kernels
    from .kernels.registry import kernel_query

    out = []
    for dev in devices():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for label, bits, gs, sym, act in PROBE_SCHEMES:
                layer = probe_layer(bits, gs, sym, act, dtype, dev)
                x = torch.zeros(rows, PROBE_FEATURES, dtype=dtype, device=dev)
                for k in registered_kernels("gptq"):
                    try:
                        ok, reason = k.can_implement(*kernel_query(layer, x))
                    except Exception as e:  # noqa: BLE001 - a crashing check is itself worth reporting
                        ok, reason = False, f"can_implement raised {type(e).__name__}: {e}"
                    out.append((k.backend.value, str(dev), str(dtype).replace("torch.", ""), label, ok, reason))
    return out


def report(rows: int = 1) -> str:
    """The full report as text."""
    lines = ["quantkern environment", "=" * 21]
    lines.append(f"python       {platform.python_version()} ({sys.executable})")
    lines.append(f"platform     {platform.platform()} / {platform.machine()}")
    lines.append(f"quantkern    {_version('quantkern')}")
    hip = getattr(torch.version, "hip", None)
    lines.append(f"torch        {torch.__version__} (CUDA {torch.version.cuda}, HIP {hip})")
    lines.append(f"triton       {_version('triton')}")
    lines.append(f"transformers {_version('transformers')}")
    lines.append(f"nvcc         {_tool_version('nvcc')}")
    lines.append(f"ninja        {_tool_version('ninja')}")
    lines.append("")
    lines.append("devices")
    for dev in devices():
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            lines.append(f"  {dev}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                         f"{p.multi_processor_count} SMs")
        else:
            lines.append(f"  cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        lines.append(f"  (no CUDA devices: {why})")
    lines.append("")
    lines.append(f"backends (can_implement for a {PROBE_FEATURES}x{PROBE_FEATURES} layer, M={rows}; "
                 "selection tries them top to bottom)")
    table = backend_table(rows)
    notes: dict[str, int] = {}  # long reasons (a compiler log) are printed once, after the table

    def answer(ok: bool, reason: str | None) -> str:
        if ok:
            return "yes"
        text = str(reason)
        if len(text) <= MAX_INLINE_REASON:
            return "no: " + text
        ref = notes.setdefault(text, len(notes) + 1)
        return f"no: {text[:MAX_INLINE_REASON]}... [see note {ref}]"

    for backend in dict.fromkeys(r[0] for r in table):
        lines.append(f"  {backend}")
        for dev in dict.fromkeys(r[1] for r in table):
            rows_ = [r for r in table if r[0] == backend and r[1] == dev]
            answers = {(ok, reason) for *_, ok, reason in rows_}
            if len(answers) == 1:  # one answer for every dtype and scheme: say it once
                ok, reason = answers.pop()
                lines.append(f"    {dev:<7} {'every dtype and scheme':<34} {answer(ok, reason)}")
                continue
            for _, _, dtype, label, ok, reason in rows_:
                lines.append(f"    {dev:<7} {dtype:<9} {label:<24} {answer(ok, reason)}")
    for text, ref in notes.items():
        lines += ["", f"note {ref}:", text]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantkern.env", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="activation rows M to ask the backends about (default 1)")
    args = ap.parse_args(argv)
    if args.rows < 1:
        ap.error(f"--rows must be >= 1, got {args.rows}")
    print(report(args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
