"""Several devices: accelerate device maps for quantization and for inference of quantized models.

Quantization. A model dispatched by accelerate (``from_pretrained(..., device_map="auto")`` or
:func:`dispatch`) keeps each decoder block on its own device; the block-by-block quantizers calibrate
and quantize every block on the device it lives on (:func:`block_device`), so the GPUs share the
model and each holds only its blocks, their statistics and one block's activations. Blocks that
accelerate *offloaded* (weights kept in a hook's weights map, parameters on the meta device) cannot be
rewritten in place: :func:`check_not_offloaded` refuses them before calibration, naming the streaming path that handles
models larger than the GPUs.

Inference. :func:`dispatch` places a (quantized) model with a device map: ``"auto"`` /
``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` (computed by accelerate from ``max_memory``)
or an explicit ``{module name: device}``. Unlike transformers' convention, a ``"cpu"`` entry *runs*
on the CPU (quantkern has fast CPU kernels; streaming 4-bit weights over PCIe every token would be
slower), and ``"disk"`` is refused.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _as_device(d) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def block_device(block: nn.Module, default: torch.device | None) -> torch.device | None:
    """Where ``block`` executes: its accelerate hook's execution device when the model is dispatched,
    else ``default``."""
    hook = getattr(block, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        for h in getattr(hook, "hooks", ()):  # SequentialHook
            dev = getattr(h, "execution_device", None) or dev
    return _as_device(dev) if dev is not None else default


def check_not_offloaded(model: nn.Module) -> None:
    """For a model dispatched by accelerate, raise ``ValueError`` naming a parameter it offloaded."""
    if not is_dispatched(model):
        return
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"{meta[0]} is offloaded by accelerate (on the meta device; its weights live in a hook's weights map) "
            "and cannot be quantized in place. Quantize models larger than the GPUs with the streaming path: "
            "`quantkern quantize --offload ...` or quantkern.offload.quantize_streaming (one block on the device "
            "at a time), or load the model with a device_map that keeps every block on a device.")


def check_devices(model: nn.Module, device=None) -> None:
    """Before calibration: refuse a model that cannot run where its calibration inputs will be.

    Raises ``ValueError`` naming both devices for a parameter on the meta device (no data: a forward
    would read uninitialised memory) and, for a model not dispatched by accelerate, for ``device``
    (``config.device``) differing from where the parameters are (nothing moves the weights there)."""
    dispatched = is_dispatched(model)
    first = None
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            where = torch.device(device) if device is not None else (first[1].device if first else "cpu")
            raise ValueError(f"{name} is on the meta device (it has no data) while calibration inputs would be on "
                             f"{where}: load or materialise the weights (e.g. load_state_dict(..., assign=True)) "
                             "before quantizing")
        if first is None:
            first = (name, p)
    if device is not None and first is not None and not dispatched:
        want = torch.device(device)
        have = first[1].device
        if want.type != have.type or (want.index is not None and have.index is not None and want.index != have.index):
            raise ValueError(f"config device={str(want)!r} but the model's parameters are on {have} ({first[0]}); "
                             f"move the model there first (model.to({str(want)!r})) or leave device unset")


def is_dispatched(model: nn.Module) -> bool:
    return getattr(model, "hf_device_map", None) is not None and any(
        hasattr(m, "_hf_hook") for m in model.modules())


def parse_device_map(text: str):
    """A ``--device-map`` argument: a strategy name or a JSON object ``{"module": device, ...}``."""
    import json

    if text in MAP_STRATEGIES:
        return text
    try:
        dm = json.loads(text)
    except json.JSONDecodeError:
        dm = None
    if not isinstance(dm, dict) or not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in dm.items()):
        raise ValueError(f"--device-map must be one of {list(MAP_STRATEGIES)} or a JSON object "
                         f'{{"module name": device}}, got {text!r}')
    return dm


def infer_device_map(model: nn.Module, device_map="auto", max_memory=None) -> dict[str, str | int]:
    """An explicit ``{module name: device}`` for ``model`` (strategies as accelerate / transformers)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, dict):
        return dict(device_map)
    if device_map not in MAP_STRATEGIES:
        raise ValueError(f"device_map must be a dict or one of {list(MAP_STRATEGIES)}, got {device_map!r}")
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)


def dispatch(model: nn.Module, device_map="auto", max_memory=None) -> nn.Module:
    """Place ``model``'s modules by ``device_map`` and attach accelerate hooks that move activations
    between devices. Returns the model, with ``hf_device_map`` set. Raises ``ValueError`` for
    ``"disk"`` entries, unknown devices and maps that leave parameters unplaced."""
    from accelerate import dispatch_model

    dm = infer_device_map(model, device_map, max_memory)
    if not dm:
        raise ValueError("device_map is empty")
    names = dict(model.named_modules())
    for name, dev in dm.items():
        if name not in names:
            raise ValueError(f"device_map names {name!r}, which is not a module of the model")
        if dev == "disk":
            raise ValueError(f"device_map puts {name!r} on 'disk': quantized inference keeps every weight on a "
                             "device (a 'cpu' entry runs there with the CPU kernels)")
        d = _as_device(dev)
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"device_map puts {name!r} on {d}, but this machine has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s)")
    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    unplaced = [n for n in tensors if not any(k == "" or n == k or n.startswith(k + ".") for k in dm)]
    if unplaced:
        raise ValueError(f"device_map places no device for {unplaced[:4]}{' ...' if len(unplaced) > 4 else ''}")
    # main_device="cpu": "cpu" entries execute on the CPU instead of being offloaded to the GPU
    main = "cpu" if any(v == "cpu" for v in dm.values()) else None
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns of "offloaded" parameters for any "cpu" entry; none is here
    try:
        model = dispatch_model(model, device_map=dm, main_device=main, force_hooks=True)
    finally:
        log.setLevel(level)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"dispatch left {meta[0]} on the meta device")
    model.hf_device_map = dm
    return model
