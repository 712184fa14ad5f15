"""GGUF metadata for :func:`~quantkern.io.gguf_export.save_gguf`: the keys llama.cpp reads besides the
tensors (tokenizer, hyperparameters, ``general.*``).

Two sources:

- the model was loaded from a GGUF file (``from_pretrained(dir, gguf_file=...)``): that file's
  ``tokenizer.*``, ``general.*`` (less ``file_type`` / ``quantization_version`` / ``alignment``) and
  ``{arch}.*`` keys are copied verbatim (read with ``gguf.GGUFReader``). transformers does not keep the
  file name, so :func:`find_source_gguf` looks for it in ``config._name_or_path`` (a ``.gguf`` file, or
  the directory it was loaded from) and takes a file only when its architecture, sizes, vocabulary and
  ``general.name`` match the model (``save_gguf(source_gguf=...)`` names it explicitly).
- otherwise the keys are derived from the HF tokenizer and config as llama.cpp's converter
  (``convert_hf_to_gguf.py``) does. Byte-level BPE (``gpt2``): token list / types like its
  ``get_vocab_base``, merges, special ids and the chat template through ``gguf.SpecialVocab``, and
  ``tokenizer.ggml.pre`` from the hash of the tokenization of llama.cpp's check text (:data:`CHKTXT`,
  :data:`KNOWN_PRE`), else from a pre-tokenizer layout that is certain (plain byte-level GPT-2 regex
  -> ``"gpt-2"``), else ``"default"`` with a warning. SentencePiece-style BPE with byte fallback
  (``llama``, as Llama 2's tokenizer.json): tokens and types as its LlamaHfVocab path, scores from the
  merge ranks (see :func:`_spm_metadata`). Other tokenizers are refused (``ValueError``).

Either way ``general.file_type`` (the ``LlamaFileType`` of the type holding most of the weights) and
``general.quantization_version`` describe the export itself, and ``general.name`` is never a local path.
"""

from __future__ import annotations

import json
import logging
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# llama.cpp's convert_hf_to_gguf.py encodes this text with the HF tokenizer and hashes str(ids) (sha256)
# to identify a BPE pre-tokenizer (the name it writes as tokenizer.ggml.pre)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

# a few of the hashes llama.cpp knows (from its convert_hf_to_gguf.py), for the Llama-architecture
# families quantkern exports; an unknown hash falls back to the pre-tokenizer config, then "default"
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
}

# source keys that describe the source file itself (its tensors' types, layout, split), not the model
_NOT_COPIED = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}
_NOT_COPIED_PREFIXES = ("split.", "quantize.", "quantkern.", "GGUF.")
_MAX_CANDIDATES = 8
_warned_default_pre = False


def _gguf():
    import gguf

    return gguf


# -- reading a source GGUF -------------------------------------------------------------------------


_cache: dict = {}


def read_metadata(path) -> dict:
    """``{key: GGUFValue}`` of a GGUF file's metadata (arrays keep their element type). The last file
    read is remembered (by path, size and mtime): an export reads its source twice."""
    st = Path(path).stat()
    ident = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if ident in _cache:
        return dict(_cache[ident])
    _cache.clear()
    _cache[ident] = meta = _read_metadata(path)
    return dict(meta)


def _read_metadata(path) -> dict:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
            continue  # nested arrays: nothing llama.cpp reads for llama, and GGUFReader cannot rebuild them
        out[key] = gguf.GGUFValue(value=field.contents(), type=vtype, sub_type=sub)
    return out


def _value(meta: dict, key: str, default=None):
    v = meta.get(key)
    return default if v is None else v.value


def _matches(meta: dict, cfg, tokenizer, arch: str, check_name: bool = True) -> str | None:
    """Why ``meta`` (a GGUF file's metadata) is not the source of this model, or None."""
    if _value(meta, "general.architecture") != arch:
        return f"architecture {_value(meta, 'general.architecture')!r}"
    for key, want in ((f"{arch}.embedding_length", cfg.hidden_size),
                      (f"{arch}.attention.head_count", cfg.num_attention_heads),
                      (f"{arch}.feed_forward_length", cfg.intermediate_size)):
        if _value(meta, key) != want:
            return f"{key} = {_value(meta, key)} (the model has {want})"
    tokens = _value(meta, "tokenizer.ggml.tokens") or []
    if len(tokens) != cfg.vocab_size:
        return f"{len(tokens)} tokens (the model's vocab_size is {cfg.vocab_size})"
    name = getattr(cfg, "_model_name_or_path", None)  # transformers' GGUF loading keeps general.name there
    if check_name and isinstance(name, str) and name and _value(meta, "general.name") not in (None, name):
        return f"general.name {_value(meta, 'general.name')!r} (the model was loaded as {name!r})"
    if tokenizer is not None:
        vocab = _tokenizer_vocab(tokenizer)
        if vocab is not None and vocab != {t: i for i, t in enumerate(tokens) if t in vocab}:
            return "its token list differs from the tokenizer's"
    return None


def _tokenizer_vocab(tokenizer) -> dict | None:
    try:
        return dict(tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: nothing to compare
        return None


def find_source_gguf(model, tokenizer=None, exclude=None) -> Path | None:
    """The GGUF file ``model`` was loaded from, or None.

    transformers keeps only the directory (``config._name_or_path``); its ``.gguf`` files (at most
    eight) are read and one is taken when its architecture, sizes, token count, ``general.name`` and
    (with ``tokenizer``) token list match the model. ``exclude``: a path never taken (the destination)."""
    cfg = model.config
    where = getattr(cfg, "_name_or_path", None)
    if not where:
        return None
    p = Path(str(where))
    if p.suffix == ".gguf" and p.is_file():
        candidates = [p]
    elif p.is_dir() and _gguf_loaded(cfg):
        candidates = sorted(p.glob("*.gguf"))
    else:
        return None
    excl = Path(exclude).resolve() if exclude is not None else None
    candidates = [c for c in candidates if c.resolve() != excl]
    if not candidates or len(candidates) > _MAX_CANDIDATES:
        if candidates:
            log.warning("GGUF export: %d .gguf files in %s, not searching them for the source model "
                        "(pass source_gguf=)", len(candidates), p)
        return None
    arch = cfg.model_type
    found = []
    for c in candidates:
        try:
            meta = read_metadata(c)
        except Exception as e:  # noqa: BLE001 - an unreadable file is not the source
            log.debug("GGUF export: %s is not readable as GGUF: %s", c, e)
            continue
        why = _matches(meta, cfg, tokenizer, arch)
        if why is None:
            found.append((c, meta))
        else:
            log.debug("GGUF export: %s is not the source: %s", c, why)
    if not found:
        return None
    first = _copied(found[0][1], arch)
    if any(_copied(m, arch) != first for _, m in found[1:]):
        log.warning("GGUF export: several files in %s match the model with different metadata (%s); deriving "
                    "the metadata from the tokenizer and config instead (pass source_gguf=)",
                    p, ", ".join(c.name for c, _ in found))
        return None
    return found[0][0]


def _gguf_loaded(cfg) -> bool:
    """Whether transformers loaded this config from a GGUF file (a ``quantization_config`` of method
    gguf, or the ``_model_name_or_path`` it sets from ``general.name``)."""
    qc = getattr(cfg, "quantization_config", None)
    method = getattr(qc, "quant_method", None) or (qc.get("quant_method") if isinstance(qc, dict) else None)
    return str(getattr(method, "value", method)) == "gguf" or bool(getattr(cfg, "_model_name_or_path", None))


def _copied(meta: dict, arch: str) -> dict:
    """The source keys an export takes over: ``tokenizer.*``, ``general.*`` less what describes the
    source file itself, and the ``{arch}.*`` hyperparameters."""
    return {k: v for k, v in meta.items()
            if k not in _NOT_COPIED and not k.startswith(_NOT_COPIED_PREFIXES)
            and k.startswith(("tokenizer.", "general.", f"{arch}."))}


# -- deriving from an HF config and tokenizer --------------------------------------------------------


def _scratch(arch: str):
    """A GGUFWriter with no file: its ``add_*`` methods fill ``kv_data[0]`` ({key: GGUFValue})."""
    return _gguf().GGUFWriter(None, arch)


def hparam_metadata(cfg, arch: str = "llama") -> dict:
    """``{key: GGUFValue}``: the ``{arch}.*`` hyperparameters of a Llama config, as llama.cpp's converter
    writes them."""
    w = _scratch(arch)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "head_dim", None) and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    return _kv(w)


def _kv(w) -> dict:
    return {k: v for k, v in w.kv_data[0].items() if k != "general.architecture"}


def _looks_special(token: str) -> bool:
    # as llama.cpp's converter: added tokens that ought to be control tokens though not marked special
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<｜") and token.endswith("｜>"))


def _is_byte_level(data: dict) -> bool:
    def has(node):
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers", []) or node.get("decoders", []) or [])
    return has(data.get("pre_tokenizer")) or has(data.get("decoder"))


def _structural_pre(data: dict) -> str | None:
    """A pre-tokenizer name known for certain from the layout alone: a lone byte-level pre-tokenizer
    with the GPT-2 regex is llama.cpp's ``gpt-2``; anything else is left to the hash."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not data.get("normalizer"):
        return "gpt-2"
    return None


def tokenizer_pre(tokenizer, data: dict | None = None) -> str:
    """``tokenizer.ggml.pre`` for a BPE tokenizer: llama.cpp's name for the hash of the tokenization
    of :data:`CHKTXT`, else one certain from the pre-tokenizer config, else ``"default"`` (warned once)."""
    global _warned_default_pre
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in KNOWN_PRE:
        return KNOWN_PRE[chkhsh]
    if data is None:
        data = json.loads(tokenizer.backend_tokenizer.to_str())
    name = _structural_pre(data)
    if name is not None:
        return name
    if not _warned_default_pre:
        _warned_default_pre = True
        log.warning("GGUF export: the tokenizer's BPE pre-tokenizer is not one quantkern recognizes (hash %s); "
                    "writing tokenizer.ggml.pre = 'default', with which llama.cpp may split text differently "
                    "from transformers", chkhsh)
    return "default"


def _add_flags(tokenizer, special: dict) -> dict:
    """``{"bos": bool, "eos": bool}``: whether the tokenizer adds them, seen by encoding a text."""
    out = {}
    try:
        with_ = tokenizer.encode("a b", add_special_tokens=True)
        without = tokenizer.encode("a b", add_special_tokens=False)
    except Exception:  # noqa: BLE001 - no encode: leave the flags unset
        return out
    extra = len(with_) - len(without)
    if "bos" in special:
        out["bos"] = extra > 0 and with_[0] == special["bos"] and with_[1:1 + len(without)] == without
    if "eos" in special:
        out["eos"] = extra > 0 and with_[-1] == special["eos"] and with_[len(with_) - 1 - len(without):-1] == without
    return out


def _checked_vocab(tokenizer, cfg) -> tuple[dict, int]:
    vocab = _tokenizer_vocab(tokenizer) or {}
    n_vocab = cfg.vocab_size
    if vocab and max(vocab.values()) >= n_vocab:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size "
                         f"{n_vocab}: llama.cpp could not load the export")
    return vocab, n_vocab


def _spm_prefix(data: dict) -> bool | None:
    """Whether a SentencePiece-style tokenizer prepends "▁" to the text (llama.cpp's
    add_space_prefix), or None when it does not treat spaces as "▁" at all."""
    def walk(node, kinds):
        if not isinstance(node, dict):
            return []
        found = [node] if node.get("type") in kinds else []
        for child in node.get("normalizers", []) or node.get("pretokenizers", []) or []:
            found += walk(child, kinds)
        return found
    norm = walk(data.get("normalizer"), ("Prepend", "Replace"))
    meta = walk(data.get("pre_tokenizer"), ("Metaspace",))
    if meta:
        return meta[0].get("prepend_scheme", "always") != "never" and meta[0].get("add_prefix_space", True)
    replaces = [n for n in norm if n["type"] == "Replace" and n.get("content") == "▁"]
    if not replaces:
        return None
    return any(n["type"] == "Prepend" and n.get("prepend") == "▁" for n in norm)


def _is_spm(data: dict) -> bool:
    return _spm_prefix(data) is not None


def _spm_metadata(tokenizer, data: dict, cfg, arch: str) -> dict:
    """``tokenizer.*`` of a SentencePiece-style BPE tokenizer (Llama 2, TinyLlama ...): llama.cpp's
    ``llama`` vocabulary (its SPM tokenizer), as the converter's LlamaHfVocab path writes it, except the
    scores: llama.cpp merges the adjacent pair whose joined token scores highest, so a merged token
    scores minus its merge rank (the order the HF merges apply in) rather than a flat -1000; byte tokens
    ``<0xXX>`` are BYTE, the unknown token UNKNOWN, special added tokens CONTROL; no merges are
    written (llama.cpp's SPM tokenizer does not read them)."""
    import re

    gguf = _gguf()
    vocab, n_vocab = _checked_vocab(tokenizer, cfg)
    reverse = {i: t for t, i in vocab.items()}
    rank: dict[str, int] = {}
    for r, m in enumerate(data["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    unk = data["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        score, typ = 0.0, gguf.TokenType.NORMAL
        info = decoder.get(i)
        if tok == unk:
            typ = gguf.TokenType.UNKNOWN
        elif tok in added and ((info is not None and info.special) or _looks_special(tok)):
            typ = gguf.TokenType.CONTROL
        elif tok in added and tok not in rank:
            typ, score = gguf.TokenType.USER_DEFINED, -1000.0
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            typ = gguf.TokenType.BYTE
        elif tok in rank:
            score = -float(rank[tok] + 1)
        tokens.append(tok)
        scores.append(score)
        types.append(typ)
    w = _scratch(arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(bool(_spm_prefix(data)))
    _special_vocab(tokenizer, cfg, n_vocab, load_merges=False).add_to_gguf(w, quiet=True)
    return _kv(w)


def _special_vocab(tokenizer, cfg, n_vocab: int, load_merges: bool):
    """``gguf.SpecialVocab`` of the tokenizer's saved files (special ids, add-flags, chat template,
    merges), completed from the tokenizer and config objects where the files say nothing."""
    gguf = _gguf()
    with tempfile.TemporaryDirectory(prefix="quantkern-gguf-tok-") as d:
        tokenizer.save_pretrained(d)
        special = gguf.SpecialVocab(d, load_merges=load_merges, n_vocab=n_vocab)
    for attr, typ in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("unk_token_id", "unk"),
                      ("pad_token_id", "pad")):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and 0 <= v < n_vocab:
            special.special_token_ids.setdefault(typ, v)
    for attr, typ in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "pad")):
        v = getattr(cfg, attr, None)  # the converter falls back to config.json's ids
        if isinstance(v, int) and 0 <= v < n_vocab:
            special.special_token_ids.setdefault(typ, v)
    for typ, flag in _add_flags(tokenizer, special.special_token_ids).items():
        special.add_special_token.setdefault(typ, flag)
    if special.chat_template is None and isinstance(getattr(tokenizer, "chat_template", None), str):
        special.chat_template = tokenizer.chat_template
    return special


def tokenizer_metadata(tokenizer, cfg, arch: str = "llama") -> dict:
    """``{key: GGUFValue}``: the ``tokenizer.*`` keys of a byte-level BPE (GPT-2 style, llama.cpp's
    ``gpt2``) or SentencePiece-style BPE (``llama``) HF tokenizer, as llama.cpp's converter derives them.
    Other tokenizers raise ``ValueError``."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF tokenizer export needs a fast (tokenizers) tokenizer")
    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback") and not _is_byte_level(data) and _is_spm(data):
        return _spm_metadata(tokenizer, data, cfg, arch)
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(data):
        raise ValueError("GGUF tokenizer export supports byte-level BPE tokenizers (GPT-2 style) and "
                         "SentencePiece-style BPE ones (byte fallback, '▁' for spaces), got "
                         f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    vocab, n_vocab = _checked_vocab(tokenizer, cfg)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            info = decoder.get(i)
            if info is not None and not info.normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if (info is not None and info.special) or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    w = _scratch(arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre(tokenizer, data))
    w.add_token_list(tokens)
    w.add_token_types(types)
    pre = data.get("pre_tokenizer") or {}
    w.add_add_space_prefix(bool(pre.get("add_prefix_space", False)) if pre.get("type") == "ByteLevel" else False)
    special = _special_vocab(tokenizer, cfg, n_vocab, load_merges=True)
    special.add_to_gguf(w, quiet=True)
    return _kv(w)


# -- the export's own keys ---------------------------------------------------------------------------


def export_name(cfg, source: dict | None = None) -> str:
    """``general.name``: the source GGUF's, else the name transformers kept from a GGUF, else the last
    component of ``_name_or_path`` (never a local path), else the model type."""
    if source and isinstance(_value(source, "general.name"), str) and _value(source, "general.name"):
        return _value(source, "general.name")
    name = getattr(cfg, "_model_name_or_path", None)
    if isinstance(name, str) and name.strip():
        return Path(name.strip()).name or name.strip()
    where = str(getattr(cfg, "_name_or_path", "") or "").rstrip("/\\")
    if where:
        base = Path(where).name
        if base.endswith(".gguf"):
            base = base[:-5]
        if base:
            return base
    return str(getattr(cfg, "model_type", None) or "quantkern model")


def file_type(tensor_types: dict) -> int:
    """``general.file_type``: the ``LlamaFileType`` of the type holding most of the weights of the 2-D
    tensors (``{name: (GGMLQuantizationType, n_elements, n_dims)}``); ALL_F32 when every one is F32."""
    gguf = _gguf()
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    by: dict = {}
    for qtype, n, dims in tensor_types.values():
        if dims >= 2:
            by[qtype] = by.get(qtype, 0) + n
    if not by or set(by) == {Q.F32}:
        return int(F.ALL_F32)
    by.pop(Q.F32, None)
    main = max(by, key=by.get)
    table = {Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q4_0: F.MOSTLY_Q4_0, Q.Q4_1: F.MOSTLY_Q4_1,
             Q.Q8_0: F.MOSTLY_Q8_0, Q.Q5_0: F.MOSTLY_Q5_0, Q.Q5_1: F.MOSTLY_Q5_1}
    return int(table.get(main, F.GUESSED))


def _same(a: Any, b: Any) -> bool:
    import numpy as np

    if isinstance(a, float) or isinstance(b, float):
        try:
            return bool(np.float32(a) == np.float32(b))
        except (TypeError, ValueError):
            return False
    return a == b


def model_metadata(model, tokenizer=None, source_gguf=None, exclude=None) -> tuple[dict, Path | None]:
    """``({key: GGUFValue}, source path or None)``: every metadata key of the export except
    ``general.file_type`` / ``quantization_version`` (which depend on the tensors) and quantkern's own.

    With a source GGUF (``source_gguf``, or found by :func:`find_source_gguf`), its tokenizer, general
    and hyperparameter keys are copied; a hyperparameter the model's config contradicts (e.g. fewer
    layers) takes the config's value, with a warning."""
    cfg = model.config
    arch = cfg.model_type
    if source_gguf is None:
        source_gguf = find_source_gguf(model, tokenizer, exclude=exclude)
    else:
        why = _matches(read_metadata(source_gguf), cfg, tokenizer, arch, check_name=False)
        if why is not None:
            raise ValueError(f"source_gguf={str(source_gguf)!r} does not describe this model: {why}")
    derived = hparam_metadata(cfg, arch)
    if source_gguf is None:
        meta = dict(derived)
        if tokenizer is not None:
            meta.update(tokenizer_metadata(tokenizer, cfg, arch))
        gguf = _gguf()
        meta["general.name"] = gguf.GGUFValue(export_name(cfg), gguf.GGUFValueType.STRING)
        return meta, None
    src = read_metadata(source_gguf)
    meta = _copied(src, arch)
    for key, v in derived.items():
        old = meta.get(key)
        if old is not None and not _same(old.value, v.value):
            log.warning("GGUF export: %s is %r in the source %s but %r in the model's config; writing the config's",
                        key, old.value, Path(source_gguf).name, v.value)
            meta[key] = v
        elif old is None:
            meta[key] = v
    gguf = _gguf()
    meta["general.name"] = gguf.GGUFValue(export_name(cfg, src), gguf.GGUFValueType.STRING)
    if not any(k.startswith("tokenizer.") for k in meta) and tokenizer is not None:
        meta.update(tokenizer_metadata(tokenizer, cfg, arch))
    return meta, Path(source_gguf)
