"""Every integer checkpoint format passes the same checks (tests/conformance.FormatConformance): its
storable schemes round-trip bit-identically, with the bytes formats.sizes predicts, and what it cannot
store is refused before anything is written (or, GGUF, re-quantized and reported). A new format gets
the suite by subclassing."""

import numpy as np
import pytest
import torch

from conformance import FormatConformance


class TestGPTQFormat(FormatConformance):
    format = "gptq"
    # (bits, group_size, sym, actorder, static_groups): every width, ragged groups, act-order either way
    STORABLE = ((4, 32, True, False, False), (3, 48, False, False, False), (2, -1, True, False, False),
                (8, 64, False, True, False), (4, 32, False, True, True))


class TestCompressedTensorsFormat(FormatConformance):
    format = "compressed-tensors"
    STORABLE = ((4, 32, True, False, False), (3, 64, False, False, False), (8, -1, True, False, False),
                (2, 32, False, True, True))
    REFUSED = {(4, 48, True, False, False): "does not divide in_features",
               (4, 32, True, True, False): "permuted g_idx"}


class TestAWQFormat(FormatConformance):
    format = "awq"
    STORABLE = ((4, 32, False, False, False), (4, 64, True, False, False))
    REFUSED = {(3, 32, False, False, False): "4-bit weights only", (4, 48, False, False, False): "does not divide",
               (4, 32, False, True, False): "no g_idx"}


class TestGGUFFormat(FormatConformance):
    """GGUF (llama.cpp), read back without quantkern: the ``gguf`` package's reader and dequantizer give
    the weights (the rows of ``attn_q`` / ``attn_k`` permuted back from llama.cpp's rotary layout, as its
    readers do), transformers' GGUF loader the forward.

    What the export stores, per 32-weight block (quantkern's scales are fp16 here, so every block
    scale ``d`` is its group's scale exactly): ``Q4_0`` ``d`` and ``q - zero + 8``, ``Q8_0`` ``d`` and
    ``q - zero``: the dequantized weight ``(q - zero) * d`` bit for bit; ``Q4_1`` ``d``, the codes as they
    are and the offset ``m = -zero * d`` rounded to fp16: ``q * d + m`` bit for bit, which is the
    dequantized weight but for that rounding (:meth:`assert_same_weight`)."""

    format = "gguf"
    # every scheme the export maps exactly; a ragged last group on the 32 grid needs a group size the
    # tiny Llama's 64 / 128 inputs do not allow (test_io_gguf.test_ragged_last_group_on_the_32_grid_is_exact)
    STORABLE = ((4, 32, True, False, False), (4, 64, False, False, False),  # Q4_0, Q4_1
                (3, 32, True, False, False), (3, -1, False, False, False), (2, 64, False, False, False),  # in 4-bit blocks
                (8, -1, True, False, False), (5, 64, False, False, False),  # Q8_0
                (4, 32, False, True, True))  # act-order with static groups: the groups stay in column order
    # not refused: re-quantized by the gguf package to the type of the scheme's bits and symmetry, and reported
    REQUANTIZED = {(4, 16, True, False, False): "Q4_0",  # a 32-column block spans two groups
                   (4, 48, False, False, False): "Q4_1",  # group boundaries off the 32 grid
                   (4, 32, True, True, False): "Q4_0", (3, 32, False, True, False): "Q4_1",  # act-order, permuted g_idx
                   (8, 32, False, False, False): "Q8_0"}  # 8-bit q - zero outside int8
    # the export's refusals (an architecture without GGUF names, in_features off the 32 grid) are not
    # schemes of the tiny Llama: test_io_gguf.test_gguf_export_refusals
    REFUSED = {}

    @staticmethod
    def _tensors(path) -> dict:
        gguf = pytest.importorskip("gguf")

        return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    @staticmethod
    def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        """Undo llama.cpp's q/k row permutation (its half-split rotary pairs -> HF's order)."""
        rows = w.shape[0]
        return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def read_back(self, path, model) -> dict:
        gguf = pytest.importorskip("gguf")

        cfg = model.config
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
        tensors = self._tensors(path)
        out = {}
        for name in self.quantized_layers(model):
            gname = names.get_name(name)
            t = tensors[f"{gname}.weight"]
            w = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            kind = gname.rpartition(".")[2]
            out[name] = self._unpermute(w, heads[kind]) if kind in heads else w
        return out

    def logits_back(self, path, x):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
        with torch.no_grad():
            return hf(x).logits

    def assert_same_weight(self, scheme, name, layer, weight):
        qw = layer.to_quantized()
        assert qw.scales.dtype == torch.float16, (scheme, name)  # the block scale d is fp16: exact
        bits, _, sym = scheme[:3]
        if bits > 4 or sym:  # Q8_0 / Q4_0
            return super().assert_same_weight(scheme, name, layer, weight)
        g = qw.g_idx.long()
        d, z = qw.scales.float()[g].t(), qw.zeros.float()[g].t()
        m = (-z * d).to(torch.float16).float()
        assert torch.equal(weight, qw.codes.float() * d + m), (scheme, name)  # Q4_1 as stored, bit for bit
        # against (q - zero) * d: m's fp16 rounding (half an fp16 ulp, 2**-11 relative; 2**-25 below fp16's
        # normal range) and the fp32 rounding of q * d + m (2**-24 relative), nothing more
        ours = qw.dequantize(torch.float32)
        bound = (z * d).abs() * 2**-11 + 2**-25 + weight.abs() * 2**-24
        assert bool(((weight - ours).abs() <= bound).all()), (scheme, name, float((weight - ours).abs().max()))

    def logits_tolerance(self, scheme) -> float:
        # exact blocks: transformers' dense Linear vs the reference kernel's matmul (test_io_gguf's
        # test_transformers_loads_export tolerances); Q4_1 also carries m's fp16 rounding
        bits, _, sym = scheme[:3]
        return 2e-3 if bits <= 4 and not sym else 1e-5
