"""Evaluation helpers: perplexity, the divergence from the dense model, and generation."""

from .divergence import Divergence, kl_divergence
from .perplexity import generate, perplexity, tokenize_text

__all__ = ["perplexity", "generate", "tokenize_text", "kl_divergence", "Divergence"]
