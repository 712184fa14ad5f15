"""The ``quantkern`` command line: quantize, eval, generate, inspect, export."""

from __future__ import annotations

import argparse
import json
import logging
import sys


METHODS = ("gptq", "rtn", "awq", "fp8", "w8a8", "smoothquant")


def _config(a):
    """The config of ``--method`` from the arguments (validated now, before any loading)."""
    from . import AWQConfig, FP8Config, GPTQConfig, RTNConfig, SmoothQuantConfig, W8A8Config

    skip = tuple(a.skip or ("lm_head",))
    overrides = parse_overrides(getattr(a, "override", None) or ())
    common = dict(bits=a.bits, group_size=a.group_size, sym=not a.asym, skip_layers=skip, overrides=overrides)
    if a.method == "rtn":
        return RTNConfig(mse=a.mse, **common)
    if a.method == "gptq":
        return GPTQConfig(actorder=a.act_order, static_groups=a.static_groups, damp_percent=a.damp_percent,
                          mse=a.mse, nsamples=a.nsamples, seq_len=a.seq_len, device=a.device,
                          expert_calibration=a.expert_calibration, expert_fallback=a.expert_fallback,
                          min_expert_tokens=a.min_expert_tokens, **common)
    calib = dict(skip_layers=skip, device=a.device, overrides=overrides)
    if a.method == "awq":
        return AWQConfig(bits=a.bits, group_size=a.group_size, zero_point=not a.sym, **calib)
    if a.method == "fp8":
        return FP8Config(act_dtype=None if a.weight_only else "float8_e4m3fn",
                         weight_method="gptq" if a.fp8_gptq else "rtn", damp_percent=a.damp_percent,
                         actorder=a.act_order, **calib)
    if a.method == "w8a8":
        return W8A8Config(**calib)
    return SmoothQuantConfig(alpha=a.alpha, **calib)


def _planner(a, fmt: str):
    """The :class:`~quantkern.BudgetPlanner` of ``--target-bpw`` / ``--target-size`` (None without
    either), validated before any loading."""
    if getattr(a, "target_bpw", None) is None and getattr(a, "target_size", None) is None:
        return None
    from . import BudgetPlanner
    from .api.budget import default_candidates

    if a.method not in ("gptq", "rtn"):
        raise ValueError(f"--target-bpw / --target-size plan integer weight-only schemes: use --method gptq or rtn, "
                         f"not {a.method}")
    if getattr(a, "offload", "none") != "none":
        raise ValueError("--target-bpw / --target-size measure the whole model in memory; they do not combine "
                         "with --offload")

    def ints(text, what):
        try:
            return tuple(int(v) for v in str(text).split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None

    sym = {"both": (True, False), "sym": (True,), "asym": (False,)}[a.candidate_sym]
    cands = default_candidates(ints(a.candidate_bits, "--candidate-bits"), ints(a.candidate_groups,
                                                                              "--candidate-groups"), sym)
    cache = a.sensitivity_cache
    return BudgetPlanner(target_bpw=a.target_bpw, target_size=a.target_size, candidates=cands, format=fmt,
                         fisher_samples=a.fisher_samples, cache_dir=False if cache == "none" else cache)


def parse_overrides(items) -> tuple:
    """``--override PATTERN:KEY=VALUE[,KEY=VALUE...]`` (repeatable) -> the configs' ``overrides``
    (``(pattern, {key: value})`` pairs, first match wins); values are ints, floats, true / false or
    strings. Raises ``ValueError`` naming a malformed item."""
    out = []
    for item in items:
        pattern, sep, rest = item.rpartition(":")
        pairs = [p.strip() for p in rest.split(",") if p.strip()]
        if not sep or not pattern or not pairs or any("=" not in p for p in pairs):
            raise ValueError(f"--override {item!r}: expected PATTERN:KEY=VALUE[,KEY=VALUE...], "
                             "e.g. '*.down_proj:bits=8' or '*.self_attn.*:bits=8,group_size=64'")
        settings = {}
        for p in pairs:
            k, _, v = p.partition("=")
            settings[k.strip()] = _value(v.strip())
        out.append((pattern, settings))
    return tuple(out)


def _value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


_OVERWRITE_HELP = ("replace a previous checkpoint at --out (one holding only the files quantkern writes); "
                   "anything else there is refused either way")


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf file, a directory or a HF id")
    p.add_argument("--method", choices=list(METHODS), default="gptq",
                   help="gptq, rtn, awq (int weight-only); fp8 (W8A8 or --weight-only); w8a8, smoothquant (int8)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true", help="gptq / rtn: asymmetric (zero point per group)")
    p.add_argument("--sym", action="store_true", help="awq: symmetric (AWQ has a zero point by default)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--damp-percent", type=float, default=0.01)
    p.add_argument("--mse", action="store_true", help="search a clipping ratio per group")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--calib-text", default="builtin", help="'builtin', a .txt file or hf:<dataset>[:<config>]")
    p.add_argument("--skip", action="append", default=None, help="module name pattern to keep dense (repeatable)")
    p.add_argument("--override", action="append", default=None, metavar="PATTERN:KEY=VALUE[,...]",
                   help="per-layer settings for the modules matching PATTERN (repeatable, first match wins), "
                        "e.g. '*.down_proj:bits=8' or '*.self_attn.*:bits=8,group_size=64'")
    g = p.add_argument_group("MoE experts (gptq)")
    g.add_argument("--expert-calibration", choices=["routed", "all"], default="routed",
                   help="each expert's statistics from the tokens routed to it (default) or from every token")
    g.add_argument("--expert-fallback", choices=["all_tokens", "rtn"], default="all_tokens",
                   help="for an expert routed fewer than --min-expert-tokens: calibrate it on every token "
                        "(default) or round it with RTN")
    g.add_argument("--min-expert-tokens", type=int, default=None,
                   help="the fallback threshold (default: the projection's in_features)")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant: migration strength in [0, 1]")
    p.add_argument("--weight-only", action="store_true", help="fp8: weight-only (activations stay in bf16/fp16)")
    p.add_argument("--fp8-gptq", action="store_true", help="fp8: round the weights with GPTQ (needs calibration)")
    p.add_argument("--format", default=None,
                   help="gptq, awq, compressed-tensors or gguf (default: gptq for int weight-only methods, "
                        "compressed-tensors for fp8 / w8a8 / smoothquant)")
    p.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--device-map", default=None,
                   help="spread the blocks over devices: auto, balanced, sequential or a JSON {module: device}")
    p.add_argument("--rotate", action="store_true",
                   help="fold norms and random Hadamard rotations into the model before quantizing (Llama-like "
                        "models; the checkpoint stays standard; see quantkern.transforms.rotation)")
    g = p.add_argument_group("mixed precision under a size budget (gptq / rtn; see quantkern.BudgetPlanner)")
    g.add_argument("--target-bpw", type=float, default=None,
                   help="choose a scheme per Linear so the quantized layers store this many bits per weight "
                        "(codes, scales, zeros, g_idx), e.g. 3.5; --bits / --group-size / --asym are ignored")
    g.add_argument("--target-size", default=None, help="the same for the whole checkpoint's size, e.g. 60MiB or 20GiB")
    g.add_argument("--candidate-bits", default="2,3,4,8", help="bit widths to choose from (default 2,3,4,8)")
    g.add_argument("--candidate-groups", default="32,64,128", help="group sizes to choose from (-1: per channel)")
    g.add_argument("--candidate-sym", choices=["both", "sym", "asym"], default="both")
    g.add_argument("--fisher-samples", type=int, default=16,
                   help="calibration windows for the loss-gradient weights of the sensitivity (0: unweighted)")
    g.add_argument("--sensitivity-cache", default=None,
                   help="directory of cached measurements (default $QUANTKERN_CACHE or ~/.cache/quantkern, "
                        "then sensitivity/; 'none': do not cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (a .gguf file for --format gguf): new or empty")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    from .offload.cli import add_streaming_args

    add_streaming_args(p)  # --offload {none,cpu,disk}, --resume/--no-resume, --max-memory


def cmd_quantize(a) -> int:
    import torch

    from . import save_quantized
    from .api.registry import needs_data, quantizer_for
    from .calibration import load_text, sample_windows
    from .eval import tokenize_text
    from .io.save import check_save_destination
    from .models import load_model

    config = _config(a)  # built (and so validated) before any time goes into loading the model
    fmt = a.format or ("gptq" if a.method in ("gptq", "rtn", "awq") else "compressed-tensors")
    device_map = _device_map(a)
    planner = _planner(a, fmt)
    check_save_destination(a.out, fmt, a.overwrite)  # refused now, not after calibration
    if getattr(a, "rotate", False) and getattr(a, "offload", "none") != "none":
        raise ValueError("--rotate needs the whole model in memory; it does not combine with --offload")
    if getattr(a, "offload", "none") != "none":  # stream block by block from the files, resumable
        if device_map is not None:
            raise ValueError("--offload streams one block at a time through --device; it does not take --device-map")
        from .offload.cli import run_streaming_from_args

        a.format = fmt
        return run_streaming_from_args(a, config)
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model, device="cpu" if device_map is not None else (a.device or "cpu"))
    if getattr(a, "rotate", False):
        from .transforms import rotate

        rotate(model, seed=a.seed)  # an unsupported family is refused here, before calibration
    if device_map is not None:
        from .devices import dispatch

        model = dispatch(model, device_map)
    data = None
    if needs_data(config) or planner is not None:
        ids = tokenize_text(tok, load_text(a.calib_text, "calibration"))
        data = sample_windows(ids, a.nsamples, a.seq_len, seed=a.seed)
    if planner is not None:
        plan = planner.plan(model, data, config, tokenizer=tok)
        config = plan.config  # (the planner printed its summary)
    q = quantizer_for(config)(model, config, tokenizer=tok)
    q.quantize(data, export_format=fmt)  # a format that cannot hold the result fails before calibration
    path = save_quantized(model, a.out, tokenizer=tok, format=fmt, checkpoint_format=a.checkpoint_format,
                          overwrite=a.overwrite)
    print(f"wrote {path}")
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity of a model or checkpoint on held-apart text")
    p.add_argument("model", help="a quantized checkpoint directory, or a dense model ('smollm2', .gguf, HF id)")
    p.add_argument("--text", default="builtin", help="'builtin' (the eval half), a .txt file or hf:<dataset>")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", default=None, help="auto, balanced, sequential or a JSON {module: device}")
    p.add_argument("--reference", default=None,
                   help="the dense model to compare with ('smollm2', a .gguf, a directory or a HF id): adds the "
                        "KL divergence, top-1 agreement and delta perplexity on the same tokens (llama.cpp's "
                        "--kl-divergence)")
    p.add_argument("--tasks", default=None,
                   help="lm-eval tasks, comma-separated (needs lm-eval): the model through lm-eval's HF adapter")
    p.add_argument("--include-path", default=None, help="a directory of lm-eval task YAML files (local tasks)")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)


def _device_map(a):
    from .devices import parse_device_map

    text = getattr(a, "device_map", None)
    if text is None:
        return None
    return parse_device_map(text)


def _load_any(path: str, device: str, device_map=None):
    from pathlib import Path

    from .models import load_model

    from .io.config import read_config_json

    cfg = Path(path).expanduser() / "config.json"
    if cfg.is_file() and "quantization_config" in read_config_json(cfg, "config.json"):
        from transformers import AutoTokenizer

        from . import load_quantized

        return load_quantized(path, device=device, device_map=device_map), AutoTokenizer.from_pretrained(path)
    model, tok = load_model(path, device=device if device_map is None else "cpu")
    if device_map is not None:
        from .devices import dispatch

        model = dispatch(model, device_map)
    return model, tok


def cmd_eval(a) -> int:
    from .calibration import load_text
    from .eval import perplexity, tokenize_text

    model, tok = _load_any(a.model, a.device, _device_map(a))
    if a.tasks is not None:
        from .eval.harness import evaluate_tasks

        limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
        res = evaluate_tasks(model, tok, a.tasks, include_path=a.include_path, limit=limit,
                             num_fewshot=a.num_fewshot, batch_size=a.batch_size)
        print(json.dumps({"model": a.model, "tasks": res}, default=float))
        return 0
    ids = tokenize_text(tok, load_text(a.text, "eval"))
    if a.reference is not None:
        from .eval import kl_divergence

        reference, _ = _load_any(a.reference, a.device, _device_map(a))
        d = kl_divergence(model, reference, ids, seq_len=a.seq_len, max_windows=a.max_windows)
        print(json.dumps({"model": a.model, "reference": a.reference, **d.to_dict()}))
        return 0
    ppl = perplexity(model, ids, seq_len=a.seq_len, max_windows=a.max_windows)
    print(json.dumps({"model": a.model, "perplexity": round(ppl, 4), "tokens": int(ids.numel())}))
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="generation from a model or checkpoint (greedy unless --sample)")
    p.add_argument("model")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", default=None, help="auto, balanced, sequential or a JSON {module: device}")
    p.add_argument("--decode", choices=["fast", "eager", "transformers"], default="fast",
                   help="fast (default): static KV cache, prefill under torch.compile (compiles first), each decode "
                        "step one C++ call on CPU for quantized fp32 models (else the compiled step); eager: the "
                        "same code uncompiled; transformers: model.generate. A model the fast path cannot run "
                        "uses transformers, with a message saying why")
    p.add_argument("--quantize-head", choices=["none", "w8", "w4"], default="none",
                   help="quantize a dense lm_head (RTN g32 sym; tied embeddings stay tied) before generating")
    p.add_argument("--int8-activations", action="store_true",
                   help="fast / eager decode on CPU: quantize activations to int8 per block of 32 (as llama.cpp "
                        "does for Q4_0 / Q8_0) and use the integer dot-product kernels")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def cmd_generate(a) -> int:
    from .eval import generate
    from .generation import DecodeStats, quantize_output

    model, tok = _load_any(a.model, a.device, _device_map(a))
    if a.quantize_head != "none":
        quantize_output(model, bits=int(a.quantize_head[1:]), group_size=32)
    stats = DecodeStats()
    print(generate(model, tok, a.prompt, a.max_new_tokens, decode=a.decode, do_sample=a.sample,
                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stats=stats,
                   int8_activations=a.int8_activations))
    if a.decode != "transformers" and stats.new_tokens:
        print(f"[{a.decode} decode: prefill {stats.prompt_tokens} tokens {stats.prefill_s:.2f} s, "
              f"{stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="describe a checkpoint and check its consistency without loading the model")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--layers", action="store_true", help="one line per quantized layer: scheme, bytes, bits per weight")


def cmd_inspect(a) -> int:
    from .io import format_inspection, inspect_checkpoint

    info = inspect_checkpoint(a.path)
    print(json.dumps(info, indent=2, default=str) if a.json else format_inspection(info, layers=a.layers))
    return 0 if info.get("consistent", True) else 1


def _add_export(sub):
    p = sub.add_parser("export", help="re-write a quantized checkpoint in another format")
    p.add_argument("path", help="a quantized checkpoint directory")
    p.add_argument("--format", required=True, help="gptq, awq, compressed-tensors or gguf")
    p.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default=None)
    p.add_argument("--out", required=True, help="output directory (a .gguf file for --format gguf): new or empty")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def cmd_export(a) -> int:
    from transformers import AutoTokenizer

    from . import load_quantized, save_quantized
    from .io.save import check_save_destination

    check_save_destination(a.out, a.format, a.overwrite)  # before the checkpoint is read
    model = load_quantized(a.path)
    try:
        tok = AutoTokenizer.from_pretrained(a.path)
    except (OSError, ValueError):
        tok = None
    path = save_quantized(model, a.out, tokenizer=tok, format=a.format, checkpoint_format=a.checkpoint_format,
                          overwrite=a.overwrite)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkern", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_quantize, _add_eval, _add_generate, _add_inspect, _add_export):
        add(sub)
    return parser


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    try:
        if getattr(a, "device", None) is not None:  # before any loading: a missing GPU is one line, early
            from .env import check_device

            check_device(a.device)
        cmds = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect,
                "export": cmd_export}
        return cmds[a.cmd](a)
    except (ValueError, OSError, TypeError, RuntimeError, ImportError) as e:
        if a.verbose:
            import traceback

            traceback.print_exc()
        print(f"quantkern {a.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The error as one line: its message (type name when it has none), line breaks folded."""
    text = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


if __name__ == "__main__":
    sys.exit(main())
