"""Mixed precision under a size budget (issue #16): measure each weight site's sensitivity once, then
choose a scheme per site so that the checkpoint meets a size.

    planner = BudgetPlanner(target_bpw=3.5)                      # or target_size="60MiB"
    plan = planner.plan(model, data, GPTQConfig(actorder=True))  # measure (cached), allocate
    GPTQQuantizer(model, plan.config).quantize(data)             # or prepare(model, plan.config) ...
    save_quantized(model, out)                                   # GPTQ with `dynamic` overrides

``plan.config`` is an ordinary :class:`~quantkern.api.config.GPTQConfig` (or ``RTNConfig``) whose
per-layer ``overrides`` name every planned Linear, so both front doors, the CLI and every checkpoint
writer take it as they take any config.

- **Candidates**: by default 2 / 3 / 4 / 8 bits x group 32 / 64 / 128 x sym / asym (24). A site keeps
  only those its shape packs and the chosen format can store (:func:`~quantkern.io.export_rules.can_store`);
  the user's overrides are constraints (an override's keys fix those settings on the sites it matches;
  an override none of the candidates satisfies pins the site to the override's own scheme), and
  ``skip_layers`` stay dense.
- **Size** (:mod:`quantkern.formats.sizes`): bits per weight = 8 x the bytes the format stores for the
  quantized layers (codes, scales, zeros, ``g_idx``) / the weights they replace. ``target_size`` is the
  whole checkpoint: the dense tensors (embeddings, norms, biases, ``lm_head``) at the size the model
  holds them, plus the quantized layers.
- **Sensitivity** (:class:`Sensitivity`): one pass over the decoder blocks on the calibration data,
  each block fed the full-precision outputs of the one before; for every site the Hessian GPTQ
  collects gives every candidate's output error in one stacked sweep
  (:func:`~quantkern.algorithms.sensitivity.candidate_errors`). Each output channel's error is
  weighted by the mean squared gradient of the language-model loss there (``fisher_samples``
  sequences, one backward pass of the dense model), so that errors of different layers and blocks are
  in one unit, the loss: the weighting is how the interactions between blocks enter. Results are
  cached on disk under a key of the model, the data and the settings: a new budget re-plans in
  milliseconds.
- **Allocation** (:func:`~quantkern.algorithms.sensitivity.allocate`): a multiple-choice knapsack over
  the sites (Lagrangian greedy on each site's convex hull, then a top-up).

Fused MoE experts modules are not planned yet: a model with them is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..algorithms.gptq import GPTQ
from ..algorithms.sensitivity import Option, allocate, candidate_errors
from ..calibration import group_batches, normalize_calibration_data, run_block
from ..calibration.loop import run_blocks
from ..core import WeightScheme
from ..formats.sizes import SIZED_FORMATS, bits_per_weight, overhead_bytes, stored_bytes
from ..io.export_rules import can_store
from ..io.files import parse_size
from .config import GPTQConfig, RTNConfig, WeightOnlyConfig
from .quantizers import GPTQQuantizer
from .targets import linear_problem, matches

logger = logging.getLogger("quantkern")

DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZES = (32, 64, 128)


def default_candidates(bits=DEFAULT_BITS, group_sizes=DEFAULT_GROUP_SIZES, sym=(True, False)) -> tuple[WeightScheme, ...]:
    """Every ``bits x group_size x sym`` combination (act-order is the base config's)."""
    return tuple(WeightScheme(b, g, s) for b in bits for g in group_sizes for s in sym)


def parse_target_size(size) -> int:
    """``"20GiB"`` / ``"60MB"`` / an int -> bytes (``ValueError`` naming the value otherwise)."""
    return parse_size(size, "target_size")


def _scheme_key(s: WeightScheme) -> tuple:
    return (s.bits, s.group_size, s.sym)


@dataclass
class SiteChoice:
    """What the plan chose for one Linear: its scheme, bytes and estimated error (None: pinned)."""

    name: str
    in_features: int
    out_features: int
    scheme: WeightScheme
    bytes: int
    error: float | None
    pinned: bool = False


@dataclass
class Sensitivity:
    """The measurement a plan is made from: ``errors[site][i]`` is candidate ``i``'s estimated loss
    increase (None where the site cannot take it). Saved as JSON (:meth:`save` / :meth:`load`)."""

    key: str
    candidates: tuple[WeightScheme, ...]
    errors: dict[str, list[float | None]]
    seconds: float = 0.0
    fisher_tokens: int = 0
    calibration_tokens: int = 0

    def save(self, path) -> Path:
        """Write atomically to ``path`` (a new file or one this class wrote)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = {"format": "quantkern-sensitivity", "version": 1, "quantkern": __version__, "key": self.key,
             "candidates": [list(_scheme_key(s)) for s in self.candidates], "errors": self.errors,
             "seconds": self.seconds, "fisher_tokens": self.fisher_tokens,
             "calibration_tokens": self.calibration_tokens}
        fd, tmp = tempfile.mkstemp(prefix=".sensitivity-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(d, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> "Sensitivity":
        """Read a file :meth:`save` wrote; ``ValueError`` naming the file for anything else."""
        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != "quantkern-sensitivity" or d.get("version") != 1:
                raise ValueError("not a quantkern sensitivity file (version 1)")
            cands = tuple(WeightScheme(int(b), int(g), bool(s)) for b, g, s in d["candidates"])
            errors = {str(k): [None if e is None else float(e) for e in v] for k, v in d["errors"].items()}
            if any(len(v) != len(cands) for v in errors.values()):
                raise ValueError("an error list does not match the candidates")
            if any(e is not None and not (math.isfinite(e) and e >= 0) for v in errors.values() for e in v):
                raise ValueError("an error is negative or not finite")
            return cls(str(d["key"]), cands, errors, float(d.get("seconds", 0.0)), int(d.get("fisher_tokens", 0)),
                       int(d.get("calibration_tokens", 0)))
        except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the sensitivity file: {e}") from None


@dataclass
class BudgetPlan:
    """The outcome of :meth:`BudgetPlanner.plan`: the config to quantize with and what it will cost."""

    config: WeightOnlyConfig
    format: str
    sites: dict[str, SiteChoice]
    dense_bytes: int
    sensitivity: Sensitivity
    budget_bytes: int = 0  # what the quantized layers may take
    plan_seconds: float = 0.0
    measured: bool = field(default=False)  # this plan() call measured (False: taken from the cache)

    @property
    def quantized_bytes(self) -> int:
        return sum(c.bytes for c in self.sites.values())

    @property
    def weights(self) -> int:
        return sum(c.in_features * c.out_features for c in self.sites.values())

    @property
    def bpw(self) -> float:
        """Bits per quantized weight the checkpoint will store (:mod:`quantkern.formats.sizes`)."""
        return bits_per_weight(self.quantized_bytes, self.weights)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.dense_bytes

    @property
    def estimated_error(self) -> float:
        return sum(c.error for c in self.sites.values() if c.error is not None)

    def schemes(self) -> dict[str, int]:
        """``{scheme description: number of sites}``."""
        return dict(Counter(c.scheme.describe() for c in self.sites.values()).most_common())

    def summary(self) -> str:
        mix = "; ".join(f"{n} x {d}" for d, n in self.schemes().items())
        return (f"planned {len(self.sites)} Linear layers at {self.bpw:.3f} bits per weight "
                f"({self.quantized_bytes / 2**20:.2f} MiB quantized + {self.dense_bytes / 2**20:.2f} MiB dense = "
                f"{self.total_bytes / 2**20:.2f} MiB, format {self.format}): {mix}; "
                f"{'measured' if self.measured else 'sensitivity from the cache'} "
                f"({self.sensitivity.seconds:.0f} s to measure), planned in {self.plan_seconds * 1e3:.0f} ms")


class BudgetPlanner:
    """Chooses a scheme per weight site so the checkpoint meets ``target_bpw`` (bits per quantized
    weight) or ``target_size`` (bytes of the whole checkpoint, e.g. ``"20GiB"``); see the module text.

    ``candidates``: the schemes to choose from (default :func:`default_candidates`); ``format``: the
    checkpoint format the plan must fit (``"gptq"`` or ``"compressed-tensors"``); ``fisher_samples``:
    calibration sequences for the loss-gradient weights (0: unweighted output errors);
    ``cache_dir``: where measurements are kept (default ``$QUANTKERN_CACHE`` or
    ``~/.cache/quantkern``, then ``sensitivity/``; ``False``: no cache)."""

    def __init__(self, target_bpw: float | None = None, target_size=None, candidates=None, format: str = "gptq",
                 fisher_samples: int = 16, cache_dir=None, verbose: bool = True):
        if (target_bpw is None) == (target_size is None):
            raise ValueError("give exactly one of target_bpw (bits per quantized weight) and target_size (bytes)")
        if target_bpw is not None and (isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float))
                                       or not 1 <= target_bpw <= 16):
            raise ValueError(f"target_bpw must be a number of bits per weight in [1, 16], got {target_bpw!r}")
        self.target_bpw = None if target_bpw is None else float(target_bpw)
        self.target_size = None if target_size is None else parse_target_size(target_size)
        cands = default_candidates() if candidates is None else tuple(candidates)
        if not cands or not all(isinstance(s, WeightScheme) for s in cands):
            raise ValueError(f"candidates must be a non-empty list of WeightScheme, got {candidates!r}")
        if len({_scheme_key(s) for s in cands}) != len(cands):
            raise ValueError("candidates hold the same (bits, group_size, sym) twice")
        self.candidates = tuple(WeightScheme(s.bits, s.group_size, s.sym) for s in cands)
        if format not in SIZED_FORMATS:
            raise ValueError(f"the size-budget planner writes format {' or '.join(map(repr, SIZED_FORMATS))} (the "
                             f"formats that store a different scheme per layer), got {format!r}")
        self.format = format
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 0:
            raise ValueError(f"fisher_samples must be an int >= 0, got {fisher_samples!r}")
        self.fisher_samples = fisher_samples
        self.cache_dir = cache_dir
        self.verbose = verbose

    # -- the plan ----------------------------------------------------------------------------------
    def plan(self, model: nn.Module, data, config: WeightOnlyConfig | None = None, tokenizer=None,
             sensitivity: Sensitivity | None = None) -> BudgetPlan:
        """Measure (or take from the cache, or from ``sensitivity``) and allocate; returns a
        :class:`BudgetPlan` whose ``config`` quantizes ``model`` to the budget. The model is left as it was.

        Everything that can be refused without data is refused before the measurement: an unsupported
        base config or format, MoE experts, a budget below the smallest plan or a plan the format
        cannot hold (``ValueError`` naming it)."""
        config = GPTQConfig() if config is None else config
        if type(config) not in (GPTQConfig, RTNConfig):
            raise ValueError(f"the size-budget planner plans GPTQConfig or RTNConfig, got {type(config).__name__}")
        if self.format == "compressed-tensors" and config.any_layer("actorder") and not config.static_groups:
            raise ValueError("compressed-tensors cannot store act-order with a permuted g_idx: plan with "
                             "actorder=True and static_groups=True, or format='gptq'")
        q = GPTQQuantizer(model, _measure_config(config), verbose=False)
        q.plan_blocks()
        if isinstance(config, RTNConfig):  # RTN would quantize Linears outside the blocks, unmeasured
            from .targets import plan_targets

            outside = [n for n in plan_targets(model, config.skip_layers, config.bits, config.group_size,
                                               layer_config=config.for_layer).quantize if n not in q.plan.quantize]
            if outside:
                raise ValueError(f"the size-budget planner plans the Linears inside the decoder blocks; "
                                 f"{', '.join(outside[:4])} would be quantized outside them: add them to skip_layers")
        if q.plan.experts:
            raise ValueError(f"the size-budget planner does not plan fused MoE experts modules yet "
                             f"({', '.join(list(q.plan.experts)[:3])}...); keep them out with skip_layers, or "
                             "quantize with one scheme")
        names = list(q.plan.quantize)
        linears = dict(q.plan.quantize)
        scale_bytes = torch.empty((), dtype=config.torch_scale_dtype).element_size()
        options, pinned = {}, {}
        for name in names:
            lin = linears[name]
            k, n = lin.in_features, lin.out_features
            c = config.for_layer(name)
            fixed = _override_keys(config, name)
            allowed = [i for i, s in enumerate(self.candidates)
                       if all(getattr(c, key) == getattr(s, key) for key in fixed if key in ("bits", "group_size", "sym"))
                       and linear_problem(k, n, s.bits, s.group_size) is None
                       and can_store(self.format, _with_order(s, c), k, n, _permuted(c)) is None]
            if allowed:
                options[name] = allowed
            else:
                s = c.scheme()
                why = linear_problem(k, n, s.bits, s.group_size) or can_store(self.format, s, k, n, _permuted(c))
                if why:
                    raise ValueError(f"{name}: no candidate scheme fits it and its own settings ({s.describe()}) "
                                     f"cannot be stored: {why}")
                pinned[name] = SiteChoice(name, k, n, s, stored_bytes(self.format, s, k, n, scale_bytes), None, True)
        dense = _dense_bytes(model, names) + overhead_bytes(self.format) * len(names)
        weights = sum(linears[nm].in_features * linears[nm].out_features for nm in names)
        if self.target_bpw is not None:
            budget = int(self.target_bpw * weights / 8)
        else:
            budget = self.target_size - dense
            if budget <= 0:
                raise ValueError(f"target_size {self.target_size} bytes is below the dense tensors alone "
                                 f"({dense} bytes: embeddings, norms, lm_head ...)")
        sizes = {name: [stored_bytes(self.format, self.candidates[i], linears[name].in_features,
                                     linears[name].out_features, scale_bytes) for i in opts]
                 for name, opts in options.items()}
        smallest = sum(min(v) for v in sizes.values()) + sum(p.bytes for p in pinned.values())
        if smallest > budget:
            raise ValueError(f"the budget is below the smallest plan the candidates allow: "
                             f"{bits_per_weight(smallest, weights):.3f} bits per weight "
                             f"({(smallest + dense) / 2**20:.2f} MiB with the dense tensors); "
                             f"asked for {bits_per_weight(budget, weights):.3f}")
        measured = False
        if sensitivity is None:
            key = self._key(model, data, config, tokenizer, names)
            sensitivity = self._cached(key)
            if sensitivity is None:
                sensitivity = self.measure(model, data, config, tokenizer, key=key)
                measured = True
                self._store(sensitivity)
        t1 = time.perf_counter()
        idx = {_scheme_key(s): i for i, s in enumerate(sensitivity.candidates)}
        site_opts = []
        for name, opts in options.items():
            errs = sensitivity.errors.get(name)
            if errs is None:
                raise ValueError(f"the sensitivity measurement has no entry for {name}: it was made for another "
                                 "model or skip_layers")
            row = []
            for i, b in zip(opts, sizes[name]):
                j = idx.get(_scheme_key(self.candidates[i]))
                e = None if j is None else errs[j]
                if e is None:
                    raise ValueError(f"the sensitivity measurement has no error for {name} at "
                                     f"{self.candidates[i].describe()}")
                row.append(Option(b, e))
            site_opts.append(row)
        # every uniform scheme that each site can take is a seed: the plan is never worse than one of them
        seeds = [[opts.index(j) for opts in options.values()] for j in range(len(self.candidates))
                 if all(j in opts for opts in options.values())]
        chosen = allocate(site_opts, budget - sum(p.bytes for p in pinned.values()), seeds)
        sites: dict[str, SiteChoice] = {}
        for (name, opts), row, ci in zip(options.items(), site_opts, chosen):
            lin = linears[name]
            scheme = _with_order(self.candidates[opts[ci]], config.for_layer(name))
            sites[name] = SiteChoice(name, lin.in_features, lin.out_features, scheme, row[ci].bytes, row[ci].error)
        sites.update(pinned)
        sites = {n: sites[n] for n in names}
        plan_cfg = _planned_config(config, sites)
        plan = BudgetPlan(plan_cfg, self.format, sites, dense, sensitivity,
                          budget_bytes=budget, plan_seconds=time.perf_counter() - t1, measured=measured)
        if self.verbose:
            from tqdm.auto import tqdm

            tqdm.write(f"[quantkern] {plan.summary()}")
        return plan

    # -- the measurement ---------------------------------------------------------------------------
    def measure(self, model: nn.Module, data, config: WeightOnlyConfig | None = None, tokenizer=None,
                key: str = "") -> Sensitivity:
        """The sensitivity of every planned Linear to every candidate (see the module text). Leaves the
        model as it was."""
        config = GPTQConfig() if config is None else config
        t0 = time.perf_counter()
        items = normalize_calibration_data(data, tokenizer)
        mc = _measure_config(config)
        q = _SensitivityPass(model, mc, verbose=self.verbose)
        q.check_calibration_ids(items)
        fisher, fisher_tokens = ({}, 0)
        if self.fisher_samples:
            q.plan_blocks()
            fisher, fisher_tokens = loss_gradient_weights(model, items[:self.fisher_samples], q.plan.quantize,
                                                          q.calibration_device())
            q.plan = None
        errors = q.run(group_batches(items, mc.batch_size), self.candidates, fisher, config)
        return Sensitivity(key, self.candidates, errors, time.perf_counter() - t0, fisher_tokens,
                           sum(b.num_tokens for b in items))

    # -- the cache ---------------------------------------------------------------------------------
    def _dir(self) -> Path | None:
        if self.cache_dir is False:
            return None
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        root = os.environ.get("QUANTKERN_CACHE") or Path.home() / ".cache" / "quantkern"
        return Path(root) / "sensitivity"

    def _cached(self, key: str) -> Sensitivity | None:
        d = self._dir()
        path = None if d is None else d / f"{key}.json"
        if path is None or not path.is_file():
            return None
        try:
            s = Sensitivity.load(path)
        except ValueError as e:
            logger.warning("quantkern: ignoring the cached sensitivity: %s", e)
            return None
        if s.key != key or {_scheme_key(c) for c in self.candidates} - {_scheme_key(c) for c in s.candidates}:
            return None
        logger.info("quantkern: sensitivity from %s", path)
        return s

    def _store(self, s: Sensitivity) -> None:
        d = self._dir()
        if d is None:
            return
        try:
            s.save(d / f"{s.key}.json")
        except OSError as e:  # a cache that cannot be written costs a re-measurement, nothing else
            logger.warning("quantkern: could not cache the sensitivity in %s: %s", d, e)

    def _key(self, model, data, config, tokenizer, names) -> str:
        h = hashlib.sha256()
        settings = {"quantkern": __version__, "method": config.method, "candidates": [_scheme_key(s) for s in
                                                                                      self.candidates],
                    "fisher_samples": self.fisher_samples, "names": names, "skip": list(config.skip_layers),
                    **{k: getattr(config, k, None) for k in ("actorder", "static_groups", "damp_percent",
                                                             "blocksize", "mse", "scale_dtype", "batch_size")}}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            if t.is_floating_point() and t.numel() and t.device.type != "meta":
                flat = t.detach().flatten()
                step = max(1, flat.numel() // 1024)
                h.update(flat[::step].float().cpu().numpy().tobytes())
        for b in normalize_calibration_data(data, tokenizer):
            h.update(b.input_ids.cpu().numpy().tobytes())
            h.update(b.attention_mask.cpu().numpy().tobytes())
        return h.hexdigest()[:32]


# -- helpers -----------------------------------------------------------------------------------------
def _measure_config(config: WeightOnlyConfig) -> GPTQConfig:
    """The GPTQ driver's config for finding the sites and measuring them: ``config``'s skip_layers,
    overrides and GPTQ settings (RTN bases measure RTN errors on the same Hessians). The base scheme
    is irrelevant (every planned site gets its own), so it is the one every candidate's shape allows:
    8-bit per channel."""
    if isinstance(config, GPTQConfig):
        return dataclasses.replace(config, bits=8, group_size=-1)
    return GPTQConfig(bits=8, group_size=-1, skip_layers=config.skip_layers, device=config.device,
                      scale_dtype=config.scale_dtype, overrides=config.overrides)


def _override_keys(config: WeightOnlyConfig, name: str) -> set[str]:
    """The settings the user's first override matching ``name`` fixes."""
    for pattern, settings in config.overrides:
        if matches(name, [pattern]):
            return {k for k, _ in settings}
    return set()


def _with_order(s: WeightScheme, c: WeightOnlyConfig) -> WeightScheme:
    return WeightScheme(s.bits, s.group_size, s.sym, act_order=getattr(c, "actorder", False))


def _permuted(c: WeightOnlyConfig) -> bool:
    return bool(getattr(c, "actorder", False)) and not getattr(c, "static_groups", False)


def _planned_config(config: WeightOnlyConfig, sites: dict[str, SiteChoice]) -> WeightOnlyConfig:
    """``config`` with one override per planned Linear (its exact name), each carrying the chosen
    bits / group_size / sym merged into the user's own override for that Linear, then the user's overrides."""
    entries = []
    for name, c in sites.items():
        user = {}
        for pattern, settings in config.overrides:
            if matches(name, [pattern]):
                user = dict(settings)
                break
        user.update(bits=c.scheme.bits, group_size=c.scheme.group_size, sym=c.scheme.sym)
        entries.append((name, user))
    entries += [(p, dict(s)) for p, s in config.overrides]
    return dataclasses.replace(config, overrides=entries)


def _dense_bytes(model: nn.Module, quantized: list[str]) -> int:
    """Bytes of the tensors a checkpoint stores besides the quantized layers' weights: everything in the
    state dict (a tied output embedding once), at the dtype the model holds it."""
    skip = {f"{n}.weight" for n in quantized}
    seen, total = set(), 0
    for k, t in model.state_dict().items():
        if k in skip:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()) \
            if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@torch.enable_grad()
def loss_gradient_weights(model: nn.Module, items, linears: dict[str, nn.Linear], device
                          ) -> tuple[dict[str, torch.Tensor], int]:
    """``{name: f [out_features]}``, the mean over tokens of the squared gradient of the summed
    next-token loss at each output channel of each Linear (the diagonal Fisher of the layer outputs),
    from one forward and backward pass per item of the dense model. No parameter gets a gradient."""
    acc = {n: torch.zeros(m.out_features, dtype=torch.float32, device=m.weight.device) for n, m in linears.items()}
    hooks = []

    def fwd(name):
        def grad(g):
            acc[name].add_(g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0))  # (returns None: g unchanged)

        def hook(mod, args, out):
            if out.requires_grad:
                out.register_hook(grad)
        return hook

    emb = model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_()))
    hooks += [m.register_forward_hook(fwd(n)) for n, m in linears.items()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    tokens = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        for b in items:
            ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
            labels = ids.masked_fill(mask == 0, -100)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            logits = out.logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100, reduction="sum")
            loss.backward()
            tokens += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: a / max(tokens, 1) for n, a in acc.items()}, tokens


class _SensitivityPass(GPTQQuantizer):
    """The measurement: the GPTQ driver's plan, input capture and block runner, with every block fed
    the full-precision outputs of the one before and nothing replaced."""

    def run(self, batches, candidates, fisher: dict[str, torch.Tensor], config: WeightOnlyConfig
            ) -> dict[str, list[float | None]]:
        self.prepare()
        try:
            self.calibrate(batches)
            inputs = self.take_inputs()
            errors = self._measure(inputs, candidates, fisher, config)
        except BaseException as e:
            self._abort(e)
            raise
        self._finish()
        return errors

    def _measure(self, inputs, candidates, fisher, config) -> dict[str, list[float | None]]:
        self._measuring = (candidates, fisher, config, "rtn" if isinstance(config, RTNConfig) else "gptq")
        self._errors: dict[str, list[float | None]] = {}
        run_blocks(self, self.blocks, inputs, self.calibration_device(), replace=None, desc="sensitivity",
                   verbose=self.verbose)
        return self._errors

    def process_block(self, block, prefix, targets, experts, inputs, device):
        """The measuring :class:`~quantkern.calibration.loop.BlockProcessor`: one Hessian per input tensor,
        every candidate's output error per Linear; nothing quantized, the float outputs returned."""
        candidates, fisher, config, method = self._measuring
        gptq = {n: GPTQ(m.weight, prefix + n) for n, m in targets.items()}
        # one Hessian per input tensor: Linears fed the same input (q/k/v, gate/up) share it
        share = {}
        for stage, shared in (self._stages(block, targets, inputs[0]) if targets else []):
            first = next(iter(stage))
            for n in stage:
                share[n] = first if shared else n
        collect = {n: targets[n] for n in set(share.values())}
        outputs = run_block(block, inputs, device, collect=collect, on_input=lambda n, x: gptq[n].add_batch(x))
        for n, src in share.items():
            if src != n:
                g, f = gptq[n], gptq[src]
                g.H, g.nsamples, g.input_amax = f.H, f.nsamples, f.input_amax  # (read-only)
        for n, m in targets.items():
            name = prefix + n
            c = config.for_layer(name)
            k, nout = m.in_features, m.out_features
            ok = [j for j, s in enumerate(candidates) if linear_problem(k, nout, s.bits, s.group_size) is None]
            g = gptq.pop(n)
            if g.nsamples == 0:
                raise RuntimeError(f"{name} saw no calibration tokens; the sensitivity needs every planned "
                                   "Linear to be reached (skip it, or calibrate on more data)")
            errs = candidate_errors(g, [_with_order(candidates[j], c) for j in ok], act_order=c.actorder
                                    if method == "gptq" else False,
                                    damp_percent=getattr(c, "damp_percent", 0.01),
                                    static_groups=getattr(c, "static_groups", False), mse=c.mse,
                                    scale_dtype=c.torch_scale_dtype, row_weights=fisher.get(name),
                                    method=method)
            row: list[float | None] = [None] * len(candidates)
            for j, e in zip(ok, errs):
                row[j] = e
            self._errors[name] = row
        return {}, outputs
