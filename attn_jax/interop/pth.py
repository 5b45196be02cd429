"""PyTorch `.pth` files (`torch.save` of a `state_dict`) read and written without PyTorch.

Since PyTorch 1.6, `torch.save` writes a zip archive (entries stored uncompressed):

    <archive>/data.pkl      the pickled object (protocol 2); each tensor is a call
                            torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                            whose `storage` is a persistent id ('storage', torch.FloatStorage,
                            key, location, numel) naming the raw bytes of
    <archive>/data/<key>    one storage, little-endian
    <archive>/byteorder     "little"
    <archive>/version       the format version, "3"

`read_state_dict` unpickles `data.pkl` with an unpickler that constructs nothing but dicts, lists,
tuples, numbers, strings and the tensors' NumPy arrays: any other class named in the file (a
checkpoint's `argparse.Namespace`, say) becomes an inert `Opaque` record, and no code from the file
runs. `write_state_dict` emits the same archive with the opcodes of a `state_dict` written by hand
(the pickle module cannot name `torch._utils` functions without importing torch), which
`torch.load(..., weights_only=True)` accepts.

The legacy format of PyTorch < 1.6 (a bare pickle stream, not a zip) is refused with a way out.
"""

import collections
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from attn_jax.errors import UserError

# torch's storage classes and the NumPy dtypes of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
STORAGE_OF_DTYPE = {np.dtype(v): k for k, v in STORAGE_DTYPES.items()}
_ALIGNMENT = 64  # torch aligns each storage's bytes in the archive to 64 bytes (for mmap)


class PthError(UserError):
    """A file that is not a readable `.pth` state_dict."""


class Opaque:
    """A stand-in for an object of any class the file names other than tensors and containers: it
    keeps the class's name (`name`), its constructor's arguments and its pickled state, and does
    nothing else. The unpickler makes one subclass per name."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"Opaque({self.name})"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage: np.ndarray, offset, size, stride, *_) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a copy of the storage's elements the tensor covers. The
    sizes, strides and offset are checked to stay inside the storage (a crafted file cannot make
    it read other memory)."""
    size, stride = tuple(size), tuple(stride)
    if not (_is_index(offset) and all(map(_is_index, size)) and all(map(_is_index, stride))
            and len(size) == len(stride)):
        raise PthError(f"a tensor of size {size}, stride {stride}, offset {offset!r}")
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) \
            >= storage.size:
        raise PthError(f"a tensor of size {size} reaches past its storage of {storage.size} "
                       "elements (a truncated or corrupt file)")
    view = np.ndarray(size, storage.dtype, buffer=storage, offset=offset * storage.itemsize,
                      strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view, order="C")  # a writable copy


def _rebuild_parameter(data, *_):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor here."""
    return data


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the names a state_dict needs, each to a fresh wrapper of this unpickler's own
    (so that the file's BUILD opcodes can alter nothing beyond it); any other name is an inert
    `Opaque` class; storages come from the archive, each read once."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, np.ndarray] = {}
        self._names: dict[tuple[str, str], object] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._names:
            self._names[(module, name)] = self._resolve(module, name)
        return self._names[(module, name)]

    @staticmethod
    def _resolve(module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return lambda *args: collections.OrderedDict(*args)
        if (module, name) in _FUNCTIONS:
            function = _FUNCTIONS[(module, name)]
            return lambda *args: function(*args)
        if module == "torch" and name in STORAGE_DTYPES:
            return f"torch.{name}"  # the storage's type, read by persistent_load
        return type(name, (Opaque,), {"name": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PthError(f"unknown persistent id {pid!r}")
        storage_type, key = str(pid[1]).removeprefix("torch."), str(pid[2])
        if storage_type not in STORAGE_DTYPES:
            raise PthError(f"tensor storage of type {pid[1]!r} is not supported")
        if key not in self._storages:
            dtype = np.dtype(STORAGE_DTYPES[storage_type]).newbyteorder(self._byteorder)
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        return self._storages[key]


_READ_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
                IndexError, OverflowError, MemoryError, zipfile.BadZipFile, PthError)


def read(path: str | Path):
    """The object `torch.save` wrote to `path` (zip format), tensors as NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise PthError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise PthError(f"{path} is not a zip-format .pth file: a truncated download (fetch it "
                       "again), or PyTorch < 1.6's legacy format (re-save it with torch.save)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist()
                       if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise PthError(f"expected one <archive>/data.pkl in the zip, found {pickles}")
            prefix = pickles[0][: -len("data.pkl")]
            names = set(archive.namelist())
            byteorder = (archive.read(f"{prefix}byteorder").decode().strip()
                         if f"{prefix}byteorder" in names else "little")
            if byteorder not in ("little", "big"):
                raise PthError(f"byteorder {byteorder!r}")
            unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix,
                                   "<" if byteorder == "little" else ">")
            return unpickler.load()
    except _READ_ERRORS as e:
        raise PthError(f"{path} is not a readable .pth file ({type(e).__name__}: {e}): a "
                       "truncated or corrupt download? fetch it again") from None


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, np.ndarray]:
    """The `state_dict` in `path`, {name: array} in the file's order.

    A checkpoint that wraps it ({"model": state_dict, "optimizer": ..., "args": ...}, as DeiT's
    main.py saves) gives its `key` entry; without `key`, "model", then "state_dict", then the file's
    top-level dict itself is taken.
    """
    obj = read(path)
    if not isinstance(obj, Mapping):
        raise PthError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    candidates = [key] if key else ["model", "state_dict"]
    for name in candidates:
        if name in obj and isinstance(obj[name], Mapping):
            obj = obj[name]
            break
    else:
        if key:
            raise PthError(f"{path} has no entry {key!r} (it has {sorted(map(str, obj))})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if not_tensors:
        raise PthError(f"{path}: not a state_dict, {len(not_tensors)} entries are not tensors "
                       f"(e.g. {not_tensors[0]!r}); name the entry that holds one")
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# Writing: the pickle of an OrderedDict of tensors, opcode by opcode (pickle protocol 2)
# ---------------------------------------------------------------------------------------------
def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _string(s: str) -> bytes:
    encoded = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def _int(i: int) -> bytes:
    if 0 <= i < 2 ** 31:
        return b"J" + struct.pack("<i", i)
    return b"\x8a\x08" + struct.pack("<q", i)  # LONG1, 8 bytes


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


_EMPTY_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"  # EMPTY_TUPLE, REDUCE


def _tensor(key: str, array: np.ndarray) -> bytes:
    """_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()) of storage `key`."""
    storage_type = STORAGE_OF_DTYPE[array.dtype.newbyteorder("=")]
    storage_id = _tuple([_string("storage"), _global("torch", storage_type),
                         _string(key), _string("cpu"), _int(array.size)]) + b"Q"  # BINPERSID
    stride, step = [], 1
    for dim in reversed(array.shape):
        stride.insert(0, step)
        step *= dim
    args = _tuple([storage_id, _int(0), _tuple([_int(d) for d in array.shape]),
                   _tuple([_int(s) for s in stride]), b"\x89", _EMPTY_ORDERED_DICT])  # NEWFALSE
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _aligned_entry(archive: zipfile.ZipFile, name: str, payload: bytes) -> None:
    """Writes `payload` stored (uncompressed) with its bytes at a multiple of 64 in the file, as
    torch does, by padding the local header's extra field."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = archive.fp.tell() + 30 + len(name.encode()) + 4  # + the extra field's own header
    info.extra = struct.pack("<HH", 0x4246, (-header_end) % _ALIGNMENT) + b"Z" * (
        (-header_end) % _ALIGNMENT)  # id "FB", as torch's writer
    archive.writestr(info, payload)


def write_state_dict(path: str | Path, tensors: Mapping[str, np.ndarray],
                     archive_name: str = "archive") -> None:
    """Writes `tensors` ({name: array}, in order) as `torch.save(state_dict, path)` would."""
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value, order="C")  # (ascontiguousarray would make a scalar 1-d)
        if array.dtype.newbyteorder("=") not in STORAGE_OF_DTYPE:
            raise PthError(f"{name}: dtype {array.dtype} has no torch storage type")
        arrays[name] = array.astype(array.dtype.newbyteorder("<"), copy=False)  # torch's order
    pickled = _pickle(arrays)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        _aligned_entry(archive, f"{archive_name}/data.pkl", pickled)
        _aligned_entry(archive, f"{archive_name}/byteorder", b"little")
        for i, array in enumerate(arrays.values()):
            _aligned_entry(archive, f"{archive_name}/data/{i}", array.tobytes())
        _aligned_entry(archive, f"{archive_name}/version", b"3\n")


def _pickle(arrays: Mapping[str, np.ndarray]) -> bytes:
    items = b"".join(_string(name) + _tensor(str(i), array)
                     for i, (name, array) in enumerate(arrays.items()))
    return b"\x80\x02" + _EMPTY_ORDERED_DICT + b"(" + items + b"u."  # PROTO 2 ... MARK SETITEMS STOP
