"""Where a model's layers go when it does not fit one GPU: accelerate's device maps, as `from_pretrained` takes them.

`--device-map auto|balanced|balanced_low_0|sequential` lets accelerate spread whole decoder layers over the visible
GPUs (`balanced`, and `auto` with several GPUs, fill them evenly; `sequential` fills GPU 0 first); a JSON object
(inline or a file) names the device of each module, as in `{"model.embed_tokens": 0, "model.layers.0": 0, ...,
"lm_head": 1}`. `--max-memory 20GiB` caps every GPU (a JSON object caps each: `{"0": "20GiB", "1": "30GiB"}`);
without it each GPU offers 90% of its free memory and the host none, so a model that does not fit the GPUs
fails at loading instead of running from host memory at a fraction of the speed.

Under torchrun with a device map, the GPUs of a node are shared out: local rank r of n ranks places its model on
GPUs r*g .. r*g+g-1, g = visible GPUs // n (two ranks of two GPUs each on a 4-GPU node, for example).

Capture reads each layer's outputs on the device that layer runs on; `device_runs` groups consecutive layers by
device so that router outputs are stacked and copied once per device, never across devices.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError

DEVICE_MAP_POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")
FREE_MEMORY_SHARE = 0.9  # of each GPU's free memory, offered to the weights: the rest holds activations and copies


def parse_device_map(spec: str) -> str | dict[str, int | str]:
    """A policy name, or a {module name: device} map from a JSON string or file."""
    if spec in DEVICE_MAP_POLICIES:
        return spec
    text = spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--device-map {spec!r}: use {', '.join(DEVICE_MAP_POLICIES)}, a JSON object or a JSON file")
        text = path.read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--device-map: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError("--device-map: the JSON must be a non-empty object {module name: device}")
    for name, dev in mapping.items():
        ok = (type(dev) is int and dev >= 0) or (isinstance(dev, str) and dev in ("cpu", "disk")) \
            or (isinstance(dev, str) and dev.startswith("cuda:") and dev[5:].isdigit())
        if not ok:
            raise UserError(f"--device-map: module {name!r} -> {dev!r}; a device is a GPU index, 'cuda:N', 'cpu' or 'disk'")
    return mapping


def parse_max_memory(spec: str | None) -> int | dict[int | str, int] | None:
    """Bytes per GPU (one cap for every GPU), or {GPU index or 'cpu': bytes} from a JSON object."""
    from accelerate.utils import convert_file_size_to_int

    if spec is None:
        return None

    def size(v: Any) -> int:
        try:
            n = convert_file_size_to_int(v)
        except (ValueError, AttributeError, TypeError):
            n = -1
        if n <= 0:
            raise UserError(f"--max-memory: {v!r} is not a size (use e.g. 20GiB, 500MiB or a number of bytes)")
        return n

    if not spec.lstrip().startswith("{"):
        return size(int(spec) if spec.isdigit() else spec)
    try:
        caps = json.loads(spec)
    except json.JSONDecodeError as e:
        raise UserError(f"--max-memory: not valid JSON ({e.msg})") from None
    if not isinstance(caps, dict) or not caps:
        raise UserError("--max-memory: the JSON must be a non-empty object {GPU index or 'cpu': size}")
    out: dict[int | str, int] = {}
    for key, v in caps.items():
        if not (key.isdigit() or key == "cpu"):
            raise UserError(f"--max-memory: key {key!r} is not a GPU index or 'cpu'")
        out[int(key) if key.isdigit() else key] = size(v)
    return out


def rank_gpus(local_rank: int, local_world: int, num_gpus: int) -> list[int]:
    """The GPUs of one rank when `local_world` ranks on a node share its `num_gpus` GPUs for device maps."""
    per_rank = num_gpus // local_world
    if per_rank < 1:
        raise UserError(f"{local_world} ranks on this node but {num_gpus} GPU(s) visible: a device map needs at least "
                        f"one GPU per rank")
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def from_pretrained_placement(device_map: str | dict[str, int | str], max_memory: int | dict[int | str, int] | None,
                              gpus: list[int], free_bytes: dict[int, int]) -> dict[str, Any]:
    """`device_map` and `max_memory` keyword arguments for `from_pretrained`.

    `gpus` are the GPUs this process may use (all visible ones, or its rank's share); `free_bytes` their free
    memory. A policy gets a max_memory over exactly those GPUs and no host memory unless --max-memory names 'cpu'.
    """
    if isinstance(device_map, dict):
        if max_memory is not None:
            raise UserError("--max-memory applies to a device-map policy (auto, balanced, ...), not to an explicit map")
        missing = sorted(_gpu_indices(device_map) - set(gpus))
        if missing:
            raise UserError(f"--device-map places modules on GPU(s) {missing}, but only {gpus or 'none'} are usable here")
        return {"device_map": device_map}
    if not gpus:
        raise UserError(f"--device-map {device_map} needs CUDA GPUs; this machine has none (drop the flag on CPU)")
    if isinstance(max_memory, dict):
        unknown = sorted(k for k in max_memory if k != "cpu" and k not in gpus)
        if unknown:
            raise UserError(f"--max-memory names GPU(s) {unknown}, but only {gpus} are usable here")
        caps = dict(max_memory)
    else:
        caps = {g: (max_memory if max_memory is not None else int(free_bytes[g] * FREE_MEMORY_SHARE)) for g in gpus}
    return {"device_map": device_map, "max_memory": caps}


def layer_devices(layers: list[nn.Module]) -> list[torch.device]:
    """The device each given module computes on: where its first parameter lives (accelerate places whole
    decoder layers, so a router sits with its layer)."""
    return [next(m.parameters()).device for m in layers]


def device_runs(devices: list[torch.device]) -> list[tuple[torch.device, int, int]]:
    """Consecutive layers on one device, as (device, first layer, end layer): one stack and one copy each.

    [cuda:0, cuda:0, cuda:1, cuda:1] -> [(cuda:0, 0, 2), (cuda:1, 2, 4)]; a device that comes back after another
    (a hand-written map) gets a run of its own each time, so every run is a contiguous slice of the host buffer.
    """
    runs: list[tuple[torch.device, int, int]] = []
    for i, dev in enumerate(devices):
        if runs and runs[-1][0] == dev and runs[-1][2] == i:
            runs[-1] = (dev, runs[-1][1], i + 1)
        else:
            runs.append((dev, i, i + 1))
    return runs


def describe_placement(model: nn.Module, layers: list[nn.Module]) -> str:
    """'cuda:0: MoE layers 0-11, 13.2 GiB; cuda:1: MoE layers 12-23, 13.5 GiB' (parameter bytes per device)."""
    per_device: dict[torch.device, int] = {}
    for p in model.parameters():
        per_device[p.device] = per_device.get(p.device, 0) + p.numel() * p.element_size()
    parts = []
    runs = device_runs(layer_devices(layers))
    for dev, nbytes in per_device.items():
        spans = [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for d, a, b in runs if d == dev]
        parts.append(f"{dev}: MoE layers {','.join(spans) or 'none'}, {nbytes / 2**30:.2f} GiB")
    return "; ".join(parts)


def placement_from_args(device_map: str, max_memory: str | None, local_rank: int = 0, local_world: int = 1,
                        distributed: bool = False) -> tuple[dict[str, Any], torch.device]:
    """(`from_pretrained` keyword arguments, the device the input ids go to) for --device-map / --max-memory.
    Under torchrun (`distributed`) a policy spreads this rank's share of the node's GPUs (`rank_gpus`)."""
    mapping, caps = parse_device_map(device_map), parse_max_memory(max_memory)
    n = torch.cuda.device_count()
    if distributed and isinstance(mapping, dict):
        raise UserError("--device-map with an explicit map under torchrun: every rank would load onto the same "
                        "GPUs; use a policy (auto, balanced, ...), which gives each rank its own GPUs")
    gpus = rank_gpus(local_rank, local_world, n) if distributed and n else list(range(n))
    kwargs = from_pretrained_placement(mapping, caps, gpus, {g: torch.cuda.mem_get_info(g)[0] for g in gpus})
    # the device that picks the dtype (bf16 on a GPU) and takes the inputs: the map's first GPU, else the CPU
    used = sorted(_gpu_indices(mapping)) if isinstance(mapping, dict) else gpus
    return kwargs, torch.device("cuda", used[0]) if used else torch.device("cpu")


def _gpu_indices(mapping: dict[str, int | str]) -> set[int]:
    return {d if type(d) is int else int(d[5:]) for d in mapping.values() if type(d) is int or d.startswith("cuda:")}
