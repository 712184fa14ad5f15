"""A decode path built for speed: static KV cache, the whole step under ``torch.compile``.

:class:`FastDecoder` takes a Llama-family causal LM (``llama``, ``mistral``, ``qwen2``: pre-norm
RMSNorm blocks, rotary attention, SiLU-gated MLP), dense or quantized (``QuantLinear`` layers, whose
kernels are ``torch.library`` ops with fake implementations, so they sit inside the compiled graph),
and runs it with

- a static KV cache (``[batch, kv_heads, max_len, head_dim]`` tensors for K and V per layer,
  written in place with ``index_copy_``), so every decode step has the same shapes;
- on CPU, each decode step as one C++ call through every block and the lm_head
  (:class:`quantkern.kernels.cpu.decode.FusedDecodeStep`: one OpenMP region, no fork/join per GEMM)
  where the model's projections run the C++ CPU kernels in fp32; otherwise, and for prefill, the whole
  step (embedding, every block, final norm, lm_head, greedy argmax) as one compiled graph: inductor's
  C++ code on CPU, CUDA graphs (``mode="reduce-overhead"``) on GPU. The Python loop over the layers runs
  only while tracing; either way a step costs one call and no per-token Python work that grows with
  the number of layers;
- q / k / v and gate / up fused into one GEMM each where the layers allow (same kind, same scheme,
  same act-order permutation), SDPA attention with grouped-query heads, RoPE from a table computed
  once by the model's own rotary module (the same numbers transformers computes per step).

:func:`quantize_output` quantizes the lm_head (W8 / W4, RTN) and, for tied embeddings, serves the
input embeddings from the same quantized tensor (:class:`TiedQuantEmbedding`): the tie is kept, one
copy of the weights.

:func:`generate` is the entry point ``quantkern generate`` and :func:`quantkern.eval.generate` use:
the fast path where :func:`unsupported_reason` finds nothing, else transformers' ``generate`` after one
message saying why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("quantkern")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")  # position-independent tables (not dynamic / longrope)


# --------------------------------------------------------------------------------------------------
# what the fast path can run
# --------------------------------------------------------------------------------------------------
def _rope_type(cfg) -> str:
    rs = getattr(cfg, "rope_scaling", None) or {}
    rp = getattr(cfg, "rope_parameters", None) or {}
    t = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
    if t is None and isinstance(rp, dict):
        t = rp.get("rope_type", rp.get("type"))
    return t or "default"


def unsupported_reason(model) -> str | None:
    """``None`` if :class:`FastDecoder` can run ``model``, else why not (one line)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        return f"model type {mt!r} ({type(model).__name__}) is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if body is None or layers is None or getattr(model, "lm_head", None) is None:
        return f"{type(model).__name__} does not have the model.layers / lm_head structure of a Llama"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act={cfg.hidden_act!r} (the fast path implements SiLU-gated MLPs)"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return f"pretraining_tp={cfg.pretraining_tp}"
    if mt in ("mistral", "qwen2") and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt == "mistral"):
        return f"sliding-window attention (sliding_window={cfg.sliding_window})"
    if _rope_type(cfg) not in _ROPE_TYPES:
        return f"RoPE type {_rope_type(cfg)!r} (the fast path takes {', '.join(_ROPE_TYPES)})"
    if getattr(body, "rotary_emb", None) is None:
        return "the model has no shared rotary embedding module (model.rotary_emb)"
    devs = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devs) > 1 or any(d.type == "meta" for d in devs):
        return f"the model's weights are spread over {sorted(str(d) for d in devs)} (device map / offload)"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "the model is dispatched over several devices (device_map)"
    for i, blk in enumerate(layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            try:
                blk.get_submodule(part)
            except AttributeError:
                return f"block {i} has no {part}"
        if getattr(blk.self_attn, "q_norm", None) is not None:
            return "q / k norms in attention (Qwen3 / OLMo style) are not implemented"
    return None


# --------------------------------------------------------------------------------------------------
# output layer and tied embeddings
# --------------------------------------------------------------------------------------------------
class TiedQuantEmbedding(nn.Module):
    """Input embeddings read from a quantized tied lm_head (:class:`~quantkern.nn.QuantLinear`): row
    ``t`` of the embedding is column ``t`` of the lm_head's codes, dequantized on the fly. One copy of
    the weights serves both ends, as ``tie_word_embeddings`` means."""

    def __init__(self, head, padding_idx: int | None = None):
        super().__init__()
        from .formats.bitpack import unpack_cols

        self.head = [head]  # not a submodule: the lm_head owns the buffers (no second state-dict entry)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx
        z = unpack_cols(head.qzeros, head.bits, head.out_features).float()  # [G, N]
        s = head.scales.float()
        self.register_buffer("_zs", (z * s).t().contiguous(), persistent=False)  # [N, G]
        self.register_buffer("_s", s.t().contiguous(), persistent=False)
        self.register_buffer("_g", head.g_idx.long().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # the dequantized matrix (for code that reads .weight; costly)
        return self(torch.arange(self.num_embeddings, device=self._s.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from .formats.bitpack import unpack_rows

        head = self.head[0]
        flat = ids.reshape(-1)
        codes = unpack_rows(head.qweight.index_select(1, flat), head.bits, head.in_features).t().float()  # [T, K]
        s, zs = self._s.index_select(0, flat), self._zs.index_select(0, flat)  # [T, G]
        w = codes * s[:, self._g] - zs[:, self._g]
        return w.to(head.scales.dtype).reshape(*ids.shape, self.embedding_dim)


def quantize_output(model, bits: int = 8, group_size: int = 32, sym: bool = True, embeddings: bool = True,
                    scale_dtype: torch.dtype = torch.float32):
    """Quantize ``model.lm_head`` in place with RTN (``bits`` / ``group_size`` / ``sym``). If the
    input embeddings are tied to it and ``embeddings`` is true, they become a
    :class:`TiedQuantEmbedding` over the same quantized tensor (tied stays tied); untied embeddings
    are left as they are. Returns ``model``. W8 g32 sym is GGUF's Q8_0, W4 g32 sym its Q4_0.

    Raises ``ValueError`` if the lm_head is not a dense ``nn.Linear`` or cannot be packed."""
    from .algorithms.rtn import quantize_rtn
    from .core import WeightScheme
    from .nn import QuantLinear

    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"lm_head is a {type(head).__name__}, not a dense nn.Linear (already quantized?)")
    emb = model.get_input_embeddings()
    tied = isinstance(emb, nn.Embedding) and emb.weight.data_ptr() == head.weight.data_ptr()
    qw = quantize_rtn(head.weight, WeightScheme(bits, group_size, sym), scale_dtype)
    q = QuantLinear.from_quantized(qw, bias=head.bias, dtype=head.weight.dtype, name="lm_head")
    model.lm_head = q
    if tied and embeddings:
        model.model.embed_tokens = TiedQuantEmbedding(q, emb.padding_idx)
    elif tied:  # the embedding keeps the dense tensor: it is no longer tied to the (quantized) head
        emb.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = bool(tied and embeddings)
    return model


# --------------------------------------------------------------------------------------------------
# fused projections
# --------------------------------------------------------------------------------------------------
def _fuse(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)``, or None when they cannot be fused."""
    from .nn import QuantLinear

    if all(type(m) is nn.Linear for m in mods):
        if len({(m.weight.dtype, m.bias is None) for m in mods}) != 1:
            return None
        out = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=mods[0].bias is not None,
                        device=mods[0].weight.device, dtype=mods[0].weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([m.weight for m in mods]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([m.bias for m in mods]))
        return out.requires_grad_(False)
    if all(type(m) is QuantLinear for m in mods):
        if any(m.released for m in mods):
            return None
        keys = {(m.scheme, m.in_features, m.scales.dtype, m.bias is None, m.backend) for m in mods}
        if len(keys) != 1 or not all(torch.equal(m.g_idx, mods[0].g_idx) for m in mods[1:]):
            return None
        from .core import QuantizedWeight

        parts = [m.to_quantized() for m in mods]
        qw = QuantizedWeight(codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts], 1),
                             zeros=torch.cat([p.zeros for p in parts], 1), g_idx=parts[0].g_idx,
                             scheme=parts[0].scheme)
        bias = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
        try:
            return QuantLinear.from_quantized(qw, bias=bias, dtype=mods[0].scales.dtype, backend=mods[0].backend,
                                              name="+".join(m.name for m in mods))
        except ValueError:
            return None
    return None


@dataclass
class _Block:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: nn.Module | None  # fused, else the three below
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate_up: nn.Module | None
    gate: nn.Module
    up: nn.Module
    down: nn.Module


@dataclass
class DecodeStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    compile_s: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else float("nan")


# --------------------------------------------------------------------------------------------------
# the decoder
# --------------------------------------------------------------------------------------------------
class FastDecoder:
    """Static-cache, compiled decode of a Llama-family model (see the module docstring).

    ``FastDecoder(model, max_len=1024, batch_size=1, compile=True, fuse=True)``; raises
    ``ValueError`` with :func:`unsupported_reason` for a model it cannot run. ``compile`` may be
    True (inductor; CUDA graphs on GPU), False (eager: the same code, for checks) or a
    ``torch.compile`` mode string. The model's modules are used as they are (not copied) except the
    fused q/k/v and gate/up projections, which are built once here. ``int8_activations``: the C++ CPU
    kernels quantize each activation row per block of 32 to int8 and use integer dot products
    (llama.cpp's Q8_0 activations; faster where the fp32 kernels are compute-bound, a slightly different
    result: :func:`quantkern.kernels.cpu.ops.gemm`); other kernels are unaffected. The setting is made on
    the model's own quantized modules (the decoder does not copy them), so it holds for the model until
    a decoder with the other setting is built or :func:`quantkern.kernels.cpu.backend.int8_activations`
    switches it back. ``fused_step``: run each decode step as one C++ call through every block
    (:class:`quantkern.kernels.cpu.decode.FusedDecodeStep`: one parallel region, no fork/join per GEMM)
    instead of the compiled graph; ``None`` (default) does where it can when compiling on CPU (quantized
    fp32 models on the C++ CPU kernels; :attr:`fused_reason` says why not otherwise), ``True`` requires
    it (``ValueError`` where it cannot run), ``False`` never. Prefill always runs the graph.
    """

    def __init__(self, model, max_len: int = 1024, batch_size: int = 1, compile=True, fuse: bool = True,
                 dtype: torch.dtype | None = None, cpp_wrapper: bool = True, skip_guards: bool = True,
                 int8_activations: bool = False, fused_step: bool | None = None):
        why = unsupported_reason(model)
        if why:
            raise ValueError(f"FastDecoder cannot run this model: {why}")
        cfg = model.config
        body = model.model
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = dtype or body.norm.weight.dtype
        self.max_len, self.batch_size = int(max_len), int(batch_size)
        self.n_layers = len(body.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self.embed = body.embed_tokens
        self.norm_w = body.norm.weight.detach()
        self.head = model.lm_head
        self.vocab = cfg.vocab_size
        self.blocks: list[_Block] = []
        fused = 0
        for blk in body.layers:
            a, m = blk.self_attn, blk.mlp
            qkv = _fuse([a.q_proj, a.k_proj, a.v_proj]) if fuse else None
            gu = _fuse([m.gate_proj, m.up_proj]) if fuse else None
            fused += (qkv is not None) + (gu is not None)
            self.blocks.append(_Block(blk.input_layernorm.weight.detach(), blk.post_attention_layernorm.weight.detach(),
                                      qkv, a.q_proj, a.k_proj, a.v_proj, a.o_proj, gu, m.gate_proj, m.up_proj,
                                      m.down_proj))
        self.fused = fused
        from .nn import QuantLinear

        self.int8_activations = bool(int8_activations)
        for mod in self._linears():  # choose and build (repack) the kernels now, outside any graph
            if isinstance(mod, QuantLinear):
                mod.build_kernels(self.device, self.dtype, self.batch_size * self.max_len)
                if self.device.type == "cpu":  # either way: the modules may be shared with an earlier decoder
                    from .kernels.cpu.backend import int8_activations as use_int8

                    use_int8(mod, self.int8_activations)
        self.q_dim, self.kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.gqa = bool(self.n_kv != self.n_heads)
        with torch.no_grad():  # RoPE table from the model's own module: the numbers transformers uses
            pos = torch.arange(self.max_len, device=self.device)[None]
            dummy = torch.zeros(1, device=self.device, dtype=self.dtype)
            cos, sin = body.rotary_emb(dummy, position_ids=pos)
        self.cos, self.sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()
        # one tensor per layer (not views of one): each layer's kernels then have the same source code,
        # so inductor compiles them once instead of once per layer
        shape = (self.batch_size, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        self.key_valid = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=self.device)
        self.slots = torch.arange(self.max_len, device=self.device)
        # decode steps as one C++ call (quantkern_cpu::llama_decode) where the model allows it
        self.fused_step = None
        self.fused_reason = None
        if fused_step is None:
            fused_step = bool(compile) and self.device.type == "cpu"
            required = False
        else:
            required = bool(fused_step)
        if fused_step:
            from .kernels.cpu import decode as cpu_decode

            self.fused_reason = cpu_decode.unsupported_reason(self)
            if self.fused_reason is None:
                self.fused_step = cpu_decode.FusedDecodeStep(self)
            elif required:
                raise ValueError(f"fused_step=True, but the fused C++ decode step cannot run: {self.fused_reason}")
            else:
                logger.info("quantkern: decode steps run the compiled graph (the fused C++ step cannot: %s)",
                            self.fused_reason)
        if compile is True:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
        else:
            mode = compile if isinstance(compile, str) else None
        self._skip_guards = bool(compile) and skip_guards
        self.small_t = 1  # query lengths up to this use _attend, longer ones SDPA
        self.compiled = bool(compile)
        self._steps_run = 0
        if self.compiled:
            # inductor's C++ wrapper on CPU: the compiled step calls its ~10 kernels per layer from C++,
            # not from a generated Python function (that would be per-token Python work per layer)
            opts = {"cpp_wrapper": True} if self.device.type == "cpu" and cpp_wrapper else None
            self._step = torch.compile(self._decode_step, mode=mode if opts is None else None, fullgraph=True,
                                       dynamic=False, options=opts)
            # one prefill graph for every prompt length (dynamic shapes), not one compile per length
            self._prefill = torch.compile(self._prefill_step, fullgraph=True, dynamic=True)
        else:
            self._step, self._prefill = self._decode_step, self._prefill_step

    def _linears(self):
        for b in self.blocks:
            yield from (b.qkv,) if b.qkv is not None else (b.q, b.k, b.v)
            yield b.o
            yield from (b.gate_up,) if b.gate_up is not None else (b.gate, b.up)
            yield b.down
        yield self.head

    # --- the graph ------------------------------------------------------------------------------
    def _rms(self, x, w):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dt)

    def _rope(self, x, cos, sin):  # x [B, H, T, D]; cos / sin [B, 1, T, D]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def _attend(self, q, kc, vc, mask):
        """Attention for a few query positions (decode): the query heads sharing a KV head form one
        ``[r*T, D] x [D, S]`` product with it (no repeated K / V), softmax in fp32; inductor fuses the
        scaling, masking and softmax around two batched matmuls."""
        b, h, t, d = q.shape
        r = h // self.n_kv
        qg = q.reshape(b, self.n_kv, r * t, d)
        s = torch.matmul(qg, kc.transpose(-1, -2)).float() * self.scaling  # [B, Hkv, r*T, S]
        m = mask.expand(b, r, t, mask.shape[-1]).reshape(b, 1, r * t, mask.shape[-1])
        p = s.masked_fill(~m, float("-inf")).softmax(-1).to(vc.dtype)
        return torch.matmul(p, vc).reshape(b, h, t, d)

    def _forward(self, ids, slots, pos_ids, key_valid, all_logits: bool):
        """ids [B, T]; slots [T] (cache positions written); pos_ids [B, T] (RoPE positions);
        key_valid [B, S] (cache positions a row may attend to, before causality)."""
        b, t = ids.shape
        x = self.embed(ids)
        cos = self.cos[pos_ids].unsqueeze(1)
        sin = self.sin[pos_ids].unsqueeze(1)
        causal = self.slots[None, :] <= slots[:, None]  # [T, S]
        # a query always sees its own slot: a left-padding query (no valid key) gets no NaN row
        mask = ((causal[None] & key_valid[:, None, :]) | (self.slots[None, :] == slots[:, None])[None]).unsqueeze(1)
        for li, blk in enumerate(self.blocks):
            h = self._rms(x, blk.ln1)
            if blk.qkv is not None:
                q, k, v = blk.qkv(h).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
            else:
                q, k, v = blk.q(h), blk.k(h), blk.v(h)
            q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
            a = self._attend(q, kc, vc, mask) if t <= self.small_t else F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa)
            x = x + blk.o(a.transpose(1, 2).reshape(b, t, self.q_dim))
            h = self._rms(x, blk.ln2)
            if blk.gate_up is not None:
                g, u = blk.gate_up(h).chunk(2, dim=-1)
            else:
                g, u = blk.gate(h), blk.up(h)
            x = x + blk.down(F.silu(g) * u)
        if not all_logits:
            x = x[:, -1:]
        x = self._rms(x, self.norm_w)
        return self.head(x).float()

    def _decode_step(self, ids, slots, pos_ids, key_valid):
        logits = self._forward(ids, slots, pos_ids, key_valid, False)[:, -1]
        return logits, logits.argmax(-1)

    def _prefill_step(self, ids, slots, pos_ids, key_valid):
        logits = self._forward(ids, slots, pos_ids, key_valid, False)[:, -1]
        return logits, logits.argmax(-1)

    # --- driving it -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Reset the cache and run the prompt ``[B, T]`` (left padding marked by ``attention_mask``);
        returns ``(logits [B, V] of the last position, greedy next token [B])``."""
        b, t = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"this FastDecoder was built for batch {self.batch_size}, got {b}")
        if t >= self.max_len:
            raise ValueError(f"the prompt has {t} tokens; max_len is {self.max_len}")
        dev = self.device
        am = (torch.ones(b, t, dtype=torch.long, device=dev) if attention_mask is None
              else attention_mask.to(dev).long())
        self.key_valid.zero_()
        self.key_valid[:, :t] = am.bool()
        self._pos = (am.sum(1) - 1).clamp(min=0)  # next RoPE position per row, minus one
        pos_ids = (am.cumsum(1) - 1).clamp(min=0)
        self._t = t
        return self._prefill(input_ids.to(dev), self.slots[:t], pos_ids, self.key_valid)

    @torch.no_grad()
    def step(self, tok: torch.Tensor):
        """One decode step for tokens ``[B]``; returns ``(logits [B, V], greedy next token [B])``."""
        if self._t >= self.max_len:
            raise ValueError(f"the KV cache is full (max_len={self.max_len})")
        s = self._t
        self.key_valid[:, s] = True
        self._pos = self._pos + 1
        if self.fused_step is not None:
            out = self.fused_step(self.fused_step.embed(tok), s, self._pos.contiguous())
            logits = out if self.fused_step.has_head else self.head(out).float()
            self._t = s + 1
            return logits, logits.argmax(-1)
        args = (tok.view(-1, 1), self.slots[s:s + 1], self._pos.view(-1, 1), self.key_valid)
        if self._skip_guards and self._steps_run >= 2:
            # the decode graph has one cache entry, always called with tensors of the same shapes: its
            # guards (hundreds of weight tensors) cost more than a layer's kernels, so they are
            # checked for the first calls only
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                out = self._step(*args)
        else:
            out = self._step(*args)
        self._steps_run += 1
        self._t = s + 1
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask=None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id=None,
                 generator: torch.Generator | None = None, stats: DecodeStats | None = None) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` tokens, ``[B, T + n]`` (like transformers'
        ``generate``: rows that produced ``eos_token_id`` are padded with ``pad_token_id``; it stops
        when every row has). Greedy unless ``do_sample`` (temperature, top-k, top-p)."""
        b, t = input_ids.shape
        if t + max_new_tokens > self.max_len:
            raise ValueError(f"{t} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}")
        eos = _as_set(eos_token_id)
        eos_t = torch.tensor(sorted(eos), device=self.device) if eos else None
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        t0 = time.perf_counter()
        logits, tok = self.prefill(input_ids, attention_mask)
        if do_sample:
            tok = sample(logits, temperature, top_k, top_p, generator)
        t1 = time.perf_counter()
        out = [tok]
        done = torch.isin(tok, eos_t) if eos_t is not None else None
        for _ in range(max_new_tokens - 1):
            if done is not None and bool(done.all()):
                break
            logits, nxt = self.step(tok)
            if do_sample:
                nxt = sample(logits, temperature, top_k, top_p, generator)
            if done is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done = done | torch.isin(nxt, eos_t)
            out.append(nxt)
            tok = nxt
        t2 = time.perf_counter()
        if stats is not None:
            stats.prefill_s, stats.decode_s = t1 - t0, t2 - t1
            stats.prompt_tokens, stats.new_tokens = t, len(out) - 1
        return torch.cat([input_ids.to(self.device), torch.stack(out, 1)], 1)

    def warmup(self, prompt_len: int = 8) -> float:
        """Compile the prefill (for ``prompt_len`` tokens) and decode graphs now; returns the seconds."""
        t0 = time.perf_counter()
        ids = torch.zeros(self.batch_size, prompt_len, dtype=torch.long, device=self.device)
        _, tok = self.prefill(ids)
        self.step(tok)
        self.step(tok)
        return time.perf_counter() - t0


def _as_set(x) -> set:
    if x is None:
        return set()
    if isinstance(x, int):
        return {x}
    if isinstance(x, torch.Tensor):
        return set(x.flatten().tolist())
    return set(int(v) for v in x)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` drawn from ``logits [B, V]`` with temperature, top-k and top-p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sx, si = torch.sort(x, descending=True, dim=-1)
        cum = sx.softmax(-1).cumsum(-1)
        drop = cum - sx.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, si, sx.masked_fill(drop, float("-inf")))
    return torch.multinomial(x.softmax(-1), 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
_DECODERS: dict = {}


def decoder_for(model, max_len: int, batch_size: int = 1, compile=True, int8_activations: bool = False) -> FastDecoder:
    """A cached :class:`FastDecoder` for ``model`` (rebuilt when it needs more room, another batch size or
    another activation mode)."""
    key = id(model)
    d = _DECODERS.get(key)
    if (d is None or d.model is not model or d.max_len < max_len or d.batch_size != batch_size
            or d.compiled != bool(compile) or d.int8_activations != bool(int8_activations)):
        if d is not None:
            torch._dynamo.reset()
        d = FastDecoder(model, max_len=max(max_len, 256), batch_size=batch_size, compile=compile,
                        int8_activations=int8_activations)
        _DECODERS.clear()
        _DECODERS[key] = d
    return d


def generate_ids(model, input_ids: torch.Tensor, attention_mask=None, max_new_tokens: int = 32, fast: bool = True,
                 compile=True, stats: DecodeStats | None = None, int8_activations: bool = False, **kw) -> torch.Tensor:
    """Generate with the fast path when it can run ``model`` (else transformers' ``generate``, after one
    logged message saying why). ``kw``: do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id.
    ``int8_activations``: see :class:`FastDecoder` (the fast path only)."""
    why = unsupported_reason(model) if fast else "the fast path was turned off"
    if why is None:
        d = decoder_for(model, input_ids.shape[1] + max_new_tokens, input_ids.shape[0], compile, int8_activations)
        return d.generate(input_ids, max_new_tokens, attention_mask=attention_mask, stats=stats, **kw)
    if fast:
        logger.warning("quantkern: using transformers' generate (the fast decode path cannot run this model: %s)", why)
        if stats is not None:
            stats.notes.append(why)
    hf = {k: v for k, v in kw.items() if k in ("do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                                                "pad_token_id")}
    hf.pop("generator", None)
    if attention_mask is not None:
        hf["attention_mask"] = attention_mask
    return model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, **hf)
