"""What the GGUF format can hold, independent of the writer (:mod:`quantkern.io.gguf_export`): the
32-column quantization block of Q4_0 / Q4_1 / Q8_0 and the model families llama.cpp's tensor names
are known for (from :mod:`quantkern.arch`)."""

from __future__ import annotations

from ..arch import ARCHITECTURES, architecture_for

BLOCK = 32  # columns per GGUF quantization block (Q4_0, Q4_1, Q8_0)


def gguf_model_problem(cfg) -> str | None:
    """Why a model of this config cannot be exported to GGUF (architecture, RoPE), or None."""
    if architecture_for(cfg).gguf is None:
        supported = ", ".join(t for t, a in ARCHITECTURES.items() if a.gguf is not None)
        return f"GGUF export supports the {supported} architecture, got {getattr(cfg, 'model_type', None)!r}"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"GGUF export supports default RoPE only, got {rope}"
    return None
