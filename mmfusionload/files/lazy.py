"""Lazy state dicts: tensors created on first access, shapes and dtypes from headers.

Every lazy state is a :class:`LazyState`; :func:`is_lazy` is the one test the
rest of the package uses.
"""
import json
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .pickle_ops import CheckpointValueError, CorruptFileError
from .snapshot import Snapshot
from .zipdir import LOCAL_SIG


class LazyState(Mapping):
    """A ``key -> tensor`` mapping whose tensors are created on access.

    Subclasses give :meth:`shape` and :meth:`dtype` without creating a tensor and
    :attr:`materialized`, the keys whose tensors exist.
    """

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    @property
    def materialized(self) -> List[str]:
        raise NotImplementedError


def is_lazy(state: Any) -> bool:
    """Whether ``state`` creates its tensors on access (and every value is a tensor)."""
    return isinstance(state, LazyState)


def is_safetensors(path: str, head: Optional[bytes] = None) -> bool:
    """Whether ``path`` is a safetensors file (by suffix, or by ``head``, its first 9 bytes)."""
    if path.endswith('.safetensors'):
        return True
    if head is None:
        try:
            with open(path, 'rb') as f:
                head = f.read(9)
        except OSError:
            return False
    return len(head) == 9 and head[8:9] == b'{' and head[:4] != LOCAL_SIG


def safetensors_dtypes() -> Dict[str, torch.dtype]:
    """safetensors dtype names -> torch dtypes, as safetensors 0.8.0 reads them
    (``safetensors.torch._TYPES``: ``F8_E4M3``, ``U16``, ``U64``... included)."""
    from safetensors import torch as st_torch
    return dict(st_torch._TYPES)


#: ``UntypedStorage`` slicing without ``torch/storage.py``'s wrapper (which only refuses
#: meta storages, torch 2.13.0): a storage over part of another's bytes, keeping it alive.
_slice_storage = torch._C.StorageBase.__getitem__

#: Longest header safetensors 0.8.0 accepts (``N_MAX`` in its Rust ``read_metadata``).
MAX_HEADER = 100_000_000


class SafetensorsState(LazyState):
    """A safetensors file as a lazy ``key -> tensor`` mapping.

    The file is read once, through one descriptor, into private memory
    (:class:`~mmfusionload.files.snapshot.Snapshot`), and its header checked as
    safetensors checks it: a JSON object of at most :data:`MAX_HEADER` bytes, every
    entry a known dtype, a shape and ``data_offsets`` whose span holds exactly the
    shape's bytes, the spans following each other from 0 to the end of the data
    with no hole or overlap. A tensor is a view of the private bytes, created on
    first access. ``_metadata`` carries the module versions stored under the
    ``module_versions`` metadata key.

    Args:
        source (str | Snapshot): The file, or an open snapshot of it.
    """

    def __init__(self, source: Union[str, Snapshot]):
        if isinstance(source, Snapshot):
            self.path = source.path
            self._read(source)
        else:
            self.path = source
            with Snapshot(source) as snap:
                self._read(snap)
                snap.check()
        self._cache: Dict[str, torch.Tensor] = {}

    def _read(self, snap: Snapshot) -> None:
        if snap.size < 8:
            raise CorruptFileError('a safetensors file shorter than its header length')
        n = int.from_bytes(snap.pread(0, 8), 'little')
        if n > MAX_HEADER or 8 + n > snap.size:
            raise CorruptFileError(f'safetensors header of {n} bytes in a file of {snap.size}')
        try:
            header = json.loads(snap.pread(8, n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointValueError(f'safetensors header is not JSON ({e})') from None
        if not isinstance(header, dict):
            raise CheckpointValueError('safetensors header is not a JSON object')
        meta = header.pop('__metadata__', None) or {}
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CheckpointValueError('safetensors __metadata__ is not a str -> str object')
        self.metadata: Dict[str, str] = meta
        start, data_len = 8 + n, snap.size - 8 - n
        dtypes = safetensors_dtypes()
        self._info: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        spans = []
        for key, entry in header.items():
            if not isinstance(entry, dict) or set(entry) != {'dtype', 'shape', 'data_offsets'}:
                raise CheckpointValueError(f'{key}: safetensors entry without exactly dtype, '
                                           'shape and data_offsets')
            name, shape, offsets = entry['dtype'], entry['shape'], entry['data_offsets']
            if name not in dtypes:
                raise CheckpointValueError(f'{key}: unknown safetensors dtype {str(name)[:16]!r}')
            if not (isinstance(shape, list) and len(shape) <= 64 and all(
                    type(d) is int and d >= 0 for d in shape)):
                raise CheckpointValueError(f'{key}: shape is not a list of non-negative ints')
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                    type(o) is int and 0 <= o <= data_len for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise CheckpointValueError(f'{key}: data_offsets {offsets!r:.60} outside the '
                                           f'{data_len} data bytes')
            numel = 1
            for d in shape:
                numel *= d
            itemsize = dtypes[name].itemsize
            if numel * itemsize != offsets[1] - offsets[0]:
                raise CheckpointValueError(f'{key}: shape {shape} of {name} needs '
                                           f'{numel * itemsize} bytes, data_offsets span '
                                           f'{offsets[1] - offsets[0]}')
            self._info[key] = (name, tuple(shape), start + offsets[0], numel)
            spans.append((offsets[0], offsets[1], key))
        spans.sort()
        end = 0
        for lo, hi, key in spans:
            if lo != end:
                raise CheckpointValueError(f'{key}: data_offsets start at {lo}, the data before '
                                           f'ends at {end} (overlap or hole)')
            end = hi
        if end != data_len:
            raise CheckpointValueError(f'the tensors hold {end} bytes, the data is {data_len}')
        self._keys = list(self._info)
        # the data, read once into private memory: every tensor is a view of it
        self._data = snap.read_storage(0, snap.size)

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._cache.get(key)
        if t is None:
            if key not in self._info:
                raise KeyError(key)
            name, shape, offset, numel = self._info[key]
            dtype = safetensors_dtypes()[name]
            if offset % dtype.itemsize:  # a header not padded to 8 bytes: an aligned copy
                raw = torch.empty((0, ), dtype=torch.uint8).set_(
                    self._data, offset, (numel * dtype.itemsize, ))
                t = raw.clone().view(dtype).reshape(shape)
            else:  # a storage of its own bytes (torch.save writes each tensor's own)
                own = _slice_storage(self._data, slice(offset, offset + numel * dtype.itemsize))
                t = torch.empty((0, ), dtype=dtype).set_(own, 0, shape)
            self._cache[key] = t
        return t

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._info

    @property
    def materialized(self) -> List[str]:
        """Keys whose tensors have been created."""
        return list(self._cache)

    def shape(self, key: str) -> Tuple[int, ...]:
        """The tensor's shape, from the header."""
        return self._info[key][1]

    def dtype(self, key: str) -> str:
        """The tensor's dtype as safetensors names it (``F32``, ``BF16``...)."""
        return self._info[key][0]


def read_safetensors(source: Union[str, Snapshot]) -> Dict[str, Any]:
    """Read a safetensors file as a checkpoint dict with ``state_dict`` and ``meta``.

    The state dict is a lazy :class:`SafetensorsState` (nothing is read here).
    ``module_versions`` must be a JSON object of module name -> int.
    """
    state = SafetensorsState(source)
    meta = dict(state.metadata)
    raw = meta.pop('module_versions', '{}')
    try:
        versions = json.loads(raw) if len(raw) <= (1 << 24) else None
    except ValueError:
        versions = None
    if not isinstance(versions, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in versions.items()):
        raise CheckpointValueError('metadata module_versions is not a JSON object of module '
                                   'name -> int')
    if versions:
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, {'version': v}) for k, v in versions.items())
    return {'state_dict': state, 'meta': meta}
