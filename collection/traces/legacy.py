"""Reading the original SpecMoE project's pickle shards without running their code.

The original collector (`qwen15_moe_a27b`, docs/legacy-import.md) `pickle.dump`ed Python lists of a
dataclass, one object per (MoE layer, forward batch) hook call. Plain `pickle.load` executes whatever
the file names, so these files are read only through `RestrictedUnpickler`: it maps the dataclass to
`LegacyRecord` (a bag of attributes; the user's module is never imported), gives the few other names a
list of tensor-holding dataclasses needs to checked stand-ins, and refuses every other global by name.

What the shards do not say is recovered here from the order of the traces: the hook ran for layers
0..L-1 in order on every forward pass, so trace number g of the collection is layer g % L of pass g // L.
"""
from __future__ import annotations

import inspect
import io
import json
import math
import mmap
import pickle
import pickletools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from collection.traces.format import ShardWriter, shard_specs
from common.errors import UserError

DEFAULT_CLASS_MODULE = "__main__"  # the original collectors ran as scripts, so their dataclass pickled as __main__.X
DEFAULT_CLASS_NAME = "GatingDataPoint"
CONFIG_FILE = "training_config.json"  # written next to the shards by the original streaming collector


class LegacyFormatError(UserError):
    """A legacy shard that cannot be imported; the message names the file."""


class _Refused(Exception):
    """Raised inside the unpickler; `load_legacy_shard` turns it into a LegacyFormatError naming the file."""


# ----------------------------------------------------------------------------------------------
# the restricted unpickler
#
# A pickle is a program: GLOBAL names any object, REDUCE calls it with any arguments, BUILD calls
# __setstate__ on (or fills the __dict__ of) any object on the stack. So the pickle is never handed a
# numpy, torch or Python function object. Each allowed name resolves to a `_Constructor`, a checked
# function that returns a plain value or an inert placeholder (`_Dtype`, `_NumpyArray`, `_Storage`,
# `_Tensor`: no __dict__, BUILD refused or limited to one checked state), and the real tensors are
# made after the load (`_as_tensor`). By construction:
# - no object array, no pointer read from file bytes: a numpy dtype is one of a fixed set of number codes,
#   never numpy's dtype built from the file's fields, subarray or flags, and numpy.ndarray is never called
#   (it reads a buffer through any dtype). A real dtype object would not do either: BUILD on it after an
#   array used it can grow its itemsize, and reading that array then runs past its memory (a segfault).
# - nothing is allocated from a size the file states: every array and storage holds exactly bytes present
#   in the file, a tensor may not view more elements than its storage has (stride 0 would repeat one
#   element 2**40 times), all tensors and arrays together hold at most VIEW_BUDGET_FACTOR x the file, and
#   memo indices and frame lengths are checked (`_prescan`) before the C unpickler sizes allocations by them.
# - a storage's payload, a small legacy torch.save file inside the pickle, is parsed here: torch.load
#   would allocate the size its header states before reading the data.

MAX_DIMS = 32
VIEW_BUDGET_FACTOR, VIEW_BUDGET_SLACK = 4, 16 << 20  # bytes of all tensors and arrays <= 4 x file + 16 MiB
NUMPY_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
STORAGE_DTYPES = {"HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}
TORCH_DTYPES = {str(dt).removeprefix("torch."): dt for dt in (*STORAGE_DTYPES.values(), torch.complex64,
                                                              torch.complex128)}
TORCH_LEGACY_MAGIC, TORCH_LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001  # torch.serialization's legacy format


def _printable(text: str, limit: int = 200) -> str:
    """A crafted name may hold newlines or be huge: messages stay one readable line."""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and len(value) <= MAX_DIMS
            and all(type(d) is int and 0 <= d < 2**62 for d in value)):
        raise _Refused(f"{what} is not a tuple of at most {MAX_DIMS} non-negative integers")
    return tuple(value)


def _prescan(f: Any, size: int) -> None:
    """Check what the C unpickler would size an allocation by, before it runs: memo indices (it grows and
    zeroes its memo to twice the largest, so LONG_BINPUT 2**31 alone takes 32 GiB; a pickler numbers them
    0, 1, 2, ...) and frame lengths. genops itself refuses a length of bytes or text past the end of `f`,
    whose reads are clamped to what it holds (an mmap or a BytesIO). Leaves `f` after the pickle's STOP."""
    entries = 0
    for op, arg, pos in pickletools.genops(f):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not 0 <= arg <= entries:
                raise _Refused(f"memo index {arg} at byte {pos} after {entries} entries (a memory bomb)")
            entries += 1
        elif op.name == "MEMOIZE":
            entries += 1
        elif op.name == "FRAME" and arg > size - pos - 9:  # what a cut file shows too: reported as corrupt
            raise ValueError(f"a frame of {arg} bytes at byte {pos} runs past the end of the file")


class _Inert:
    """Base of the placeholders the pickle gets: no __dict__, and BUILD (which calls __setstate__) is refused."""
    __slots__ = ()
    what = "a placeholder"

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"BUILD on {self.what} (only the dataclass and numpy dtypes and arrays take a state)")


class _Constructor(_Inert):
    """A name the pickle may call (REDUCE): the arguments must fit `fn`'s signature, and `fn` checks them."""
    __slots__ = ("name", "fn", "signature")

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.fn, self.signature = name, fn, inspect.signature(fn)

    @property
    def what(self) -> str:
        return self.name

    def __call__(self, *args: Any) -> Any:
        try:
            self.signature.bind(*args)
        except TypeError:
            raise _Refused(f"{self.name} called with {len(args)} arguments") from None
        return self.fn(*args)


class _Budget:
    """Bytes all tensors and arrays of one file may hold; charged before anything is made."""

    def __init__(self, limit: int):
        self.limit, self.left = limit, limit

    def charge(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise _Refused(f"its tensors would hold more than {self.limit >> 20} MiB, {VIEW_BUDGET_FACTOR}x the "
                           f"file: views repeat the same storage (a memory bomb)")


class LegacyRecord:
    """Stand-in for the collector's dataclass: takes its field dict once, runs no code of the original."""

    def __setstate__(self, state: Any) -> None:
        if self.__dict__:  # a second BUILD could plant e.g. __setstate__ for a third
            raise _Refused("the dataclass's state is set twice")
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state) of a slotted class
            if not all(s is None or type(s) is dict for s in state):
                raise _Refused("the dataclass's state is not a field dictionary")
            state = {**(state[0] or {}), **(state[1] or {})}
        if type(state) is not dict or not all(type(k) is str and not k.startswith("__") for k in state):
            raise _Refused("the dataclass's state is not a field dictionary")
        self.__dict__.update(state)


# --- numpy: dtypes from a fixed set of number codes, arrays from exactly their bytes


class _NdarrayName(_Inert):
    """numpy.ndarray, which numpy's pickles name only as _reconstruct's first argument; never called."""
    __slots__ = ()
    what = "numpy.ndarray"

    def __call__(self, *args: Any) -> Any:
        raise _Refused("numpy.ndarray called directly (it reads a buffer through any dtype, object pointers "
                       "included); only numpy's own pickle form of an array is read")


_NDARRAY = _NdarrayName()


class _Dtype(_Inert):
    """numpy.dtype(code) of a number type; BUILD may set its byte order, nothing else."""
    __slots__ = ("code", "order")
    what = "a numpy dtype"

    def __init__(self, code: str):
        self.code, self.order = code, "="

    def __setstate__(self, state: Any) -> None:
        # numpy's state of a number dtype: (3, byte order, subarray, names, fields, -1, -1, flags).
        # Subarrays and fields (where objects hide) and sizes of its own are refused; flags are numpy's own.
        if not (type(state) is tuple and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None and state[5] == -1
                and state[6] == -1 and type(state[7]) is int):
            raise _Refused(f"numpy dtype {self.code} given fields, a subarray or a size of its own")
        self.order = state[1]

    @property
    def itemsize(self) -> int:
        return np.dtype(self.code).itemsize

    def numpy(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.order if self.order in "<>" else "=")


def _np_dtype(code: Any, align: Any = False, copy: Any = False) -> _Dtype:
    if type(code) is not str or code not in NUMPY_CODES or not {type(align), type(copy)} <= {bool, int}:
        what = repr(_printable(code, 40)) if type(code) is str else f"given by a {type(code).__name__}"
        raise _Refused(f"numpy dtype {what} is not a number type (object, structured and subarray dtypes are refused)")
    return _Dtype(code)


class _NumpyArray(_Inert):
    """A numpy array: a number dtype, a shape, and exactly shape x itemsize bytes from the file."""
    __slots__ = ("budget", "dtype", "shape", "fortran", "data")
    what = "a numpy array"

    def __init__(self, budget: _Budget):
        self.budget, self.data = budget, None

    def __setstate__(self, state: Any) -> None:
        # ndarray's state: (1, shape, dtype, Fortran order, raw bytes); an object array's data is a list
        if not (type(state) is tuple and len(state) == 5 and state[0] == 1 and type(state[3]) is bool):
            raise _Refused("malformed numpy array state")
        self.fill(state[2], state[1], "F" if state[3] else "C", state[4])

    def fill(self, dtype: Any, shape: Any, order: Any, data: Any) -> None:
        if self.data is not None:
            raise _Refused("numpy array built twice")
        if not isinstance(dtype, _Dtype):
            raise _Refused(f"numpy array whose dtype is a {type(dtype).__name__}, not a number dtype")
        shape = _dims(shape, "numpy array shape")
        if type(data) not in (bytes, bytearray) or order not in ("C", "F"):
            raise _Refused(f"numpy array data is a {type(data).__name__}, not bytes (an object array?)")
        need = math.prod(shape) * dtype.itemsize
        if len(data) != need:
            raise _Refused(f"numpy {dtype.code} array of shape {list(shape)} needs {need} bytes, the file holds "
                           f"{len(data)}")
        self.budget.charge(need)
        self.dtype, self.shape, self.fortran, self.data = dtype, shape, order == "F", data

    def tensor(self) -> torch.Tensor:
        if self.data is None:
            raise _Refused("numpy array without data")
        dt = self.dtype.numpy()
        if dt.kind == "b" and np.frombuffer(self.data, dtype=np.uint8).max(initial=0) > 1:
            raise _Refused("numpy bool array holding bytes other than 0 and 1")
        arr = np.frombuffer(self.data, dtype=dt).reshape(self.shape, order="F" if self.fortran else "C")
        return torch.from_numpy(arr.astype(dt.newbyteorder("="), copy=True))  # native order, writable


def _np_reconstruct(budget: _Budget, subtype: Any, shape: Any, code: Any) -> _NumpyArray:
    if subtype is not _NDARRAY:
        raise _Refused("numpy array of a subclass")
    _dims(shape, "numpy array shape")  # numpy writes (0,): nothing is allocated from it
    if type(code) is not bytes:
        raise _Refused("malformed numpy array")
    return _NumpyArray(budget)


def _np_frombuffer(budget: _Budget, data: Any, dtype: Any, shape: Any, order: Any) -> _NumpyArray:
    """Protocol 5's form of a contiguous array: numpy._core.numeric._frombuffer(bytes, dtype, shape, order)."""
    arr = _NumpyArray(budget)
    arr.fill(dtype, shape, order, data)
    return arr


def _np_scalar(dtype: Any, data: Any = None) -> int | float | complex | bool:
    """numpy scalars come back as Python numbers (a numpy scalar object has a __setstate__)."""
    if not isinstance(dtype, _Dtype) or type(data) is not bytes or len(data) != dtype.itemsize:
        raise _Refused("numpy scalar that is not a number")
    return np.frombuffer(data, dtype=dtype.numpy())[0].item()


# --- torch: storages parsed from their payload, tensors as checked views of them


class _Storage(_Inert):
    __slots__ = ("data",)  # 1-d tensor of the storage's elements
    what = "a torch storage"

    def __init__(self, data: torch.Tensor):
        self.data = data


class _Tensor(_Inert):
    __slots__ = ("storage", "offset", "size", "stride")
    what = "a torch tensor"

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def tensor(self) -> torch.Tensor:
        return self.storage.data.as_strided(self.size, self.stride, self.offset)


class _EmptyHooks(_Inert):
    """collections.OrderedDict(): a tensor's (always empty) backward hooks; items are refused."""
    __slots__ = ()
    what = "collections.OrderedDict"

    def __setitem__(self, key: Any, value: Any) -> None:
        raise _Refused("tensor carries backward hooks")


class _StorageType(_Inert):
    __slots__ = ("dtype",)
    what = "a torch storage type"

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _PayloadUnpickler(pickle.Unpickler):
    """The pickles inside a storage payload: torch.*Storage names and one persistent id, nothing else."""

    def __init__(self, file: Any):
        super().__init__(file)
        self.ids: list[Any] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise _Refused(f"refused global {_printable(f'{module}.{name}')} (inside a tensor's storage)")

    def persistent_load(self, pid: Any) -> Any:
        self.ids.append(pid)
        return _PAYLOAD_ROOT


_PAYLOAD_ROOT = _Inert()


def _load_from_bytes(payload: Any) -> _Storage:
    """torch pickles a storage as _load_from_bytes(torch.save(storage) in the legacy format): five small
    pickles (magic number, protocol, system info, the storage as a persistent id
    ('storage', type, key, location, numel, None), its key list), then numel as int64 and the raw elements."""
    if type(payload) is not bytes:
        raise _Refused("a tensor's storage payload is not bytes")
    f = io.BytesIO(payload)

    def load(unpickler_file: io.BytesIO, unpickler: _PayloadUnpickler | None = None) -> Any:
        start = unpickler_file.tell()
        _prescan(unpickler_file, len(payload))
        unpickler_file.seek(start)
        return (unpickler or _PayloadUnpickler(unpickler_file)).load()

    magic, protocol, info = load(f), load(f), load(f)
    if not (type(magic) is int and magic == TORCH_LEGACY_MAGIC and type(protocol) is int
            and protocol == TORCH_LEGACY_PROTOCOL):
        raise _Refused("a tensor's storage payload is not in torch's legacy format")
    if not (type(info) is dict and info.get("little_endian") is True):
        raise _Refused("a tensor's storage was written big-endian or without its system info")
    unpickler = _PayloadUnpickler(f)
    root = load(f, unpickler)
    pid = unpickler.ids[0] if len(unpickler.ids) == 1 else None
    if not (root is _PAYLOAD_ROOT and type(pid) is tuple and len(pid) == 6 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and type(pid[2]) is str and type(pid[3]) is str
            and type(pid[4]) is int and 0 <= pid[4] < 2**62 and pid[5] is None):
        raise _Refused("a tensor's storage has a malformed header")
    keys = load(f)
    if not (type(keys) is list and len(keys) == 1 and keys[0] == pid[2]):
        raise _Refused("a tensor's storage has a malformed key list")
    dtype, numel = pid[1].dtype, pid[4]
    count = f.read(8)
    start, itemsize = f.tell(), dtype.itemsize
    if len(count) != 8 or int.from_bytes(count, "little") != numel or len(payload) - start != numel * itemsize:
        raise _Refused(f"a tensor's storage of {numel} {str(dtype).removeprefix('torch.')} elements holds "
                       f"{len(payload) - start} bytes, not {numel * itemsize} (wrong byte length)")
    data = (torch.frombuffer(bytearray(memoryview(payload)[start:]), dtype=dtype) if numel
            else torch.empty(0, dtype=dtype))
    if dtype is torch.bool and numel and data.view(torch.uint8).max() > 1:
        raise _Refused("a bool storage holds bytes other than 0 and 1")
    return _Storage(data)


def _check_hooks(hooks: Any) -> None:
    if not (hooks is None or isinstance(hooks, _EmptyHooks)):
        raise _Refused("tensor carries backward hooks")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocol 2 spells bytes as _codecs.encode(str, 'latin1'); nothing else is let through."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode used for something other than protocol-2 bytes")
    try:
        return text.encode("latin1")
    except UnicodeEncodeError:
        raise _Refused("_codecs.encode of text that is not latin-1") from None


def _torch_size(dims: Any) -> torch.Size:
    return torch.Size(_dims(dims, "torch.Size"))


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are `_Constructor`s (see the top of this section), torch dtype objects,
    and the one dataclass name given."""

    def __init__(self, file: Any, class_module: str, class_name: str, budget: int):
        super().__init__(file)
        self.record_class = (class_module, class_name)
        self.refused: str | None = None
        self.budget = _Budget(budget)
        reconstruct = _Constructor("numpy.core.multiarray._reconstruct",
                                   lambda subtype, shape, code: _np_reconstruct(self.budget, subtype, shape, code))
        frombuffer = _Constructor("numpy.core.numeric._frombuffer",
                                  lambda data, dtype, shape, order: _np_frombuffer(self.budget, data, dtype, shape,
                                                                                   order))
        scalar, dtype = _Constructor("numpy.core.multiarray.scalar", _np_scalar), _Constructor("numpy.dtype", _np_dtype)
        # numpy 2 pickles name numpy._core, numpy 1 numpy.core
        self.names: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): _Constructor("torch._utils._rebuild_tensor_v2",
                                                                 self.rebuild_tensor_v2),
            ("torch._utils", "_rebuild_tensor"): _Constructor("torch._utils._rebuild_tensor", self.rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): _Constructor("torch._utils._rebuild_parameter",
                                                                 self.rebuild_parameter),
            ("torch.storage", "_load_from_bytes"): _Constructor("torch.storage._load_from_bytes", _load_from_bytes),
            ("collections", "OrderedDict"): _Constructor("collections.OrderedDict", lambda: _EmptyHooks()),
            ("torch", "Size"): _Constructor("torch.Size", _torch_size),  # should a field hold a shape
            ("_codecs", "encode"): _Constructor("_codecs.encode", _codecs_encode),
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): dtype,
            **{(f"numpy.{core}.multiarray", "_reconstruct"): reconstruct for core in ("core", "_core")},
            **{(f"numpy.{core}.multiarray", "scalar"): scalar for core in ("core", "_core")},
            **{(f"numpy.{core}.numeric", "_frombuffer"): frombuffer for core in ("core", "_core")},
        }

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> _Tensor:
        """torch._utils._rebuild_tensor, as a view that lies inside its storage and is no larger than it."""
        if not isinstance(storage, _Storage):
            raise _Refused(f"tensor data is a {type(storage).__name__}, not a torch storage")
        size, stride = _dims(size, "tensor size"), _dims(stride, "tensor stride")
        if not (type(offset) is int and 0 <= offset < 2**62 and len(size) == len(stride)):
            raise _Refused("tensor has a malformed shape, stride or offset")
        n, numel = storage.data.numel(), math.prod(size)
        if numel and offset + sum((d - 1) * s for d, s in zip(size, stride)) >= n:
            raise _Refused("tensor reaches past the end of its storage (corrupt file)")
        if numel > n or offset > n:
            raise _Refused(f"tensor of {numel} elements views a storage of {n}: it repeats elements (stride 0), "
                           f"which could make it any size")
        self.budget.charge(numel * storage.data.element_size())
        return _Tensor(storage, offset, size, stride)

    def rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                          backward_hooks: Any = None, metadata: Any = None) -> _Tensor:
        _check_hooks(backward_hooks)
        if type(requires_grad) is not bool or not (metadata is None or (type(metadata) is dict and not metadata)):
            raise _Refused("tensor carries Python metadata")  # Python state does not belong in traces
        return self.rebuild_tensor(storage, offset, size, stride)

    def rebuild_parameter(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _Tensor:
        if not isinstance(data, _Tensor) or type(requires_grad) is not bool:
            raise _Refused("malformed nn.Parameter")
        _check_hooks(backward_hooks)
        return data  # a plain tensor is all an importer needs

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == self.record_class:
            return LegacyRecord
        if (module, name) in self.names:
            return self.names[(module, name)]
        if module == "torch" and name in TORCH_DTYPES:  # e.g. torch.float16: no __dict__, no __setstate__
            return TORCH_DTYPES[name]
        self.refused = _printable(f"{module}.{name}")
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
        unpickler = RestrictedUnpickler(f, class_module, class_name,
                                        budget=VIEW_BUDGET_FACTOR * path.stat().st_size + VIEW_BUDGET_SLACK)
        try:
            # scanned mapped, where a length the file states cannot make a read allocate more than the file
            # holds; loaded from the file, so the mapping's pages are not held during the load as well
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _prescan(data, len(data))
            f.seek(0)
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
    """The real tensor of a field, made here from the checked placeholder the unpickler left."""
    if not isinstance(value, (_Tensor, _NumpyArray)):
        raise LegacyFormatError(f"{where}: {name} is a {type(value).__name__}, not a tensor")
    try:
        return value.tensor()
    except _Refused as e:
        raise LegacyFormatError(f"{where}: {name}: {e}") from None
    except (TypeError, ValueError) as e:  # e.g. a numpy dtype torch lacks
        raise LegacyFormatError(f"{where}: {name} is an array torch cannot hold ({e})") from None


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
        # only strings and integers are read further: str() of a crafted object could recurse without end
        ds, sid = getattr(r, "dataset_name", None), getattr(r, "sample_id", None)
        sid_ok = sid is None or type(sid) is str or (type(sid) is int and abs(sid) < 2**63)
        if not (ds is None or type(ds) is str) or not sid_ok:
            raise LegacyFormatError(f"{where}: dataset_name is a {type(ds).__name__} and sample_id a "
                                    f"{type(sid).__name__}: expected strings (or an integer sample_id)")
        traces.append(Trace(hidden=h, routing=g, topk=k, token_ids=tok, dataset=ds, sample_id=sid,
                            layer_id=getattr(r, "layer_id", None), where=where))
    return traces


# ----------------------------------------------------------------------------------------------
# where each trace sits in the collection, and so its layer


def sample_id_counter(traces: list[Trace]) -> list[int] | None:
    """The original collectors named each trace after a running trace counter (`trace_1500`,
    `sample_1500`): if every sample_id ends in an integer and they count up by one, that integer is
    the trace's position in the whole collection, whichever shards are present."""
    nums = []
    for t in traces:
        # at most 18 digits: a longer run is no counter, and int() of a huge one raises
        m = re.fullmatch(r"(?:.*\D)?(\d{1,18})", str(t.sample_id)) if t.sample_id is not None else None
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


def num_layers_from_config(inputs: list[Path]) -> tuple[int | None, str, list[str]]:
    """The original streaming collector wrote `training_config.json` (model_info.num_layers) beside its shards.
    Returns (L, the file it came from, one line per config that exists but gives no L)."""
    unusable = []
    for d in sorted({p.parent for p in inputs}):
        cfg = d / CONFIG_FILE
        if not cfg.is_file():
            continue
        try:
            L = json.loads(cfg.read_text())["model_info"]["num_layers"]
        except OSError as e:
            unusable.append(f"{cfg}: cannot read ({e.strerror or e})")
            continue
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past the parser's depth
            unusable.append(f"{cfg}: not readable JSON ({' '.join(str(e).split())[:200]})")
            continue
        except (KeyError, TypeError):
            unusable.append(f"{cfg}: has no model_info.num_layers")
            continue
        if type(L) is int and L > 0:
            return L, str(cfg), unusable
        unusable.append(f"{cfg}: model_info.num_layers is a {type(L).__name__}, not a positive integer"
                        if type(L) is not int else f"{cfg}: model_info.num_layers is {L}")
    return None, "", unusable


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


# ----------------------------------------------------------------------------------------------
# writing an import: the input files in order, and one output shard per input shard (scripts/import_specmoe_shards.py)


def natural_key(path: Path) -> list:
    """shard_2 before shard_10 (plain sorting puts shard_1000 before shard_100_)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def expand_inputs(specs: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted([*p.glob("*.pkl"), *p.glob("*.pickle")], key=natural_key)
            if not found:
                raise UserError(f"--input {p}: no *.pkl or *.pickle shards in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"--input {p}: no such file or directory")
    if len({f.resolve() for f in files}) != len(files):
        raise UserError("--input names the same shard twice")
    return files


def open_shard(path: Path, idx: int, passes: list[ForwardPass], L: int, dims: dict[str, int],
               probabilities: bool) -> ShardWriter:
    """The collector's shard layout: sequences = the batch rows of each pass, tokens = all their positions."""
    S, N = sum(fp.shape[0] for fp in passes), sum(fp.tokens for fp in passes)
    H, E, K = dims["H"], dims["E"], dims["K"]
    specs = shard_specs(N, S, num_layers=L, top_k=K, num_experts=E, hidden_size=H, hidden_layers=L,
                        hidden_dtype="float16", store_logits=not probabilities)
    return ShardWriter(path, specs, {"format_version": "1", "shard": str(idx)})


def fill_shard(writer: ShardWriter, passes: list[ForwardPass], first_seq: int, source_of_pass: list[int],
               probabilities: bool, norm_topk_prob: bool) -> float:
    """Write every pass's rows; returns how many (token, layer) rows have ids equal to the routing's top-k."""
    B_of = [fp.shape[0] for fp in passes]
    lengths = np.concatenate([np.full(fp.shape[0], fp.shape[1], dtype=np.int64) for fp in passes])
    writer.write("seq_offsets", np.concatenate([[0], np.cumsum(lengths)]))
    writer.write("seq_ids", np.arange(first_seq, first_seq + sum(B_of), dtype=np.int64))
    writer.write("seq_sources", np.repeat(np.array(source_of_pass, dtype=np.int16), B_of))
    row, agree = 0, 0.0
    for fp in passes:
        writer.write("token_ids", token_ids_of(fp), row=row)
        arrays = pass_arrays(fp, probabilities, norm_topk_prob)
        for layer in range(len(fp.traces)):
            for key in ("hidden", "topk_ids", "topk_weights", "router_logits"):
                if arrays[key]:
                    writer.write(key, arrays[key][layer], index=(layer,), row=row)
        agree += float(sum(arrays["topk_agree"]))
        row += fp.tokens
    return agree
