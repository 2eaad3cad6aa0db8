"""A torch-free reader of the files PyTorch writes (torch.save, torch.jit.save).

Runtime code of msfp_jax never imports torch: converters and the FID Inception loader read PyTorch files through
this module, which returns plain Python containers with `np.ndarray` leaves in place of tensors.

Formats read:
- the zip format (torch >= 1.6 default): `<folder>/data.pkl` plus one record `<folder>/data/<key>` per storage;
  the folder name varies (the file's stem, "archive", ...);
- the legacy format (`_use_new_zipfile_serialization=False`, and every file of torch < 1.6): a sequence of pickles
  (magic number, protocol version, system info, the object, the storage keys) followed by the raw storages;
- TorchScript archives (torch.jit.save): `load_torchscript_state_dict` walks the pickled `__torch__` objects and
  uses the class definitions under `code/` to tell parameters and buffers from other attributes.

Safety: nothing in a file is imported or executed. The unpickler resolves only an allow-list of plain builtins,
collections, numpy reconstruction helpers and torch's tensor rebuild functions (replaced by numpy equivalents);
every other global becomes an inert `PickledObject` placeholder that records its name, arguments and state.
"""
from __future__ import annotations

import ast
import builtins
import codecs
import collections
import copyreg
import io
import mmap
import os
import pickle
import re
import struct
import types
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "PickledObject",
    "TorchFileError",
    "is_torchscript_archive",
    "load_torch_file",
    "load_torchscript_state_dict",
    "pickled_module_state_dict",
]

# The legacy format starts with this number, pickled (torch/serialization.py MAGIC_NUMBER / PROTOCOL_VERSION).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
_ZIP_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature ... file name length, extra field length


class TorchFileError(ValueError):
  """A file that cannot be read as a PyTorch file: missing, of another kind, truncated or corrupt."""


# ----------------------------------------------------------------------------------------------------------------
# dtypes

# torch's legacy typed storage classes (`torch.FloatStorage`, also `torch.cuda.FloatStorage` in old files) and the
# element type they hold. `UntypedStorage` holds bytes; the tensor's dtype then comes with `_rebuild_tensor_v3`.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# `torch.<name>` dtype objects as they appear in pickles (e.g. the dtype argument of `_rebuild_tensor_v3`).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}


# Storages whose tensors are not supported (quantized) still need their element size to walk a legacy file.
_UNSUPPORTED_STORAGE_ITEMSIZES = {"QInt8Storage": 1, "QUInt8Storage": 1, "QInt32Storage": 4,
                                  "QUInt4x2Storage": 1, "QUInt2x4Storage": 1}


class _StorageType:
  """What `torch.FloatStorage` & co. resolve to: a marker carrying the element dtype (None: unsupported)."""

  def __init__(self, name: str, dtype: np.dtype | None):
    self.name = name
    self.dtype = dtype
    self.itemsize = dtype.itemsize if dtype is not None else _UNSUPPORTED_STORAGE_ITEMSIZES.get(name, 1)

  def __repr__(self) -> str:
    return f"<storage type {self.name}>"


class _Storage:
  """One storage of the file: where its bytes are and how to interpret them. Holds no array itself."""

  def __init__(self, key: str, dtype: np.dtype | None, type_name: str,
               read: Callable[[int, int], np.ndarray] | None, nbytes: int | None, big_endian: bool = False):
    self.key = key
    self.big_endian = big_endian
    self.dtype = dtype
    self.type_name = type_name
    # read(byte_offset, count_bytes) -> uint8 array; None while the data is not yet known (legacy first pass).
    self._read = read
    self.nbytes = nbytes

  def __repr__(self) -> str:
    return f"<storage {self.key!r} {self.type_name}>"

  def read_bytes(self, byte_offset: int, count: int) -> np.ndarray:
    return self._read(byte_offset, count)


# ----------------------------------------------------------------------------------------------------------------
# placeholders for unknown globals


class PickledObject:
  """An inert stand-in for an instance of a class that is not on the allow-list (never imported).

  Class attributes: `module`, `name`, `qualified_name` (f"{module}.{name}") of the pickled class.
  Instance attributes: `args` (constructor / `__reduce__` arguments), `kwargs`, `state` (what `__setstate__`
  would have received: usually the instance `__dict__`), `dict_items` and `list_items` (items added by the
  pickle when the class subclasses dict or list).
  """

  module = ""
  name = ""
  qualified_name = ""

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args = args
    obj.kwargs = kwargs
    obj.state = None
    obj.dict_items = {}
    obj.list_items = []
    return obj

  def __init__(self, *args, **kwargs):  # pylint: disable=unused-argument
    pass  # __new__ recorded everything; `cls(*args)` (REDUCE) must not fail either.

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.dict_items[key] = value

  def __getitem__(self, key):
    return self.dict_items[key]

  def __contains__(self, key) -> bool:
    return key in self.dict_items

  def append(self, value) -> None:
    self.list_items.append(value)

  def extend(self, values) -> None:
    self.list_items.extend(values)

  __iter__ = None  # __getitem__ alone would make placeholders look like sequences

  def __call__(self, *args, **kwargs) -> PickledObject:
    # A placeholder used as a callable (e.g. the result of a pickled `getattr`) yields another placeholder.
    return _placeholder_class(self.qualified_name, "__call__")(*args, **kwargs)

  def __repr__(self) -> str:
    return f"PickledObject({self.qualified_name})"


_PLACEHOLDER_CLASSES: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
  key = (module, name)
  if key not in _PLACEHOLDER_CLASSES:
    qualified = f"{module}.{name}" if module else name
    # NEWOBJ needs a real class, so each unknown global gets a PickledObject subclass of its own name.
    _PLACEHOLDER_CLASSES[key] = type(
        re.sub(r"\W", "_", name) or "Unknown", (PickledObject,),
        {"module": module, "name": name, "qualified_name": qualified, "__module__": __name__})
  return _PLACEHOLDER_CLASSES[key]


# ----------------------------------------------------------------------------------------------------------------
# tensor reconstruction (numpy versions of torch._utils' rebuild functions)


def _tensor_from_storage(storage, storage_offset, size, stride, dtype=None) -> np.ndarray:
  if not isinstance(storage, _Storage):
    raise TorchFileError(f"a tensor refers to {storage!r}, which is not a storage of this file")
  if dtype is None:
    dtype = storage.dtype
  if dtype is None:
    raise TorchFileError(f"tensors of storage type {storage.type_name} are not supported")
  if storage._read is None:  # legacy format, first pass: the storage data comes after the pickle.
    return None
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if len(size) != len(stride):
    raise TorchFileError(f"tensor size {size} and stride {stride} differ in length")
  if any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
    raise TorchFileError(f"negative tensor size {size}, stride {stride} or offset {storage_offset}")
  if 0 in size:
    return np.zeros(size, dtype)
  itemsize = dtype.itemsize
  span = 1 + sum((n - 1) * s for n, s in zip(size, stride))  # elements from the first to the last one used
  first_byte = storage_offset * itemsize
  if storage.nbytes is not None and first_byte + span * itemsize > storage.nbytes:
    raise TorchFileError(
        f"tensor of size {size}, stride {stride}, offset {storage_offset} reaches past the end of its storage "
        f"{storage.key!r} ({storage.nbytes} bytes): the file is truncated or corrupt")
  # Stride tricks go through a plain unsigned (or void) carrier of the element size: as_strided cannot
  # describe ml_dtypes' float8 types in its array interface.
  carrier = np.dtype(f"u{itemsize}") if itemsize in (1, 2, 4, 8) else np.dtype((np.void, itemsize))
  flat = storage.read_bytes(first_byte, span * itemsize).view(carrier)
  view = np.lib.stride_tricks.as_strided(flat, shape=size, strides=tuple(s * itemsize for s in stride),
                                         writeable=False)
  array = np.empty(size, dtype)  # own, contiguous memory: detached from the file and from other tensors
  array.view(carrier)[...] = view
  if storage.big_endian and itemsize > 1:
    array = array.byteswap()  # numpy swaps complex numbers per component, as torch does
  return array


def _apply_metadata(array, metadata):
  if array is None or not metadata:
    return array
  if isinstance(metadata, dict):
    if metadata.get("conj"):
      array = np.conj(array)
    if metadata.get("neg"):
      array = np.negative(array)
  return array


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks
  return _apply_metadata(_tensor_from_storage(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  del requires_grad, backward_hooks
  if not isinstance(dtype, np.dtype):
    raise TorchFileError(f"unsupported tensor dtype {dtype!r}")
  return _apply_metadata(_tensor_from_storage(storage, storage_offset, size, stride, dtype), metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data  # an nn.Parameter is its data here


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # Tensor subclasses (and Parameters with Python state): rebuild the plain tensor, drop the subclass.
  del new_type, state
  return func(*args)


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
  del device, requires_grad
  return np.asarray(data, dtype=dtype if isinstance(dtype, np.dtype) else None)


def _torch_size(*args):
  return tuple(args[0]) if args else ()


def _torch_device(*args):
  return ":".join(str(a) for a in args)


def _identity(value, *unused):
  return value


def _reconstructor(cls, base, state):
  # copyreg._reconstructor (protocol 0/1 pickles of plain objects) without calling arbitrary constructors.
  if isinstance(cls, type) and issubclass(cls, PickledObject):
    return cls.__new__(cls)
  return copyreg._reconstructor(cls, base, state)  # pylint: disable=protected-access


def _numpy_reconstruct(subtype, shape, dtype):
  # ndarray subclasses that are not on the allow-list (np.matrix, user classes) come back as plain arrays.
  if not (isinstance(subtype, type) and issubclass(subtype, np.ndarray)):
    subtype = np.ndarray
  return np._core.multiarray._reconstruct(subtype, shape, dtype)  # pylint: disable=protected-access


def _defaultdict(default_factory=None, *args):
  # Placeholders are callable, but a default factory never runs here: keep the items, drop the factory.
  return collections.defaultdict(None, *args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
  # Protocol-2 pickles store bytes as `_codecs.encode(str, "latin1")`; only text codecs are honoured.
  if not isinstance(text, str) or codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8", "ascii"):
    raise TorchFileError(f"refusing _codecs.encode with encoding {encoding!r}")
  return codecs.encode(text, encoding, errors)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): _defaultdict,
    ("collections", "deque"): collections.deque,
    ("collections", "Counter"): collections.Counter,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_device_tensor_from_numpy,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    # TorchScript's typed containers: `build_intlist([1, 2])`, `restore_type_tag(dict, "Dict[str, Tensor]")`.
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    # numpy's own pickle support (arrays, scalars, dtypes): constructs data, runs no user code.
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,  # pylint: disable=protected-access
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,  # pylint: disable=protected-access
}
for _name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str", "bytes",
              "bytearray", "slice", "range", "object"):
  _SAFE_GLOBALS[("builtins", _name)] = getattr(builtins, _name)
  _SAFE_GLOBALS[("__builtin__", _name)] = getattr(builtins, _name)  # Python 2 pickles
del _name


class _AllowedFunction:
  """An allow-listed Python function as the pickle sees it: callable, but its attributes cannot be changed.

  A pickle may BUILD on any object it can name; without this wrapper it could rewrite our functions'
  `__dict__` or defaults and so tamper with later loads.
  """

  __slots__ = ("_function",)

  def __init__(self, function: Callable):
    self._function = function

  def __call__(self, *args, **kwargs):
    return self._function(*args, **kwargs)

  def __setstate__(self, state):
    raise TorchFileError(f"the pickle tries to modify {self._function.__name__}; the file is corrupt or hostile")

  def __repr__(self) -> str:
    return f"<allowed {self._function.__name__}>"


_SAFE_GLOBALS = {key: _AllowedFunction(value) if isinstance(value, types.FunctionType) else value
                 for key, value in _SAFE_GLOBALS.items()}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the allow-list; storages come from `storage_for(persistent id)`."""

  def __init__(self, file, storage_for: Callable[[tuple], Any]):
    # latin1: Python 2 `str` in old checkpoints (including numpy array bytes) decodes losslessly.
    super().__init__(file, encoding="latin1")
    self._storage_for = storage_for

  def find_class(self, module: str, name: str):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module in ("torch", "torch.cuda", "torch.storage") and name.endswith("Storage"):
      return _StorageType(name, _STORAGE_DTYPES.get(name))
    if module == "torch" and name in _TORCH_DTYPES:
      return _TORCH_DTYPES[name]
    return _placeholder_class(module, name)

  def persistent_load(self, pid):
    return self._storage_for(pid)


# ----------------------------------------------------------------------------------------------------------------
# file access


def _check_path(path) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise TorchFileError(f"{path}: no such file; expected a PyTorch file (.pt/.pth/.ckpt) written by torch.save "
                         "or torch.jit.save")
  if os.path.isdir(path):
    raise TorchFileError(f"{path} is a directory; expected a PyTorch file (.pt/.pth/.ckpt) written by torch.save")
  if os.path.getsize(path) == 0:
    raise TorchFileError(f"{path} is empty; expected a PyTorch file written by torch.save")
  return path


class _ZipArchive:
  """A torch zip archive: records under one top-level folder, storages read straight from a memory map."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "rb")  # pylint: disable=consider-using-with
    try:
      self._zip = zipfile.ZipFile(self._file)
      self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
      self._file.close()
      raise TorchFileError(
          f"{path} starts like a zip archive (the torch.save format of torch >= 1.6) but cannot be read as one "
          f"({error}); the file is probably truncated or corrupt: download or save it again") from error
    self._infos = {info.filename: info for info in self._zip.infolist()}
    pickles = [name for name in self._infos if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
      self.close()
      raise TorchFileError(f"{path} is a zip archive but not a PyTorch file: expected one '<folder>/data.pkl' "
                           f"record, found {pickles or 'none'}")
    self.prefix = pickles[0][: -len("data.pkl")]
    # Absent on files older than torch 1.10, which were written on little-endian machines.
    byteorder = self.prefix + "byteorder"
    self.big_endian = self.has(byteorder) and self.read(byteorder).strip() == b"big"

  def close(self) -> None:
    self._zip.close()
    try:
      self._map.close()
    except BufferError:  # an array still views the map; the garbage collector closes it later
      pass
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def has(self, name: str) -> bool:
    return name in self._infos

  def names(self) -> list[str]:
    return list(self._infos)

  def read(self, name: str) -> bytes:
    try:
      return self._zip.read(self._infos[name])
    except KeyError as error:
      raise TorchFileError(f"{self.path}: the archive has no record {name!r}; the file is incomplete") from error
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
      raise TorchFileError(f"{self.path}: record {name!r} cannot be read ({error}); the file is corrupt") \
          from error

  def record_reader(self, name: str) -> tuple[Callable[[int, int], np.ndarray], int]:
    """(read(byte_offset, count) -> uint8 array, size in bytes) for a record, without reading it all."""
    info = self._infos.get(name)
    if info is None:
      raise TorchFileError(f"{self.path}: the archive has no record {name!r}; the file is incomplete")
    size = info.file_size
    if info.compress_type == zipfile.ZIP_STORED:
      header = self._map[info.header_offset: info.header_offset + _ZIP_LOCAL_HEADER.size]
      if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != _ZIP_LOCAL_HEADER_SIGNATURE:
        raise TorchFileError(f"{self.path}: bad zip header for record {name!r}; the file is corrupt")
      fields = _ZIP_LOCAL_HEADER.unpack(header)
      start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
      if start + size > len(self._map):
        raise TorchFileError(f"{self.path}: record {name!r} reaches past the end of the file; it is truncated")
      mapped = self._map

      def read(byte_offset: int, count: int) -> np.ndarray:
        return np.frombuffer(mapped, dtype=np.uint8, count=count, offset=start + byte_offset)
    else:  # torch never compresses, but a re-zipped archive may be
      data = np.frombuffer(self.read(name), dtype=np.uint8)

      def read(byte_offset: int, count: int) -> np.ndarray:
        return data[byte_offset: byte_offset + count]
    return read, size


def _unpickle(data, storage_for, path: str, what: str):
  try:
    return _RestrictedUnpickler(io.BytesIO(data) if isinstance(data, bytes) else data, storage_for).load()
  except TorchFileError as error:
    raise TorchFileError(f"{path}: {error}") from error
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
          struct.error, OverflowError, MemoryError, RecursionError) as error:
    raise TorchFileError(f"{path}: cannot unpickle {what} ({type(error).__name__}: {error}); the file is "
                         "truncated or corrupt") from error


def _zip_storage_loader(archive: _ZipArchive):
  storages: dict[str, _Storage] = {}

  def storage_for(pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage") or len(pid) < 5:
      raise TorchFileError(f"unknown persistent id {pid!r} in the pickle")
    _, storage_type, key, _location, _numel = pid[:5]
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    if key not in storages:
      if not isinstance(storage_type, _StorageType):
        raise TorchFileError(f"storage {key!r} has type {storage_type!r}, not a torch storage type")
      read, nbytes = archive.record_reader(f"{archive.prefix}data/{key}")
      storages[key] = _Storage(key, storage_type.dtype, storage_type.name, read, nbytes, archive.big_endian)
    return storages[key]

  return storage_for


# ----------------------------------------------------------------------------------------------------------------
# public API


def is_torchscript_archive(path) -> bool:
  """Whether `path` is a TorchScript archive written by torch.jit.save (a zip with `code/` and constants)."""
  path = _check_path(path)
  with open(path, "rb") as file:
    if file.read(4) != _ZIP_LOCAL_HEADER_SIGNATURE:
      return False
  with _ZipArchive(path) as archive:
    return _is_torchscript(archive)


def _is_torchscript(archive: _ZipArchive) -> bool:
  return archive.has(archive.prefix + "constants.pkl") or any(
      name.startswith(archive.prefix + "code/") for name in archive.names())


def load_torch_file(path) -> Any:
  """Reads a file written by `torch.save` (zip or legacy format) without torch.

  Returns the saved object with tensors (and nn.Parameters) as `np.ndarray` copies in their dtype (bfloat16 and
  float8 through ml_dtypes), `torch.Size` as tuples, and instances of classes outside the allow-list as inert
  `PickledObject` placeholders. Raises `TorchFileError` for a missing, foreign, truncated or corrupt file.
  """
  path = _check_path(path)
  try:
    return _load_torch_file(path)
  except OSError as error:
    raise TorchFileError(f"{path}: cannot be read ({error})") from error


def _load_torch_file(path: str) -> Any:
  with open(path, "rb") as file:
    head = file.read(512)
  if head.startswith(_ZIP_LOCAL_HEADER_SIGNATURE):
    with _ZipArchive(path) as archive:
      if _is_torchscript(archive):
        raise TorchFileError(f"{path} is a TorchScript archive (torch.jit.save); read its weights with "
                             "load_torchscript_state_dict")
      data = archive.read(archive.prefix + "data.pkl")
      return _unpickle(data, _zip_storage_loader(archive), path, "data.pkl")
  if len(head) > 262 and head[257:262] == b"ustar":
    raise TorchFileError(f"{path} is a tar archive: the torch.save format of PyTorch < 0.4, which is not "
                         "supported; load it with an old torch and save it again")
  return _load_legacy(path)


def _load_legacy(path: str) -> Any:
  not_torch = (f"{path} is not a PyTorch file: expected a zip archive written by torch.save (starting with 'PK') "
               "or the legacy torch.save format (a pickle of the magic number 0x1950a86a20f9469cfc6c)")
  with open(path, "rb") as file:
    try:
      magic = _RestrictedUnpickler(file, _no_storage).load()
    except Exception:  # pylint: disable=broad-except  (any garbage: not our format)
      magic = None
    if magic != _LEGACY_MAGIC_NUMBER:
      raise TorchFileError(not_torch)
    protocol = _unpickle(file, _no_storage, path, "the protocol version")
    if protocol != _LEGACY_PROTOCOL_VERSION:
      raise TorchFileError(f"{path}: unknown legacy torch.save protocol version {protocol!r} (expected "
                           f"{_LEGACY_PROTOCOL_VERSION})")
    _unpickle(file, _no_storage, path, "the system info")
    object_start = file.tell()

    # First pass: learn each storage's dtype (its data lies after the pickle, at offsets known only then).
    dtypes: dict[str, _StorageType] = {}
    views: dict[str, tuple[str, int, int]] = {}

    def record(pid):
      if _is_legacy_module_pid(pid):
        return pid[1]
      key, storage_type, view = _parse_legacy_pid(pid)
      dtypes.setdefault(key, storage_type)
      if view is not None:
        views[view[0]] = (key, view[1], view[2])
      return _Storage(key, storage_type.dtype, storage_type.name, None, None)

    _unpickle(file, record, path, "the saved object")
    keys = _unpickle(file, _no_storage, path, "the storage keys")
    if not isinstance(keys, list):
      raise TorchFileError(f"{path}: expected the list of storage keys after the object, found {type(keys)}")
    size = os.fstat(file.fileno()).st_size
    locations: dict[str, tuple[int, int]] = {}
    position = file.tell()
    for key in keys:
      key = str(key)
      if key not in dtypes:
        raise TorchFileError(f"{path}: storage {key!r} is listed but never used; the file is corrupt")
      if position + 8 > size:
        raise TorchFileError(f"{path}: the data of storage {key!r} is missing; the file is truncated")
      file.seek(position)
      (numel,) = struct.unpack("<q", file.read(8))
      itemsize = dtypes[key].itemsize
      if numel < 0 or position + 8 + numel * itemsize > size:
        raise TorchFileError(f"{path}: storage {key!r} ({numel} elements) reaches past the end of the file "
                             f"({size} bytes); the file is truncated")
      locations[key] = (position + 8, numel * itemsize)
      position += 8 + numel * itemsize

    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
      storages: dict[str, _Storage] = {}

      def storage(key: str) -> _Storage:
        if key not in storages:
          if key in views:
            root_key, offset, numel = views[key]
            root = storage(root_key)
            itemsize = dtypes[root_key].itemsize
            start, nbytes = offset * itemsize, numel * itemsize
            if start + nbytes > root.nbytes:
              raise TorchFileError(f"storage view {key!r} reaches past its storage {root_key!r}")
            storages[key] = _Storage(key, root.dtype, root.type_name,
                                     lambda o, c, r=root, s=start: r.read_bytes(s + o, c), nbytes)
          else:
            if key not in locations:
              raise TorchFileError(f"storage {key!r} has no data in the file; the file is corrupt")
            start, nbytes = locations[key]
            storages[key] = _Storage(
                key, dtypes[key].dtype, dtypes[key].name,
                lambda o, c, s=start: np.frombuffer(mapped, dtype=np.uint8, count=c, offset=s + o), nbytes)
        return storages[key]

      def load(pid):
        if _is_legacy_module_pid(pid):
          return pid[1]
        key, _, view = _parse_legacy_pid(pid)
        return storage(view[0] if view is not None else key)

      file.seek(object_start)
      result = _unpickle(file, load, path, "the saved object")
      storages.clear()
  return result


def pickled_module_state_dict(module) -> collections.OrderedDict:
  """The `state_dict()` of an nn.Module saved whole (`torch.save(model)`), read back as a `PickledObject`.

  Same names and order as torch's `Module.state_dict()`: per module its parameters, its persistent buffers, then
  its submodules recursively.
  """
  out = collections.OrderedDict()
  _collect_pickled_module(module, "", out)
  return out


def _collect_pickled_module(module, prefix: str, out: dict) -> None:
  state = module.state if isinstance(module, PickledObject) else None
  if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
    raise TorchFileError(f"expected a pickled torch.nn.Module at {prefix or 'the root'}, found {module!r}")
  non_persistent = state.get("_non_persistent_buffers_set") or set()
  for name, value in (state.get("_parameters") or {}).items():
    if value is not None:
      out[prefix + name] = value
  for name, value in (state.get("_buffers") or {}).items():
    if value is not None and name not in non_persistent:
      out[prefix + name] = value
  for name, child in state["_modules"].items():
    if child is not None:
      _collect_pickled_module(child, f"{prefix}{name}.", out)


def _no_storage(pid):
  raise TorchFileError(f"unexpected persistent id {pid!r}")


def _is_legacy_module_pid(pid) -> bool:
  # torch.save(model) in the legacy format refers to each nn.Module class as ("module", class, file, source);
  # the class is already a placeholder, so the model comes back as an inert PickledObject tree.
  return isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module")


def _parse_legacy_pid(pid):
  if not isinstance(pid, tuple) or not pid:
    raise TorchFileError(f"unknown persistent id {pid!r} in the pickle")
  kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
  if kind != "storage" or len(pid) != 6:
    raise TorchFileError(f"unknown persistent id {pid!r} in the pickle")
  _, storage_type, root_key, _location, _numel, view_metadata = pid
  if not isinstance(storage_type, _StorageType):
    raise TorchFileError(f"storage {root_key!r} has type {storage_type!r}, not a torch storage type")
  view = None
  if view_metadata is not None:
    view_key, offset, view_size = view_metadata
    view = (str(view_key), int(offset), int(view_size))
  return str(root_key), storage_type, view


# ----------------------------------------------------------------------------------------------------------------
# TorchScript


class _ScriptClass:
  def __init__(self, is_module: bool, parameters: list[str], buffers: list[str]):
    self.is_module = is_module
    self.parameters = parameters
    self.buffers = buffers


_CLASS_LINE = re.compile(r"^class\s+(\w+)\s*(?:\(([^)]*)\))?\s*:")
_LIST_LINE = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")


def _script_classes(archive: _ZipArchive) -> dict[str, _ScriptClass]:
  """Qualified class name -> what the serialized TorchScript code says about it (read, never executed)."""
  code_prefix = archive.prefix + "code/"
  classes: dict[str, _ScriptClass] = {}
  for name in archive.names():
    if not (name.startswith(code_prefix) and name.endswith(".py")):
      continue
    module = name[len(code_prefix): -len(".py")].replace("/", ".")
    current = None
    for line in archive.read(name).decode("utf-8", errors="replace").splitlines():
      match = _CLASS_LINE.match(line)
      if match:
        bases = [b.strip() for b in (match.group(2) or "").split(",")]
        current = _ScriptClass("Module" in bases, [], [])
        classes[f"{module}.{match.group(1)}"] = current
        continue
      match = _LIST_LINE.match(line)
      if match and current is not None:
        names = ast.literal_eval(match.group(2))
        if match.group(1) == "__parameters__":
          current.parameters = list(names)
        else:
          current.buffers = list(names)
  return classes


def load_torchscript_state_dict(path) -> dict[str, np.ndarray]:
  """The parameters and buffers of a TorchScript archive (torch.jit.save), without torch.

  Names and order equal `torch.jit.load(path).state_dict()`: per module its parameters, then its buffers (each
  in attribute order), then its submodules recursively, in registration order. Values are `np.ndarray`.
  """
  path = _check_path(path)
  try:
    return _load_torchscript_state_dict(path)
  except OSError as error:
    raise TorchFileError(f"{path}: cannot be read ({error})") from error


def _load_torchscript_state_dict(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as file:
    if file.read(4) != _ZIP_LOCAL_HEADER_SIGNATURE:
      raise TorchFileError(f"{path} is not a TorchScript archive: expected a zip archive written by "
                           "torch.jit.save (starting with 'PK')")
  with _ZipArchive(path) as archive:
    if not _is_torchscript(archive):
      raise TorchFileError(f"{path} is a torch.save file, not a TorchScript archive (it has no code/ folder); "
                           "read it with load_torch_file")
    classes = _script_classes(archive)
    root = _unpickle(archive.read(archive.prefix + "data.pkl"), _zip_storage_loader(archive), path, "data.pkl")
  state_dict: dict[str, np.ndarray] = {}
  _collect_state(root, "", classes, state_dict, path)
  return state_dict


def _collect_state(module, prefix: str, classes: dict[str, _ScriptClass], out: dict, path: str) -> None:
  if not isinstance(module, PickledObject):
    raise TorchFileError(f"{path}: expected a TorchScript module at {prefix or 'the root'}, found {module!r}")
  info = classes.get(module.qualified_name)
  if info is None:
    raise TorchFileError(f"{path}: no code for class {module.qualified_name} in the archive; it is corrupt")
  attributes = module.state if isinstance(module.state, dict) else {}
  for names in (info.parameters, info.buffers):
    for name, value in attributes.items():
      if name in names and isinstance(value, np.ndarray):
        out[prefix + name] = value
  for name, value in attributes.items():
    if isinstance(value, PickledObject):
      child = classes.get(value.qualified_name)
      if child is not None and child.is_module:
        _collect_state(value, f"{prefix}{name}.", classes, out, path)
