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
import functools
import io
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
    nothing else. `_opaque_class` makes one subclass per name."""

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


@functools.cache
def _opaque_class(module: str, name: str) -> type:
    return type(name, (Opaque,), {"name": f"{module}.{name}"})


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class _StorageRef:
    def __init__(self, data: np.ndarray):
        self.data = data  # one-dimensional, the storage's elements


def _rebuild_tensor(storage: _StorageRef, offset: int, size, stride, *_) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a (copied, C-contiguous) view of the storage."""
    if not size:  # a scalar tensor
        return np.array(storage.data[offset])
    itemsize = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(storage.data[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor here."""
    del requires_grad, backward_hooks
    return data


_FUNCTIONS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the names a state_dict needs; storages come from the archive."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return name  # the storage's type, read by persistent_load
        return _opaque_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise PthError(f"unknown persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if storage_type not in STORAGE_DTYPES:
            raise PthError(f"tensor storage of type {storage_type!r} is not supported")
        raw = self._archive.read(f"{self._prefix}data/{key}")
        return _StorageRef(np.frombuffer(raw, dtype=np.dtype(STORAGE_DTYPES[storage_type])))


def read(path: str | Path):
    """The object `torch.save` wrote to `path` (zip format), tensors as NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise PthError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise PthError(f"{path} is not a zip-format .pth file (PyTorch >= 1.6): if it is the "
                       "legacy format, re-save it with torch.save(torch.load(f), f2)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise PthError(f"{path}: expected one <archive>/data.pkl in the zip, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            return _Unpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise PthError(f"{path}: cannot unpickle its data.pkl ({type(e).__name__}: {e})") from None


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
    storage_id = _tuple([_string("storage"), _global("torch", STORAGE_OF_DTYPE[array.dtype]),
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
        if array.dtype not in STORAGE_OF_DTYPE:
            raise PthError(f"{name}: dtype {array.dtype} has no torch storage type")
        arrays[name] = array
    pickled = _pickle(arrays)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        _aligned_entry(archive, f"{archive_name}/data.pkl", pickled)
        _aligned_entry(archive, f"{archive_name}/byteorder", b"little")
        for i, array in enumerate(arrays.values()):
            _aligned_entry(archive, f"{archive_name}/data/{i}", array.astype(
                array.dtype.newbyteorder("<"), copy=False).tobytes())
        _aligned_entry(archive, f"{archive_name}/version", b"3\n")


def _pickle(arrays: Mapping[str, np.ndarray]) -> bytes:
    items = b"".join(_string(name) + _tensor(str(i), array)
                     for i, (name, array) in enumerate(arrays.items()))
    return b"\x80\x02" + _EMPTY_ORDERED_DICT + b"(" + items + b"u."  # PROTO 2 ... MARK SETITEMS STOP
