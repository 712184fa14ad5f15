"""Evaluation helpers: perplexity and generation."""

from .perplexity import generate, perplexity, tokenize_text

__all__ = ["perplexity", "generate", "tokenize_text"]
