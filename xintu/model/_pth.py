"""A reader for PyTorch's legacy (non-zip) ``.pth`` format, with ``pickle`` and NumPy only.

``torch.save(..., _use_new_zipfile_serialization=False)`` writes, back to back:

1. a pickle of the magic number ``0x1950A86A20F9469CFC6C``;
2. a pickle of the protocol version, ``1001``;
3. a pickle of system info, ``{"protocol_version": 1001, "little_endian": True,
   "type_sizes": {...}}``;
4. the pickle of the object itself (here an ``OrderedDict`` state dict). Each tensor is
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
   backward_hooks)`` whose ``storage`` is a *persistent id*
   ``("storage", torch.FloatStorage, key, location, numel, view_metadata)``;
5. a pickle of the list of storage keys;
6. for each key in that order: the element count as 8 bytes little-endian, then the
   raw little-endian elements.

Unpickling calls whatever the file names, so :class:`_SafeUnpickler` resolves only
the handful of globals a state dict needs (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``, ``torch.*Storage``), the torch ones to harmless
stand-ins defined here, and refuses every other name with :class:`ForbiddenGlobal`.
Tensors come back as references, filled from the raw storages once the pickle is
done. Nothing from ``torch`` is imported (it need not be installed).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from typing import Any, NamedTuple, TypeGuard

import numpy as np
import numpy.typing as npt

__all__ = ["ForbiddenGlobal", "read_legacy_pth"]

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

# torch storage class name -> little-endian NumPy dtype of its elements.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only the class name.

    A pickle can set attributes on objects it names (``BUILD``), so each lookup gets
    a fresh instance and the name is checked against ``_STORAGE_DTYPES`` when used.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _StorageRef(NamedTuple):
    """A storage named by a persistent id; its bytes come after the pickle.

    A tuple, like :class:`_TensorRef`, so a pickle cannot set its fields (``BUILD``).
    """

    key: str
    dtype: np.dtype[Any]
    numel: int
    # For old view storages: the root storage's key and the view's offset in it.
    root_key: str
    root_offset: int


class _TensorRef(NamedTuple):
    """What ``_rebuild_tensor_v2`` returns here: where a tensor's elements live."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _RebuildTensorV2:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; checks the argument types.

    Slotted with no attributes, so a pickle cannot alter the shared instance.
    """

    __slots__ = ()

    def __call__(
        self,
        storage: object,
        storage_offset: object,
        size: object,
        stride: object,
        requires_grad: object = False,
        backward_hooks: object = None,
        metadata: object = None,
    ) -> _TensorRef:
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor storage is not a persistent storage id")
        if not (_is_index(storage_offset) and _is_index_tuple(size) and _is_index_tuple(stride)):
            raise pickle.UnpicklingError("tensor offset, size or stride is not made of integers")
        if len(size) != len(stride):
            raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
        return _TensorRef(storage, storage_offset, size, stride)


def _is_index(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_index_tuple(value: object) -> TypeGuard[tuple[int, ...]]:
    return isinstance(value, tuple) and all(_is_index(v) for v in value)


_REBUILD_TENSOR_V2 = _RebuildTensorV2()


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global other than the few a state dict needs."""


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only a state dict's globals; storages arrive as :class:`_StorageRef`."""

    def find_class(self, module: str, name: str) -> Any:
        # Only these names; each resolves to an object the pickle cannot turn into code.
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # a C type: attributes cannot be set on it
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _REBUILD_TENSOR_V2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ForbiddenGlobal(f"global '{module}.{name}' is forbidden")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError("malformed storage persistent id")
        dtype_name = _STORAGE_DTYPES.get(storage_type.name)
        if dtype_name is None:
            raise pickle.UnpicklingError(f"storage {key}: unknown storage type")
        dtype = np.dtype(dtype_name)
        if not _is_index(numel):
            raise pickle.UnpicklingError(f"storage {key}: bad element count {numel!r}")
        if view is None:
            return _StorageRef(key, dtype, numel, key, 0)
        # Pre-1.0 files: (root_key, offset, view_numel) of a view into another storage.
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
            raise pickle.UnpicklingError(f"storage {key}: malformed view metadata")
        root_key, root_offset, view_numel = view
        if not (_is_index(root_offset) and _is_index(view_numel)):
            raise pickle.UnpicklingError(f"storage {key}: malformed view metadata")
        return _StorageRef(key, dtype, view_numel, root_key, root_offset)


def _load(stream: io.BytesIO) -> Any:
    """One pickle from *stream*; any failure but running out of data is UnpicklingError."""
    try:
        return _SafeUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError):
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, OverflowError) as exc:
        # What the pickle module raises for garbage, e.g. a bad memo index.
        raise pickle.UnpicklingError(f"malformed pickle: {exc}") from exc


def read_legacy_pth(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of the legacy ``.pth`` state dict in *data*, as NumPy arrays.

    Arrays are C-contiguous copies in native byte order, shaped and strided as the
    tensors were. Non-tensor entries are ignored.

    Raises :class:`ForbiddenGlobal` (an :class:`pickle.UnpicklingError`) for a pickle
    that names any other global, :class:`pickle.UnpicklingError` for a malformed one,
    and :class:`ValueError` when the data is not this format or is truncated.
    """
    if data.startswith(b"PK\x03\x04"):
        raise ValueError("a zip-format .pth file; only the legacy format is supported")
    stream = io.BytesIO(data)
    try:
        magic = _load(stream)
        version = _load(stream)
        sys_info = _load(stream)
    except ForbiddenGlobal:
        raise
    except (EOFError, pickle.UnpicklingError):
        raise ValueError("not a legacy .pth file: unreadable header") from None
    if magic != _MAGIC:
        raise ValueError("not a legacy .pth file: bad magic number")
    if version != _PROTOCOL_VERSION:
        raise ValueError(f"unsupported .pth protocol version {version!r}")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ValueError("unsupported .pth file: not little-endian")

    try:
        state = _load(stream)
        keys = _load(stream)
    except EOFError:
        raise ValueError("truncated .pth file: pickle ended early") from None
    if not isinstance(state, dict):
        raise ValueError(f"the .pth file holds a {type(state).__name__}, not a state dict")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise ValueError("malformed .pth file: storage key list")

    tensors = {n: t for n, t in state.items() if isinstance(n, str) and isinstance(t, _TensorRef)}
    dtypes = {t.storage.root_key: t.storage.dtype for t in tensors.values()}
    storages = _read_storages(data, stream.tell(), keys, dtypes)
    return {name: _materialise(name, t, storages) for name, t in tensors.items()}


def _read_storages(
    data: bytes, pos: int, keys: list[str], dtypes: dict[str, np.dtype[Any]]
) -> dict[str, npt.NDArray[Any]]:
    """The raw storages after the pickles: ``<u8 count`` then elements, for each key."""
    storages: dict[str, npt.NDArray[Any]] = {}
    for key in keys:
        if pos + 8 > len(data):
            raise ValueError(f"truncated .pth file: storage {key} missing")
        count = int.from_bytes(data[pos : pos + 8], "little")
        pos += 8
        # A storage no tensor uses cannot be skipped: its element size is unknown.
        dtype = dtypes.get(key)
        if dtype is None:
            raise ValueError(f"malformed .pth file: storage {key} is used by no tensor")
        end = pos + count * dtype.itemsize
        if end > len(data):
            raise ValueError(f"truncated .pth file: storage {key} cut short")
        storages[key] = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
        pos = end
    if pos != len(data):
        raise ValueError(f"malformed .pth file: {len(data) - pos} trailing bytes")
    return storages


def _materialise(
    name: str, t: _TensorRef, storages: dict[str, npt.NDArray[Any]]
) -> npt.NDArray[Any]:
    """Copy tensor *t* out of its storage, honouring offset, size and stride."""
    root = storages.get(t.storage.root_key)
    if root is None:
        raise ValueError(f"{name}: storage {t.storage.root_key} not in the file")
    flat = root[t.storage.root_offset : t.storage.root_offset + t.storage.numel]
    if len(flat) != t.storage.numel:
        raise ValueError(f"{name}: storage {t.storage.key} is shorter than declared")
    native = flat.dtype.newbyteorder("=")
    if any(n == 0 for n in t.size):
        return np.zeros(t.size, dtype=native)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))
    # The second test refuses stride-0 "expanded" tensors far larger than the file.
    if last >= len(flat) or math.prod(t.size) > len(flat):
        raise ValueError(f"{name}: size {t.size} and stride {t.stride} overrun its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset :],
        shape=t.size,
        strides=tuple(s * flat.itemsize for s in t.stride),
        writeable=False,
    )
    return np.array(view, dtype=native, order="C", copy=True)
