"""Reading the original SpecMoE project's pickle shards without running their code.

The original collector (`qwen15_moe_a27b`, docs/legacy-import.md) `pickle.dump`ed Python lists of a
dataclass, one object per (MoE layer, forward batch) hook call. Plain `pickle.load` executes whatever
the file names, so these files are read only through `RestrictedUnpickler`: it resolves the few
globals a list of tensor-holding dataclasses needs, maps the dataclass to `LegacyRecord` (a bag of
attributes; the user's module is never imported) and refuses every other global by name.

What the shards do not say is recovered here from the order of the traces: the hook ran for layers
0..L-1 in order on every forward pass, so trace number g of the collection is layer g % L of pass g // L.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from collection.errors import UserError

DEFAULT_CLASS_MODULE = "__main__"  # the original collectors ran as scripts, so their dataclass pickled as __main__.X
DEFAULT_CLASS_NAME = "GatingDataPoint"
CONFIG_FILE = "training_config.json"  # written next to the shards by the original streaming collector


class LegacyFormatError(UserError):
    """A legacy shard that cannot be imported; the message names the file."""


class _Refused(Exception):
    """Raised inside the unpickler; `load_legacy_shard` turns it into a LegacyFormatError naming the file."""


# ----------------------------------------------------------------------------------------------
# the restricted unpickler


class LegacyRecord:
    """Stand-in for the collector's dataclass: takes its field dict, runs no code of the original."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state) of a slotted class
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _Refused("the dataclass's state is not a field dictionary")
        self.__dict__.update(state)


def _check_storage(storage: Any) -> torch.TypedStorage:
    if not isinstance(storage, torch.TypedStorage):
        raise _Refused(f"tensor data is a {type(storage).__name__}, not a torch storage")
    return storage


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple) -> torch.Tensor:
    """torch._utils._rebuild_tensor, after checking the view lies inside its storage (set_ would grow it)."""
    storage = _check_storage(storage)
    if not (type(offset) is int and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(type(d) is int and d >= 0 for d in (offset, *size, *stride))):
        raise _Refused("tensor has a malformed shape, stride or offset")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage._size():  # element count (the public .size() warns that TypedStorage is deprecated)
        raise _Refused("tensor reaches past the end of its storage (corrupt file)")
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if backward_hooks or metadata:  # hooks are callables and metadata Python state: neither belongs in traces
        raise _Refused("tensor carries backward hooks or Python metadata")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise _Refused("malformed nn.Parameter")
    return data  # a plain tensor is all an importer needs


def _load_from_bytes(b: Any) -> torch.TypedStorage:
    """A storage is pickled as a whole legacy torch.save file in bytes; torch's own weights_only loader
    (its own allowlist) reads it, where the original function would call an unrestricted torch.load."""
    if not isinstance(b, bytes):
        raise _Refused("storage payload is not bytes")
    try:
        storage = torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:  # torch's message is a page long: keep the global it names
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise _Refused(f"refused global {m.group(1)} (inside a tensor's storage)" if m else
                       "a tensor's storage was refused by torch's weights_only loader") from None
    return _check_storage(storage)


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol 2 spells bytes as _codecs.encode(str, 'latin1'); nothing else is let through."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode used for something other than protocol-2 bytes")
    return text.encode("latin1")


def _np_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _Refused("numpy array of a subclass")
    return _NP_MULTIARRAY._reconstruct(np.ndarray, shape, dtype_code)


def _np_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(spec, align, copy)
    if dt.hasobject:  # an object array would hold arbitrary Python objects
        raise _Refused(f"numpy dtype {spec!r} holds Python objects")
    return dt


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused("numpy object scalar")
    return _NP_MULTIARRAY.scalar(dtype, data)


try:  # numpy 2 pickles name numpy._core, numpy 1 numpy.core: both are accepted, the installed one rebuilds
    from numpy._core import multiarray as _NP_MULTIARRAY
except ImportError:  # numpy < 1.26
    from numpy.core import multiarray as _NP_MULTIARRAY

# (module, name) -> what the pickle gets instead. Everything a pickle.dump of a list of dataclasses
# holding CPU/GPU tensors (protocols 2-5) and optional numpy arrays can name, and nothing else.
ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,  # the (empty) backward-hooks argument
    ("torch", "Size"): torch.Size,  # a tuple, should a field hold a shape
    ("_codecs", "encode"): _codecs_encode,
    **{(mod, "_reconstruct"): _np_reconstruct for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(mod, "scalar"): _np_scalar for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _np_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are `ALLOWED`, torch dtype objects, and the one dataclass name given."""

    def __init__(self, file: Any, class_module: str, class_name: str):
        super().__init__(file)
        self.record_class = (class_module, class_name)
        self.refused: str | None = None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == self.record_class:
            return LegacyRecord
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):  # e.g. torch.float16
            return getattr(torch, name)
        # a crafted name may hold newlines or be huge: the error stays one readable line
        self.refused = "".join(c if c.isprintable() else "?" for c in f"{module}.{name}")[:200]
        raise _Refused(f"refused global {self.refused}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent ids (a torch.save archive, not a pickle.dump list)")


def load_legacy_shard(path: Path, class_module: str = DEFAULT_CLASS_MODULE,
                      class_name: str = DEFAULT_CLASS_NAME) -> list[LegacyRecord]:
    """The records of one legacy shard, or a one-line LegacyFormatError naming the file and the cause."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LegacyFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        head = f.read(2)
        if head[:1] != b"\x80" or head[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):
            why = "a torch.save zip archive" if head == b"PK" else "not a pickle of protocol 2-5"
            raise LegacyFormatError(f"{path}: {why}; legacy shards are pickle.dump'ed lists of {class_name}")
        f.seek(0)
        unpickler = RestrictedUnpickler(f, class_module, class_name)
        try:
            obj = unpickler.load()
        except _Refused as e:
            hint = ""
            if unpickler.refused and unpickler.refused.endswith("GatingDataPoint"):
                mod, _, name = unpickler.refused.rpartition(".")
                hint = f"; if that is the collector's trace dataclass, pass --class-module {mod} --class-name {name}"
            raise LegacyFormatError(f"{path}: {e}; not loaded (the restricted unpickler allows tensors and "
                                    f"{class_module}.{class_name} only){hint}") from None
        except Exception as e:  # truncated, corrupt, or a valid pickle of something else: never a traceback
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise LegacyFormatError(f"{path}: not a readable legacy shard (truncated or corrupt?): {why}") from None
    if not isinstance(obj, list) or not all(isinstance(r, LegacyRecord) for r in obj):
        kinds = sorted({type(r).__name__ for r in obj}) if isinstance(obj, list) else [type(obj).__name__]
        raise LegacyFormatError(f"{path}: holds {', '.join(kinds)}, not a list of {class_name}")
    if not obj:
        raise LegacyFormatError(f"{path}: empty list, no traces")
    return obj


# ----------------------------------------------------------------------------------------------
# records -> traces (checked fields)


@dataclass
class Trace:
    """One hook call: one MoE layer's view of one padded forward batch."""
    hidden: torch.Tensor          # (B, T, H) MoE-block input
    routing: torch.Tensor         # (B, T, E) router logits or probabilities
    topk: torch.Tensor            # (B, T, k) chosen experts
    token_ids: torch.Tensor | None  # (B, T) if the collector stored them
    dataset: str | None
    sample_id: Any
    layer_id: Any
    where: str                    # "FILE: trace i", for error messages
    index: int = -1               # g: position in the whole collection (set by `number_traces`)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.hidden.shape[:2])


def _as_tensor(value: Any, where: str, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        try:
            value = torch.from_numpy(value.astype(value.dtype.newbyteorder("="), copy=False))
        except (TypeError, ValueError) as e:  # e.g. a numpy dtype torch lacks
            raise LegacyFormatError(f"{where}: {name} is a numpy {value.dtype} array torch cannot hold ({e})") from None
    if not isinstance(value, torch.Tensor):
        raise LegacyFormatError(f"{where}: {name} is a {type(value).__name__}, not a tensor")
    return value


def read_traces(path: Path, records: list[LegacyRecord]) -> list[Trace]:
    traces = []
    for i, r in enumerate(records):
        where = f"{path}: trace {i}"
        missing = [a for a in ("hidden_states", "target_routing", "target_top_k") if not hasattr(r, a)]
        if missing:
            raise LegacyFormatError(f"{where}: has no {', '.join(missing)} (not a SpecMoE trace?)")
        h = _as_tensor(r.hidden_states, where, "hidden_states")
        g = _as_tensor(r.target_routing, where, "target_routing")
        k = _as_tensor(r.target_top_k, where, "target_top_k")
        if h.dim() != 3 or g.dim() != 3 or k.dim() != 3 or not (h.shape[:2] == g.shape[:2] == k.shape[:2]):
            raise LegacyFormatError(f"{where}: hidden_states {tuple(h.shape)}, target_routing {tuple(g.shape)}, "
                                    f"target_top_k {tuple(k.shape)}: expected [batch, seq, H / E / k] alike")
        if not (h.is_floating_point() and g.is_floating_point()) or k.is_floating_point():
            raise LegacyFormatError(f"{where}: unexpected dtypes {h.dtype}, {g.dtype}, {k.dtype}")
        if not 0 < k.shape[-1] <= g.shape[-1]:
            raise LegacyFormatError(f"{where}: top-{k.shape[-1]} of {g.shape[-1]} experts")
        tok = getattr(r, "token_ids", None)
        if tok is not None:
            tok = _as_tensor(tok, where, "token_ids")
            if tok.numel() != h.shape[0] * h.shape[1] or tok.is_floating_point():
                raise LegacyFormatError(f"{where}: token_ids {tuple(tok.shape)} do not fit the batch "
                                        f"{tuple(h.shape[:2])}")
            tok = tok.reshape(h.shape[:2])
        ds = getattr(r, "dataset_name", None)
        traces.append(Trace(hidden=h, routing=g, topk=k, token_ids=tok, dataset=None if ds is None else str(ds),
                            sample_id=getattr(r, "sample_id", None), layer_id=getattr(r, "layer_id", None),
                            where=where))
    return traces


# ----------------------------------------------------------------------------------------------
# where each trace sits in the collection, and so its layer


def sample_id_counter(traces: list[Trace]) -> list[int] | None:
    """The original collectors named each trace after a running trace counter (`trace_1500`,
    `sample_1500`): if every sample_id ends in an integer and they count up by one, that integer is
    the trace's position in the whole collection, whichever shards are present."""
    nums = []
    for t in traces:
        m = re.fullmatch(r"(?:.*\D)?(\d+)", str(t.sample_id)) if t.sample_id is not None else None
        if m is None:
            return None
        nums.append(int(m.group(1)))
    return nums if all(b == a + 1 for a, b in zip(nums, nums[1:])) else None


def number_traces(traces: list[Trace], next_index: int, use_sample_ids: bool, path: Path) -> str:
    """Set each trace's collection position; returns how it was found."""
    counter = sample_id_counter(traces) if use_sample_ids else None
    if counter is None:
        start, how = next_index, "position in input order"
    else:
        start, how = counter[0], "sample_id trace counter"
        if start < next_index:
            raise LegacyFormatError(f"{path}: its sample_id counter starts at {start}, before the previous input "
                                    f"ended ({next_index}): inputs out of order or overlapping; list the shards in "
                                    f"collection order (or --order input if sample_id counts per shard)")
    for i, t in enumerate(traces):
        t.index = start + i
    return how


def num_layers_from_config(inputs: list[Path]) -> tuple[int | None, str]:
    """The original streaming collector wrote `training_config.json` (model_info.num_layers) beside its shards."""
    for d in sorted({p.parent for p in inputs}):
        cfg = d / CONFIG_FILE
        if cfg.is_file():
            try:
                L = json.loads(cfg.read_text())["model_info"]["num_layers"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if type(L) is int and L > 0:
                return L, str(cfg)
    return None, ""


def shape_run_hint(traces: list[Trace]) -> str:
    """What the trace shapes say about L: a forward pass's L traces share their (batch, seq) shape,
    so every run of equal shapes with a change on both sides is a whole number of passes."""
    runs, n = [], 1
    for a, b in zip(traces, traces[1:]):
        if a.shape == b.shape:
            n += 1
        else:
            runs.append(n)
            n = 1
    interior = runs[1:]  # the first run may start mid-pass, the last may be cut short
    if not interior:
        return "the shapes do not change, so they say nothing about it"
    g = math.gcd(*interior)
    return f"the shape changes say it divides {g}" + (" (Qwen1.5-MoE-A2.7B has 24)" if g % 24 == 0 else "")


def layer_id_meaning(traces: list[Trace], L: int) -> str:
    """What the stored `layer_id` turned out to be (the original's bug stored the index in the shard)."""
    ids = [t.layer_id for t in traces]
    if all(type(x) is int and x == t.index % L for x, t in zip(ids, traces)):
        return "agrees with the recovered layer"
    if all(type(x) is int and x == i for i, x in enumerate(ids)):
        return "index inside the shard (the original's bug): ignored"
    return "neither the layer nor the index in the shard: ignored"


# ----------------------------------------------------------------------------------------------
# forward passes


@dataclass
class ForwardPass:
    traces: list[Trace]  # L traces, layer order

    @property
    def shape(self) -> tuple[int, int]:
        return self.traces[0].shape

    @property
    def tokens(self) -> int:
        B, T = self.shape
        return B * T


@dataclass
class Grouping:
    passes: list[ForwardPass] = field(default_factory=list)
    carry: list[Trace] = field(default_factory=list)    # the start of a pass the next input may finish
    dropped: int = 0                                     # traces of passes that are never completed


def group_passes(traces: list[Trace], L: int, carry: list[Trace]) -> Grouping:
    """Complete passes among carry + traces (consecutive indices, layers 0..L-1), checked for shape."""
    out = Grouping()
    run = list(carry)
    for t in traces:
        if t.index % L == 0 or (run and t.index != run[-1].index + 1):
            out.dropped += len(run)  # an unfinished pass: the collector stopped mid-pass, or an input is missing
            run = []
        if not run and t.index % L != 0:
            out.dropped += 1  # the inputs begin mid-pass
            continue
        run.append(t)
        if len(run) == L:
            check_pass(run, L)
            out.passes.append(ForwardPass(run))
            run = []
    out.carry = run
    return out


def check_pass(run: list[Trace], L: int) -> None:
    """All L traces of one forward pass hold the same padded batch: same (batch, seq) and dataset."""
    first = run[0]
    for layer, t in enumerate(run):
        if t.shape != first.shape or t.dataset != first.dataset:
            raise LegacyFormatError(
                f"{t.where}: taken as layer {layer} of the pass starting at {first.where}, but its batch "
                f"{list(t.shape)} ({t.dataset}) differs from that pass's {list(first.shape)} ({first.dataset}): "
                f"--num-layers {L} is wrong, or the collector skipped a trace")


# ----------------------------------------------------------------------------------------------
# conversion of one pass


def looks_like_probabilities(routing: torch.Tensor) -> bool:
    """Router outputs that are non-negative and sum to one over the experts are probabilities, not logits."""
    r = routing.float()
    return bool(r.min() >= 0 and r.max() <= 1 and torch.allclose(r.sum(-1), torch.ones(()), atol=1e-2))


def pass_arrays(fp: ForwardPass, probabilities: bool, norm_topk_prob: bool) -> dict[str, list[torch.Tensor]]:
    """Per layer, the (B*T, ...) rows the trace format stores for this pass."""
    out: dict[str, list[torch.Tensor]] = {"hidden": [], "topk_ids": [], "topk_weights": [], "router_logits": [],
                                          "topk_agree": []}
    for t in fp.traces:
        H, E, K = t.hidden.shape[-1], t.routing.shape[-1], t.topk.shape[-1]
        routing = t.routing.reshape(-1, E).float()
        ids = t.topk.reshape(-1, K).long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= E):
            raise LegacyFormatError(f"{t.where}: target_top_k outside [0, {E})")
        if looks_like_probabilities(routing) != probabilities:
            raise LegacyFormatError(f"{t.where}: target_routing is {'logits' if probabilities else 'probabilities'} "
                                    f"where earlier traces held {'probabilities' if probabilities else 'logits'}")
        probs = routing if probabilities else torch.softmax(routing, -1)
        w = probs.gather(1, ids)
        if norm_topk_prob:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        out["hidden"].append(t.hidden.reshape(-1, H).to(torch.float16))
        out["topk_ids"].append(ids.to(torch.int16))
        out["topk_weights"].append(w.to(torch.float16))
        if not probabilities:
            out["router_logits"].append(routing.to(torch.float16))
        # the stored ids should be the routing's own top-k; the share that is, is reported, not enforced (ties)
        own = routing.topk(K, -1).indices.sort(-1).values
        out["topk_agree"].append((own == ids.sort(-1).values).all(-1).float().sum())
    return out


def token_ids_of(fp: ForwardPass) -> np.ndarray:
    """The pass's token ids if the collector stored them, else -1 (the original stored none)."""
    B, T = fp.shape
    t = fp.traces[0].token_ids
    return np.full(B * T, -1, dtype=np.int32) if t is None else t.reshape(-1).numpy().astype(np.int32)
