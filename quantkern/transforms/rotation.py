"""Offline rotations (QuaRot / SpinQuant style, folded into the weights): a transform step before
quantization that returns an equivalent dense model whose weights have fewer outliers.

    model = qk.rotate(model, seed=0)          # same logits, up to fp32 rounding
    qk.GPTQQuantizer(model, bits=3, group_size=64, actorder=True).quantize(data)

What :func:`rotate` does, in fp64, cast back to the model's dtype at the end:

1. **RMSNorm weights are fused** into the Linears that read the norm's output (``q/k/v_proj`` ←
   ``input_layernorm``, ``gate/up_proj`` ← ``post_attention_layernorm``, ``lm_head`` ← ``norm``) and set
   to 1, so that every norm is a plain ``x / rms(x)``, which commutes with any orthogonal matrix.
2. **The residual stream is rotated** by ``Q = diag(s) H / sqrt(d)`` (a Hadamard matrix with random ±1
   signs; see :mod:`quantkern.core.hadamard`): hidden states become ``x Q``. With ``W`` stored
   ``(out, in)``: the token embedding becomes ``E Q``, every Linear reading the residual ``W Q``, every
   Linear writing it (``o_proj``, ``down_proj``) ``Qᵀ W`` and its bias ``b Q``.
3. **Per-head rotation of values / outputs**: one ``head_dim`` rotation ``Hv``: ``v_proj``'s rows of
   each KV head ``Hv W_h`` (and bias), ``o_proj``'s columns of each attention head ``W_h Hvᵀ``. The same
   ``Hv`` for every head, so grouped-query attention (a KV head shared by several query heads) needs
   nothing more. q/k are untouched, so RoPE and Qwen3's per-head ``q_norm`` / ``k_norm`` are unaffected.

Tied embeddings: the output matrix after step 1 is ``E diag(w_norm)``; when the final norm's weight is
all ones it is still the (rotated) embedding and the two stay tied; otherwise ``lm_head`` is untied (its
own weight, ``config.tie_word_embeddings = False``), and a log line says so.

Sizes with no Hadamard construction fall back to a random orthogonal matrix (logged). Only Llama-like
families are supported (:data:`SUPPORTED_MODEL_TYPES`): pre-norm blocks, RMSNorm ``weight * x̂``, a
plain residual (scalar multipliers as in Granite commute with the rotation). Others are refused naming
their ``model_type`` (Gemma's ``1 + w`` norms and sandwich norms, parallel blocks, LayerNorm with a
mean and bias, fused qkv...). The result is an ordinary dense model of the same architecture:
checkpoints of it, quantized or not, are standard. ``model.config.quantkern_rotation`` records what was
done (it lands in ``config.json``).

Measured on SmolLM2-135M (README, quality section): with GPTQ act-order the rotation helps at 3 bits
(W3 g64 asym 25.89 -> 22.86); with plain RTN it is much worse (the model's massive residual activation
gets spread over every channel), so pair it with GPTQ.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..core.hadamard import random_rotation

logger = logging.getLogger("quantkern")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite")
_READERS_ATTN = ("q_proj", "k_proj", "v_proj")
_READERS_MLP = ("gate_proj", "up_proj")


class RotationError(ValueError):
    """The model cannot be rotated (unsupported family, unexpected structure, quantized layers...)."""


def _linear(parent: nn.Module, name: str, where: str) -> nn.Linear:
    m = getattr(parent, name, None)
    if type(m) is not nn.Linear:
        raise RotationError(f"{where}.{name}: expected a dense torch.nn.Linear, got "
                            f"{type(m).__name__ if m is not None else 'nothing'} (rotate before quantizing)")
    return m


def _norm_weight(norm: nn.Module, where: str) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None \
            or "RMSNorm" not in type(norm).__name__:
        raise RotationError(f"{where}: expected an RMSNorm with a weight and no bias, got {type(norm).__name__}")
    return w


def _check_model(model: nn.Module):
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RotationError(f"rotate: model_type={model_type!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type == "meta":
            raise RotationError(f"rotate: {n} is on the meta device (offloaded?); load the whole model first")
    if getattr(model, "quantkern_config", None) is not None:
        raise RotationError("rotate: the model is already quantized; rotate the dense model before quantizing")
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(layers, nn.ModuleList) or not isinstance(emb, nn.Embedding) or type(head) is not nn.Linear \
            or getattr(base, "norm", None) is None:
        raise RotationError(f"rotate: {type(model).__name__} does not have the expected model.layers / "
                            "embed_tokens / norm / dense lm_head")
    return cfg, base, layers, emb, head


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


@torch.no_grad()
def rotate(model: nn.Module, seed: int = 0, heads: bool = True) -> nn.Module:
    """Fold norms and rotations into ``model`` in place (see the module docstring) and return it.

    ``seed``: the random signs (and any orthogonal fallback); ``heads``: also rotate v_proj / o_proj per
    head. Raises :class:`RotationError` (a ``ValueError``) for an unsupported model, before changing it.
    """
    cfg, base, layers, emb, head = _check_model(model)
    hidden = emb.weight.shape[1]
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    # validate every block before touching any weight
    blocks = []
    for i, layer in enumerate(layers):
        where = f"model.layers.{i}"
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise RotationError(f"rotate: {where} has no self_attn / mlp")
        lin = {n: _linear(attn, n, f"{where}.self_attn") for n in _READERS_ATTN + ("o_proj",)}
        lin.update({n: _linear(mlp, n, f"{where}.mlp") for n in _READERS_MLP + ("down_proj",)})
        for name in ("input_layernorm", "post_attention_layernorm"):
            _norm_weight(getattr(layer, name, None), f"{where}.{name}")
        for name in ("post_feedforward_layernorm", "pre_feedforward_layernorm", "post_self_attn_layernorm"):
            if getattr(layer, name, None) is not None:
                raise RotationError(f"rotate: {where}.{name}: sandwich norms are not supported")
        if lin["v_proj"].out_features != n_kv * head_dim or lin["o_proj"].in_features != n_heads * head_dim:
            raise RotationError(f"rotate: {where}: v_proj / o_proj shapes do not match {n_heads} heads, "
                                f"{n_kv} KV heads of {head_dim}")
        blocks.append((layer, lin))
    final_w = _norm_weight(base.norm, "model.norm")
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()

    ones = bool(torch.all(final_w == 1))
    if tied and not ones:
        logger.warning("quantkern: rotate: the final norm's weight is not all ones, so it is fused into lm_head and "
                       "lm_head is untied from the token embedding (config.tie_word_embeddings=False; the checkpoint "
                       "stores both matrices)")
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        for c in {id(cfg): cfg, id(text := getattr(cfg, "get_text_config", lambda: cfg)()): text}.values():
            c.tie_word_embeddings = False
    g = torch.Generator().manual_seed(int(seed))
    q, kind = random_rotation(hidden, g, f"hidden size of {type(model).__name__}")
    hv, kind_v = random_rotation(head_dim, g, "head_dim") if heads else (None, None)
    q = q.to(emb.weight.device)

    def on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device)

    _set(emb.weight, _f64(emb.weight) @ q)  # E Q (a tied lm_head sees it too)
    if tied and head.weight is not emb.weight and ones:
        head.weight = emb.weight
    for layer, lin in blocks:
        w_in, w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        new = {}
        for names, norm_w in ((_READERS_ATTN, w_in), (_READERS_MLP, w_post)):
            for n in names:  # W diag(w) Q
                w = lin[n].weight
                new[n] = (_f64(w) * on(_f64(norm_w), w)[None, :]) @ on(q, w)
        for n in ("o_proj", "down_proj"):  # Qᵀ W, b Q
            m = lin[n]
            new[n] = on(q, m.weight).T @ _f64(m.weight)
            if m.bias is not None:
                _set(m.bias, _f64(m.bias) @ on(q, m.bias))
        if hv is not None:
            v, o = lin["v_proj"], lin["o_proj"]
            new["v_proj"] = torch.einsum("ij,kjc->kic", on(hv, v.weight), new["v_proj"].view(n_kv, head_dim, -1))
            if v.bias is not None:
                _set(v.bias, (_f64(v.bias).view(n_kv, head_dim) @ on(hv, v.bias).T).reshape(-1))
            new["o_proj"] = new["o_proj"].view(o.out_features, n_heads, head_dim) @ on(hv, o.weight).T
        for n, w in new.items():
            _set(lin[n].weight, w.reshape(lin[n].weight.shape))
        for norm_w in (w_in, w_post):
            norm_w.data.fill_(1)

    if not (tied and ones):
        _set(head.weight, (_f64(head.weight) * _f64(final_w).to(head.weight.device)[None, :]) @ q.to(
            head.weight.device))
    final_w.data.fill_(1)

    record = {"seed": int(seed), "residual": kind, "residual_size": hidden, "heads": kind_v, "head_dim": head_dim,
              "fused_norms": True, "online": []}
    prev = getattr(cfg, "quantkern_rotation", None)
    cfg.quantkern_rotation = record if prev is None else [*(prev if isinstance(prev, list) else [prev]), record]
    logger.info("quantkern: rotated %s: residual %d (%s), per-head v/o %s (seed %d)", type(model).__name__, hidden,
                kind, kind_v or "off", seed)
    return model
