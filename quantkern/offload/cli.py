"""Command-line options of the streaming path, added to ``quantkern quantize``.

``add_streaming_args(parser)`` adds ``--offload {none,cpu,disk}``, ``--resume/--no-resume`` and
``--max-memory``; ``run_streaming_from_args(args)`` runs :func:`~quantkern.offload.quantize_streaming`
with the ``quantize`` command's other options (model, method, bits, calibration text, out, ...).
``--offload none`` (the default) is the in-memory path and is not handled here.
"""

from __future__ import annotations

import argparse
import sys


def add_streaming_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models larger than memory")
    g.add_argument("--offload", choices=["none", "cpu", "disk"], default="none",
                   help="none: load the whole model (default); disk: stream one decoder block at a time from the "
                        "safetensors files; cpu: read the weights into CPU memory and move one block at a time "
                        "to --device. Both write the checkpoint shard by shard and can resume.")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted --offload run from its last finished block (default), or "
                        "discard it (--no-resume)")
    g.add_argument("--max-memory", default=None,
                   help="memory budget of the compute device, e.g. '20GiB' (a block that cannot fit is refused "
                        "before any work; activations stay on the CPU unless they fit next to a block)")


def _progress(info: dict) -> None:
    print(f"[quantkern] block {info['block'] + 1}/{info['num_blocks']} done in {info['seconds']:.1f} s, "
          f"about {info['eta_seconds']:.0f} s left", file=sys.stderr, flush=True)


def run_streaming_from_args(a, config) -> int:
    """Run the ``quantize`` command with ``--offload cpu|disk``. Raises ``ValueError`` for settings the
    streaming path does not take (a GGUF model, a format other than gptq or compressed-tensors)."""
    import torch

    from ..api.registry import needs_data
    from .source import resolve_model_dir
    from .stream import quantize_streaming

    if a.offload not in ("cpu", "disk"):
        raise ValueError(f"run_streaming_from_args needs --offload cpu or disk, got {a.offload!r}")
    if a.format not in ("gptq", "compressed-tensors"):
        raise ValueError(f"--offload writes gptq or compressed-tensors checkpoints, got --format {a.format}")
    if a.format == "compressed-tensors" and a.checkpoint_format is not None:
        raise ValueError(f"--checkpoint-format applies to --format gptq only, got {a.checkpoint_format!r}")
    if a.model in ("smollm2", "default") or str(a.model).endswith(".gguf"):
        raise ValueError("--offload needs a directory (or Hugging Face id) with safetensors weights, "
                         f"not {a.model!r}")
    path = resolve_model_dir(a.model)
    data, tok = None, None
    if needs_data(config):
        from transformers import AutoTokenizer

        from ..calibration import load_text, sample_windows
        from ..eval import tokenize_text

        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"{a.method} calibration needs the model's tokenizer in {path}: {e}") from None
        torch.manual_seed(a.seed)
        ids = tokenize_text(tok, load_text(a.calib_text, "calibration"))
        data = sample_windows(ids, a.nsamples, a.seq_len, seed=a.seed)
    out = quantize_streaming(path, config, data, a.out, device=a.device, offload=a.offload, resume=a.resume,
                             max_memory=a.max_memory, verbose=False,
                             checkpoint_format="compressed-tensors" if a.format == "compressed-tensors"
                             else a.checkpoint_format,
                             callback=_progress, overwrite=getattr(a, "overwrite", False))
    print(f"wrote {out}")
    return 0
