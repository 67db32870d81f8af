"""Reads PyTorch checkpoint files (whole pickled modules or state dicts) without running code from them.

`torch.load(weights_only=False)` -- and plain `pickle` -- call whatever callables a file names, so a
downloaded `.pkl` can run arbitrary code. OpenAI's `encoder.pkl` / `decoder.pkl` are whole modules saved
with `torch.save(module)`, which `weights_only=True` refuses. This reader sits in between: its unpickler
resolves only an explicit allowlist of globals, and every module class it admits is replaced by an inert
stand-in (`ModuleRecord`) that merely stores the `__dict__` state it is given. Tensor rebuild functions
are replaced by ones that record (storage, offset, shape, stride); the bytes are then read straight into
numpy. Neither torch nor `dall_e` is imported.

Formats: torch's zip format (`<root>/data.pkl` + `<root>/data/<key>`, torch >= 1.6) and the legacy
stream (magic number, protocol, sys info, pickle, storage keys, raw storages; `torch.save(...,
_use_new_zipfile_serialization=False)`). The pre-1.0 tar format is refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dalle_jax.errors import DalleJaxError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class UnsafePickleError(DalleJaxError, pickle.UnpicklingError):
    """The file names a global outside the allowlist (or is otherwise not plain weights); nothing was run.

    `global_name` is the refused "module.name", or None when the refusal had another reason.
    """

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


class UnsupportedCheckpointError(DalleJaxError, ValueError):
    """The file is not a format this reader understands (e.g. torch's pre-1.0 tar format)."""


# ---------------------------------------------------------------------------------------- stand-ins


class ModuleRecord:
    """Inert stand-in for an `nn.Module` subclass: keeps the pickled `__dict__`, has no behaviour."""

    qualified_name = "?"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.qualified_name}: expected a dict of module state, got "
                                    f"{type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.qualified_name})"


@dataclasses.dataclass(frozen=True, slots=True)  # slots: a pickle's BUILD cannot rewrite fields
class StorageRef:
    """One serialized storage: its key in the file, element dtype and element count."""

    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True, slots=True)  # slots: a pickle's BUILD cannot rewrite fields
class TensorRef:
    """A tensor as `_rebuild_tensor_v2` describes it; strides and offset in elements."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)  # slots: a pickle's BUILD cannot rewrite fields
class _StorageType:
    name: str
    dtype: Callable[[], np.dtype]


@dataclasses.dataclass(frozen=True, slots=True)  # slots: a pickle's BUILD cannot rewrite fields
class Device:
    """What `torch.device(...)` unpickles to here: just its description."""

    spec: str


def _bfloat16() -> np.dtype:
    import ml_dtypes  # ships with jax; only needed for bf16 storages

    return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "DoubleStorage": lambda: np.dtype("<f8"),
    "FloatStorage": lambda: np.dtype("<f4"),
    "HalfStorage": lambda: np.dtype("<f2"),
    "BFloat16Storage": _bfloat16,
    "LongStorage": lambda: np.dtype("<i8"),
    "IntStorage": lambda: np.dtype("<i4"),
    "ShortStorage": lambda: np.dtype("<i2"),
    "CharStorage": lambda: np.dtype("i1"),
    "ByteStorage": lambda: np.dtype("u1"),
    "BoolStorage": lambda: np.dtype("?"),
    "UntypedStorage": lambda: np.dtype("u1"),
}

# nn.Module classes whose pickles are plain state (no custom __reduce__/__setstate__ that matters here).
_MODULE_CLASSES = (
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
)


def _stand_in(qualified_name: str) -> type[ModuleRecord]:
    return type(qualified_name.rsplit(".", 1)[1], (ModuleRecord,), {"qualified_name": qualified_name})


def _check_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsafePickleError(f"{what} must be a non-negative int, got {value!r}")
    return value


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not a serialized storage")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise UnsafePickleError(f"tensor size {size!r} / stride {stride!r} are not matching tuples")
    ref = TensorRef(storage, _check_int(storage_offset, "storage offset"),
                    tuple(_check_int(s, "tensor size") for s in size),
                    tuple(_check_int(s, "tensor stride") for s in stride))
    _check_bounds(ref)
    return ref


def _check_bounds(ref: TensorRef) -> None:
    """The largest element index read must lie inside the storage (as_strided would happily read past it)."""
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if math.prod(ref.shape) and last >= ref.storage.numel:
        raise UnsafePickleError(f"tensor {ref.shape} (stride {ref.stride}, offset {ref.offset}) reaches past its "
                                f"storage of {ref.storage.numel} elements")


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise UnsafePickleError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _device(*args: Any) -> Device:
    if not 1 <= len(args) <= 2 or not all(isinstance(a, (str, int)) for a in args):
        raise UnsafePickleError(f"torch.device{args!r}: unexpected arguments")
    return Device(":".join(str(a) for a in args))


def _reconstructor(cls: Any, base: Any, state: Any) -> ModuleRecord:
    """copyreg._reconstructor (pickle protocols 0/1), restricted to our stand-ins over `object`."""
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord)) or base is not object or state is not None:
        raise UnsafePickleError(f"copyreg._reconstructor({cls!r}, {base!r}, ...) is not a plain module")
    return cls.__new__(cls)


def _allowlist() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "object"): object,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("torch", "device"): _device,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)  # dtype resolved lazily (bf16 needs ml_dtypes)
    for qualified in _MODULE_CLASSES:
        module, name = qualified.rsplit(".", 1)
        allowed[(module, name)] = _stand_in(qualified)
    return allowed


ALLOWED_GLOBALS = _allowlist()


# ---------------------------------------------------------------------------------------- unpickler


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS; storages become StorageRefs collected in `self.storages`."""

    def __init__(self, file: BinaryIO, source: str, allowed: Mapping[tuple[str, str], Any]):
        super().__init__(file, encoding="utf-8")
        self.source = source
        self.allowed = allowed
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 2 modules (`__builtin__.set`); map them as pickle itself would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in self.allowed:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global '{module}.{name}' -- it is not on the allowlist of "
                f"plain module/tensor types, and loading it could run code from the file. Nothing was executed.",
                global_name=f"{module}.{name}")
        return self.allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], ModuleRecord):
            return pid[1]  # legacy format: (module, class, source file, source); the source is ignored
        if kind != "storage" or len(pid) not in (5, 6):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise UnsupportedCheckpointError(f"{self.source}: storage views (legacy format) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self.source}: storage of type {storage_type!r}")
        key = str(key)
        ref = StorageRef(key, storage_type.dtype(), _check_int(numel, "storage numel"))
        if self.storages.setdefault(key, ref) != ref:
            raise UnsupportedCheckpointError(f"{self.source}: storage {key} is used with two dtypes")
        return ref


def _load_pickle(file: BinaryIO, source: str, allowed: Mapping[tuple[str, str], Any] = ALLOWED_GLOBALS
                 ) -> tuple[Any, dict[str, StorageRef]]:
    unpickler = _RestrictedUnpickler(file, source, allowed)
    try:
        obj = unpickler.load()
    except (UnsafePickleError, UnsupportedCheckpointError):
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as err:
        raise UnsafePickleError(f"{source}: not a readable weights pickle ({type(err).__name__}: {err})") from err
    return obj, unpickler.storages


# ---------------------------------------------------------------------------------------- files


@dataclasses.dataclass
class TorchFile:
    """What a torch checkpoint holds: its flat tensors, and the root module's class if it is a module."""

    tensors: dict[str, np.ndarray]
    root_class: str | None  # e.g. "dall_e.encoder.Encoder"; None for a state dict
    root_attributes: dict[str, Any]  # plain (int/float/str/bool) attributes of the root module


def is_torch_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return zipfile.is_zipfile(path) or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def read_torch_file(path: str | Path) -> TorchFile:
    """Reads a `torch.save` file (zip or legacy) without executing anything it names; see module doc."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        obj, storages, read = _read_zip(path)
    else:
        obj, storages, read = _read_legacy(path)
    cache: dict[str, np.ndarray] = {}

    def materialise(ref: TensorRef) -> np.ndarray:
        _check_bounds(ref)
        if ref.storage.key not in cache:
            raw = read(ref.storage)
            cache[ref.storage.key] = np.frombuffer(raw, dtype=ref.storage.dtype, count=ref.storage.numel)
        flat = cache[ref.storage.key]
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.shape,
                                               strides=tuple(s * itemsize for s in ref.stride), writeable=False)
        return np.array(view)  # contiguous, owning copy

    refs, root_class, attributes = _flatten(obj, str(path))
    return TorchFile({name: materialise(ref) for name, ref in refs.items()}, root_class, attributes)


# torch.save writes zip members uncompressed; deflate gains < 2x on real weights. A member that expands more is a
# zip bomb (1 MB of deflated zeros declares 1 GB): refused from the zip directory, before anything is inflated.
MAX_COMPRESSION_RATIO = 100
MAX_PICKLE_BYTES = 64 << 20  # data.pkl holds module structure and tensor headers, never tensor data


class ZipBombError(UnsupportedCheckpointError):
    """A zip member would inflate far beyond its stored size; refused before anything is decompressed (and never
    handed to another reader)."""


def _check_zip_members(path: Path, archive: zipfile.ZipFile) -> None:
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION_RATIO * max(
                info.compress_size, 1):
            raise ZipBombError(
                f"{path}: member {info.filename} would inflate {info.compress_size:,} bytes to {info.file_size:,} "
                f"(more than {MAX_COMPRESSION_RATIO}x): refused as a zip bomb; nothing was decompressed")
        if info.filename.endswith("/data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise ZipBombError(f"{path}: {info.filename} declares {info.file_size:,} bytes (a torch "
                                             f"checkpoint's pickle is far below {MAX_PICKLE_BYTES:,}): refused")


def _read_zip(path: Path) -> tuple[Any, dict[str, StorageRef], Callable[[StorageRef], bytes]]:
    archive = zipfile.ZipFile(path)
    _check_zip_members(path, archive)
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise UnsupportedCheckpointError(f"{path}: a torch zip checkpoint has one <root>/data.pkl; found {pickles}")
    root = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    if f"{root}byteorder" in names and archive.read(f"{root}byteorder").strip() not in (b"little",):
        raise UnsupportedCheckpointError(f"{path}: big-endian checkpoints are not supported")
    with archive.open(pickles[0]) as f:
        obj, storages = _load_pickle(io.BytesIO(f.read()), str(path))

    def read(ref: StorageRef) -> bytes:
        name = f"{root}data/{ref.key}"
        if name not in names:
            raise UnsupportedCheckpointError(f"{path}: storage file {name} is missing")
        expected = ref.numel * ref.dtype.itemsize
        if archive.getinfo(name).file_size < expected:  # checked from the zip directory, before reading
            raise UnsupportedCheckpointError(f"{path}: storage {name} declares {archive.getinfo(name).file_size} "
                                             f"bytes, expected {ref.numel} x {ref.dtype.itemsize}")
        with archive.open(name) as member:
            raw = member.read(expected)  # never more than the pickle declared
        if len(raw) < expected:
            raise UnsupportedCheckpointError(f"{path}: storage {name} has {len(raw)} bytes, expected "
                                             f"{ref.numel} x {ref.dtype.itemsize}")
        return raw

    return obj, storages, read


def _read_legacy(path: Path) -> tuple[Any, dict[str, StorageRef], Callable[[StorageRef], bytes]]:
    with open(path, "rb") as f:
        data = f.read()
    if data[257:262] == b"ustar":
        raise UnsupportedCheckpointError(f"{path}: torch's pre-1.0 tar checkpoint format is not supported; "
                                         f"re-save it with a current torch (torch.save(obj, path))")
    if not data.startswith(b"\x80"):  # every pickle of protocol >= 2 opens with PROTO
        raise UnsupportedCheckpointError(f"{path}: neither a torch zip checkpoint nor torch's legacy format")
    stream = io.BytesIO(data)
    header_only: dict[tuple[str, str], Any] = {}  # magic, version, sys info and key list need no globals
    magic, _ = _load_pickle(stream, str(path), header_only)
    if magic != LEGACY_MAGIC_NUMBER:
        raise UnsupportedCheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
    version, _ = _load_pickle(stream, str(path), header_only)
    if version != LEGACY_PROTOCOL_VERSION:
        raise UnsupportedCheckpointError(f"{path}: unknown legacy torch protocol {version}")
    sys_info, _ = _load_pickle(stream, str(path), header_only)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise UnsupportedCheckpointError(f"{path}: big-endian checkpoints are not supported")
    obj, storages = _load_pickle(stream, str(path))
    keys, _ = _load_pickle(stream, str(path), header_only)
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise UnsupportedCheckpointError(f"{path}: storage key list does not match the pickled tensors")
    # Storages follow in key order, each as an int64 element count and the raw bytes.
    blobs: dict[str, bytes] = {}
    for key in map(str, keys):
        (numel,) = struct.unpack("<q", stream.read(8) or b"\0" * 8)
        ref = storages[key]
        raw = stream.read(numel * ref.dtype.itemsize)
        if numel != ref.numel or len(raw) != numel * ref.dtype.itemsize:
            raise UnsupportedCheckpointError(f"{path}: storage {key} is truncated or has the wrong size")
        blobs[key] = raw
    return obj, storages, lambda ref: blobs[ref.key]


def _flatten(obj: Any, source: str) -> tuple[dict[str, TensorRef], str | None, dict[str, Any]]:
    """A module tree (`_parameters`, persistent `_buffers`, `_modules`) or a state dict -> {dotted name: ref}."""
    out: dict[str, TensorRef] = {}

    def walk(record: ModuleRecord, prefix: str) -> None:
        state = getattr(record, "state", None)
        if state is None:
            raise UnsafePickleError(f"{source}: module {record.qualified_name} at '{prefix or '<root>'}' has no state")
        skip = set(state.get("_non_persistent_buffers_set", ()))
        for group in ("_parameters", "_buffers"):
            for name, value in state.get(group, {}).items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, TensorRef):
                    raise UnsafePickleError(f"{source}: {prefix}{name} is a {type(value).__name__}, not a tensor")
                out[prefix + name] = value
        for name, child in state.get("_modules", {}).items():
            if child is None:
                continue
            if not isinstance(child, ModuleRecord):
                raise UnsafePickleError(f"{source}: submodule {prefix}{name} is a {type(child).__name__}")
            walk(child, f"{prefix}{name}.")

    if isinstance(obj, ModuleRecord):
        walk(obj, "")
        attributes = {k: v for k, v in getattr(obj, "state", {}).items()
                      if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
        return out, obj.qualified_name, attributes
    if isinstance(obj, dict):
        for name, value in obj.items():
            if not isinstance(value, TensorRef):
                raise UnsupportedCheckpointError(f"{source}: entry {name!r} of the state dict is a "
                                                 f"{type(value).__name__}, not a tensor")
            out[str(name)] = value
        return out, None, {}
    raise UnsupportedCheckpointError(f"{source}: holds a {type(obj).__name__}, neither a module nor a state dict")
