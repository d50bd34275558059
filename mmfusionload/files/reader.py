"""Read checkpoint files safely: ``.pth`` through a restricted unpickler, ``.safetensors`` lazily.

Every local file is read as one version of it (:mod:`mmfusionload.files.snapshot`):
through one descriptor, into private memory, never mapped; a file replaced,
truncated or rewritten during the read gives that version whole or a
``FusionLoadError`` saying it changed while being read.

A ``.pth`` file is read without running anything it asks for
(:mod:`mmfusionload.files.safe_unpickle` says exactly what is admitted and why) and
without trusting its zip directory: every member must be stored (not
compressed), unique, inside the file and apart from the others, with a name
that stays inside the archive; every storage must fit in its member, and every
tensor's offset, sizes and strides inside its storage, before a view of its
bytes exists. Objects a weight load does not need (``message_hub`` buffers,
``argparse`` arguments, dates) become inert placeholders; MMEngine's
``HistoryBuffer`` is rebuilt from checked numbers only when a run resumes
(``bookkeeping=True``, what :func:`install_checkpoint_loader` asks for). Pass
``trust_checkpoint=True`` to load a file you trust completely with plain
unpickling.
"""
import gc
import io
import os
import os.path as osp
import re
import struct
import sys
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from mmengine.runner.checkpoint import CheckpointLoader

from ..errors import FusionLoadError, describe
from .remote import is_local, local_copy, mmengine_schemes, users_loader
from .lazy import is_safetensors, read_safetensors
from .sharded import is_sharded_index, read_sharded
from .zipdir import LOCAL_SIG, Member, read_member, zip_members
from .snapshot import FileChangedError, Snapshot
from .safe_unpickle import (CheckpointValueError, CorruptFileError, HistoryBufferState, Invalid,
                            NumpyArray, NumpyDtype, OpcodeBudget, Storages, UnsafeGlobalError,
                            opcode_limit, unpickle)

__all__ = ['read_checkpoint', 'install_checkpoint_loader', 'load_local']

#: Deepest nesting of containers a checkpoint may have.
MAX_DEPTH = 64
_KEY = re.compile(r'^[A-Za-z0-9_.]{1,64}$')


@dataclass
class _Storage:
    """A storage a persistent id names: its bytes, checked to fit."""
    name: str
    dtype: torch.dtype
    numel: int
    nbytes: int
    untyped: Any = None
    base: Any = None  # a view's root (old format)
    base_offset: int = 0


@dataclass
class _Deferred:
    """A tensor of an old-format file, built once its storage's bytes are read."""
    storage: _Storage
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype


def _text(value: Any, what: str, limit: int = 64) -> str:
    if isinstance(value, bytes):
        value = value.decode('ascii', 'replace')
    if not isinstance(value, str) or len(value) > limit:
        raise CheckpointValueError(f'{what} is not a short string')
    return value


class _FileStorages(Storages):
    """Storages of one checkpoint file (zip or old format)."""

    def __init__(self, restore: Optional[Callable]):
        super().__init__()
        self.restore = restore
        self.storages: Dict[str, _Storage] = {}
        self.by_ptr: Dict[Tuple[int, int], _Storage] = {}
        self.empty: Dict[torch.dtype, torch.Tensor] = {}  # dtype -> an empty CPU tensor

    def record(self, storage: Any) -> _Storage:
        if not isinstance(storage, _Storage):
            return super().record(storage)
        return storage

    def _kind(self, saved_id: Any, n: int) -> Tuple[Any, ...]:
        if n == 5 and type(saved_id) is tuple and len(saved_id) == 5:
            # what torch.save writes: plain short strings, checked without _text
            tag, kind, key, location, numel = saved_id
            if type(tag) is str and tag == 'storage' and type(key) is str and \
                    len(key) <= 64 and type(location) is str and len(location) <= 64 and \
                    type(kind).__name__ == '_StorageKind' and _KEY.match(key) and \
                    type(numel) is int and numel >= 0:
                return kind, key, location, numel
        if not (isinstance(saved_id, tuple) and len(saved_id) == n):
            raise CheckpointValueError(f'persistent id {type(saved_id).__name__} of '
                                       f'{len(saved_id) if isinstance(saved_id, tuple) else 0} '
                                       f'items (expected {n})')
        if _text(saved_id[0], 'persistent id type') != 'storage':
            raise CheckpointValueError('persistent id that is not a storage')
        kind = saved_id[1]
        if type(kind).__name__ != '_StorageKind':
            raise CheckpointValueError('storage of an unknown type')
        key = _text(saved_id[2], 'storage key')
        if not _KEY.match(key):
            raise CheckpointValueError(f'storage key {key!r}')
        location = _text(saved_id[3], 'storage location')
        numel = saved_id[4]
        if type(numel) is not int or numel < 0:
            raise CheckpointValueError(f'storage {key}: {describe(numel)} elements')
        return kind, key, location, numel

    def _place(self, rec: _Storage, location: str) -> None:
        if self.restore is not None:
            moved = self.restore(rec.untyped, location)
            if not isinstance(moved, torch.UntypedStorage) or moved.nbytes() < rec.nbytes:
                raise CheckpointValueError(f'{rec.name}: map_location returned no storage '
                                           'of the size read')
            rec.untyped = moved
        self.by_ptr[rec.untyped.data_ptr(), rec.untyped.nbytes()] = rec

    def view(self, rec: _Storage, offset, size, stride, dtype) -> torch.Tensor:
        if self.restore is None:  # on the CPU: a new empty tensor of a kept one's dtype
            empty = self.empty.get(dtype)
            if empty is None:
                empty = self.empty[dtype] = torch.empty((0, ), dtype=dtype)
            t = empty.new().set_(rec.untyped, offset, size, stride)
        else:
            t = torch.empty((0, ), dtype=dtype, device=rec.untyped.device).set_(
                rec.untyped, offset, size, stride)
        return t


class _ZipStorages(_FileStorages):
    """Storages of a zip checkpoint: each read from its member into private memory,
    checked against the member first."""

    def __init__(self, snap: Snapshot, members: Dict[str, Member], prefix: str,
                 swap: bool, restore: Optional[Callable]):
        super().__init__(restore)
        self.snap, self.members, self.prefix, self.swap = snap, members, prefix, swap

    def storage(self, saved_id: Any) -> Any:
        try:
            return self._storage(saved_id)
        except CorruptFileError:
            raise
        except CheckpointValueError as e:  # reported with the key that uses it
            return Invalid(str(e))

    def _storage(self, saved_id: Any) -> _Storage:
        kind, key, location, numel = self._kind(saved_id, 5)
        rec = self.storages.get(key)
        if rec is not None:
            if rec.dtype != kind.dtype or rec.numel != numel:
                raise CheckpointValueError(f'{rec.name}: named again with another type or size')
            return rec
        name = f'{self.prefix}data/{key}'
        member = self.members.get(name)
        if member is None:
            raise CheckpointValueError(f'storage {key}: no member {name!r} in the archive')
        itemsize = kind.dtype.itemsize
        nbytes = numel * itemsize
        if nbytes > member.size:
            raise CheckpointValueError(f'{name}: the storage needs {nbytes} bytes '
                                       f'({numel} x {kind.dtype}), the member holds '
                                       f'{member.size}')
        if member.offset % itemsize:
            raise CheckpointValueError(f'{name}: stored at offset {member.offset}, not aligned '
                                       f'to its {itemsize}-byte elements')
        # read once through the file's one descriptor into private memory: the bytes
        # checked are the bytes loaded, whatever happens to the file afterwards
        whole = nbytes == member.size  # then its CRC-32 shows a torn or damaged member
        untyped = self.snap.read_storage(member.offset, nbytes, recheck=not whole)
        if whole:
            member.check_crc(memoryview(torch.empty(0, dtype=torch.uint8).set_(untyped)
                                        .numpy()))
        if self.swap:
            untyped.byteswap(kind.dtype)
        rec = _Storage(name, kind.dtype, numel, nbytes, untyped)
        self._place(rec, location)
        self.storages[key] = rec
        return rec


class _Bounded(io.RawIOBase):
    """A file read no further than ``end`` (a length from the file never
    allocates more than what is left)."""

    def __init__(self, f: Any, end: int):
        self.f, self.end = f, end

    def read(self, n: int = -1) -> bytes:
        left = self.end - self.f.tell()
        if n is None or n < 0:
            n = left
        if n > left:
            raise CorruptFileError(f'a length of {n} bytes runs past the end of the file')
        return self.f.read(n)

    def readline(self, limit: int = -1) -> bytes:
        return self.f.readline(min(4096, self.end - self.f.tell()))

    def tell(self) -> int:
        return self.f.tell()


class _LegacyStorages(_FileStorages):
    """Storages of an old-format (pre-zip) file: declared in the pickle, their bytes
    after it; tensors wait (:class:`_Deferred`) until the bytes are read and checked."""

    def storage(self, saved_id: Any) -> _Storage:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 6):
            raise CheckpointValueError('persistent id that is not a 6-item storage id')
        kind, key, location, numel = self._kind(saved_id[:5], 5)
        view = saved_id[5]
        root = self.storages.get(key)
        if root is None:
            root = _Storage(f'storage {key}', kind.dtype, numel, numel * kind.dtype.itemsize)
            root.base = location
            self.storages[key] = root
        elif root.dtype != kind.dtype or root.numel != numel:
            raise CheckpointValueError(f'storage {key}: named again with another type or size')
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int
                and type(view[2]) is int and view[1] >= 0 and view[2] >= 0):
            raise CheckpointValueError(f'storage {key}: bad view')
        vkey = _text(view[0], 'storage view key')
        if view[1] + view[2] > numel:
            raise CheckpointValueError(f'storage {key}: view {vkey} of {view[2]} elements at '
                                       f'{view[1]} runs past its {numel}')
        rec = _Storage(f'storage {vkey}', kind.dtype, view[2], view[2] * kind.dtype.itemsize)
        rec.base, rec.base_offset = root, view[1] * kind.dtype.itemsize
        return rec

    def is_tensor(self, obj: Any) -> bool:
        return isinstance(obj, _Deferred) or torch.is_tensor(obj)

    def view(self, rec, offset, size, stride, dtype) -> _Deferred:
        return _Deferred(rec, offset, size, stride, dtype)

    def read_data(self, snap: Snapshot, pos: int, keys: Any) -> None:
        """Read the storages' bytes that follow the pickles (from ``pos``), each checked
        against its declaration."""
        if not isinstance(keys, list) or not all(type(k) is str for k in keys) or \
                len(set(keys)) != len(keys):
            raise CheckpointValueError('the list of storages is not a list of distinct names')
        end = snap.size
        for key in keys:
            rec = self.storages.get(key)
            if rec is None:
                raise CheckpointValueError(f'storage {key}: data without a declaration')
            if pos + 8 > end:
                raise CorruptFileError(f'storage {key}: truncated')
            numel, = struct.unpack('<q', snap.pread(pos, 8))
            pos += 8
            if numel != rec.numel:
                raise CheckpointValueError(f'storage {key}: {numel} elements stored, '
                                           f'{rec.numel} declared')
            if pos + rec.nbytes > end:
                raise CorruptFileError(f'storage {key}: {rec.nbytes} bytes run past the '
                                       'end of the file')
            location, rec.base = rec.base, None
            rec.untyped = snap.read_storage(pos, rec.nbytes)
            pos += rec.nbytes
            self._place(rec, location)
        missing = [k for k, r in self.storages.items() if r.untyped is None]
        if missing:
            raise CheckpointValueError(f'storage {missing[0]}: declared but never stored')

    def build(self, d: _Deferred) -> torch.Tensor:
        rec = d.storage
        if rec.base is not None:  # a view of a root storage
            root = rec.base
            rec = _Storage(rec.name, rec.dtype, rec.numel, rec.nbytes,
                           root.untyped[rec.base_offset:rec.base_offset + rec.nbytes])
            self.by_ptr[rec.untyped.data_ptr(), rec.untyped.nbytes()] = rec
        return torch.empty((0, ), dtype=d.dtype, device=rec.untyped.device).set_(
            rec.untyped, d.offset, d.size, d.stride)


# ----------------------------------------------------------------- the object tree
_NO_KEY = object()
#: Values the finisher returns as they are, with nothing below them.
_PLAIN = frozenset((str, int, float, bool, bytes, complex, type(None)))


def _plain_dict(d: dict) -> bool:
    """Whether every value of ``d`` is a plain value (nothing below it to finish)."""
    for v in d.values():
        if type(v) not in _PLAIN:
            return False
    return True


class _Finisher:
    """Turn what the unpickler built into what a caller gets, checking as it goes.

    Numpy placeholders become arrays and numbers; ``HistoryBuffer`` state becomes a
    ``HistoryBuffer`` when ``bookkeeping``; deferred tensors are built; every tensor
    is checked to view a storage of this file, in bounds; nesting is bounded.
    """

    def __init__(self, storages: _FileStorages, bookkeeping: bool):
        self.storages, self.bookkeeping = storages, bookkeeping
        self.memo: Dict[int, Any] = {}
        self.height: Dict[int, int] = {}  # levels below a container, shared ones included

    def __call__(self, obj: Any, path: Tuple[str, ...] = (), depth: int = 0) -> Any:
        if obj is None or isinstance(obj, (str, int, float, bytes, complex, torch.dtype)) or (
                type(obj) in (dict, list, tuple) and not obj):
            return obj
        key = id(obj)
        if key in self.memo:
            if depth + self.height.get(key, 0) > MAX_DEPTH:
                raise CheckpointValueError(f'{_where(path)}: nested more than {MAX_DEPTH} '
                                           'levels')
            return self.memo[key]
        if depth > MAX_DEPTH:
            raise CheckpointValueError(f'{_where(path)}: nested more than {MAX_DEPTH} levels')
        if type(obj) is dict and _plain_dict(obj):  # ``_metadata``'s: nothing to rebuild
            self.memo[key] = obj
            self.height[key] = 1
            return obj
        out = obj
        if isinstance(obj, Invalid):
            raise CheckpointValueError(f'{_where(path)}: {obj.reason}')
        if isinstance(obj, _Deferred):
            try:
                built = self.storages.build(obj)  # type: ignore[attr-defined]
            except (RuntimeError, TypeError, ValueError, OverflowError) as e:
                raise CheckpointValueError(f'{_where(path)}: {obj.storage.name}: '
                                           f'{type(e).__name__}: {str(e)[:120]}') from None
            out = self.tensor(built, path)
        elif torch.is_tensor(obj):
            out = self.tensor(obj, path)
        elif isinstance(obj, (NumpyArray, NumpyDtype)):
            if obj.value is None:
                raise CheckpointValueError(f'{_where(path)}: a numpy object without its data')
            out = obj.value
        elif isinstance(obj, HistoryBufferState):
            out = obj.rebuild() if self.bookkeeping else obj
        elif isinstance(obj, _Storage):
            raise CheckpointValueError(f'{_where(path)}: a bare storage')
        self.memo[key] = out
        self._children(obj, key, path, depth)
        return self.memo[key]

    def _children(self, obj: Any, key: int, path: Tuple[str, ...], depth: int) -> None:
        kids: List[Any] = []
        if isinstance(obj, dict):
            kids = list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)) and not isinstance(obj, torch.Size):
            kids = list(obj)
        self._rebuild_children(obj, key, path, depth)
        self.height[key] = 1 + max((self.height.get(id(k), 0) for k in kids), default=0)

    def _rebuild_children(self, obj: Any, key: int, path: Tuple[str, ...], depth: int) -> None:
        if isinstance(obj, dict):
            if type(obj) is OrderedDict:
                extra = set(vars(obj)) - {'_metadata'}
                for name in extra:
                    delattr(obj, name)
                if '_metadata' in vars(obj):
                    obj._metadata = self(obj._metadata, path + ('_metadata', ), depth + 1)
            memo, height = self.memo, self.height
            for k, v in list(obj.items()):
                kind = type(v)
                if kind in _PLAIN:  # returned as it is
                    continue
                if kind is torch.Tensor and id(v) not in memo and depth < MAX_DEPTH:
                    # a state dict's tensor: checked here, its path built only for an error
                    self.tensor(v, path, k)
                    memo[id(v)] = v
                    height[id(v)] = 1
                    continue
                if kind is dict and id(v) not in memo and depth < MAX_DEPTH and \
                        _plain_dict(v):  # as __call__ finishes it
                    memo[id(v)] = v
                    height[id(v)] = 1
                    continue
                new = self(v, path + (_step(k), ), depth + 1)
                if new is not v:
                    obj[k] = new
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                new = self(v, path + (f'[{i}]', ), depth + 1)
                if new is not v:
                    obj[i] = new
        elif isinstance(obj, (set, frozenset)):
            items = [self(v, path + ('<set item>', ), depth + 1) for v in obj]
            if any(a is not b for a, b in zip(items, obj)):
                self.memo[key] = type(obj)(items)
        elif isinstance(obj, tuple) and not isinstance(obj, torch.Size):
            items = [self(v, path + (f'[{i}]', ), depth + 1) for i, v in enumerate(obj)]
            if any(a is not b for a, b in zip(items, obj)):
                self.memo[key] = tuple(items)

    def tensor(self, t: torch.Tensor, path: Tuple[str, ...], key: Any = _NO_KEY) -> torch.Tensor:
        """Check a tensor once more after unpickling.

        Its storage must still be one of this file's, whole (``set_`` refuses negative
        strides and views past a storage that cannot grow; one that grew has another
        size and is refused here), and it must not view more elements than the
        storage holds. ``key``: its key in the dict at ``path``, if any.
        """
        st = t.untyped_storage()
        nbytes = st.nbytes()
        if type(t) is not torch.Tensor or t.layout != torch.strided or (
                nbytes and (st.data_ptr(), nbytes) not in self.storages.by_ptr) or \
                t.numel() * t.element_size() > nbytes or t._backward_hooks:
            where = path + (_step(key), ) if key is not _NO_KEY else path
            raise CheckpointValueError(
                f'{_where(where)}: a {type(t).__name__} of size {list(t.shape)}, stride '
                f'{list(t.stride())} that is not a plain view of a storage of this file')
        if t.requires_grad:
            t.requires_grad_(False)
        return t


def _step(key: Any) -> str:
    """A dict key as one step of a path in a message."""
    return str(key) if isinstance(key, (str, int)) else f'<{type(key).__name__}>'


def _where(path: Tuple[str, ...]) -> str:
    text = '.'.join(path) or '<top level>'
    return text if len(text) < 200 else text[:100] + '...' + text[-80:]


def _restore_fn(map_location: Any) -> Optional[Callable]:
    if map_location is None or map_location == 'cpu' or (
            isinstance(map_location, torch.device) and map_location.type == 'cpu'):
        return None
    # torch 2.13.0: maps a storage and its saved location as torch.load does
    return torch.serialization._get_restore_location(map_location)


def _read_zip(snap: Snapshot, map_location: Any, bookkeeping: bool) -> Any:
    f = snap.file()
    members = zip_members(f, snap.size)
    pkl = [n for n in members if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pkl) != 1:
        raise CheckpointValueError('the archive has no single <name>/data.pkl member')
    prefix = pkl[0][:-len('data.pkl')]
    stray = [n for n in members if not n.startswith(prefix)]
    if stray:
        raise CheckpointValueError(f'zip member {stray[0]!r} outside {prefix}')
    order = sys.byteorder
    if prefix + 'byteorder' in members:
        order = read_member(f, members[prefix + 'byteorder']).decode('ascii', 'replace')
        if order not in ('little', 'big'):
            raise CheckpointValueError(f'{prefix}byteorder is {order[:16]!r}')
    swap = order != sys.byteorder
    storages = _ZipStorages(snap, members, prefix, swap, _restore_fn(map_location))
    data = read_member(f, members[pkl[0]])
    with objects_being_built():
        obj = unpickle(data, storages, opcode_limit(snap.size))
        return _Finisher(storages, bookkeeping)(obj)


def _read_legacy(snap: Snapshot, map_location: Any, bookkeeping: bool) -> Any:
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION
    storages = _LegacyStorages(_restore_fn(map_location))
    size = snap.size
    raw = snap.file()
    f = _Bounded(raw, size)
    budget = OpcodeBudget(opcode_limit(size))  # shared by the file's five pickles
    with objects_being_built():
        if unpickle(f, storages, budget) != MAGIC_NUMBER:
            raise CheckpointValueError('not a torch checkpoint (no magic number)')
        if unpickle(f, storages, budget) != PROTOCOL_VERSION:
            raise CheckpointValueError('unknown torch serialization protocol')
        info = unpickle(f, storages, budget)
        if not isinstance(info, dict) or info.get('little_endian', True) is not True or \
                sys.byteorder != 'little':
            raise CheckpointValueError('an old-format file of another byte order')
        obj = unpickle(f, storages, budget)
        keys = unpickle(f, storages, budget)
        storages.read_data(snap, raw.tell(), keys)
        return _Finisher(storages, bookkeeping)(obj)


def _read_pth(snap: Snapshot, map_location: Any, bookkeeping: bool) -> Any:
    head = snap.pread(0, min(4, snap.size))
    if head == LOCAL_SIG:
        return _read_zip(snap, map_location, bookkeeping)
    if head[:1] == b'\x80':
        return _read_legacy(snap, map_location, bookkeeping)
    raise CheckpointValueError('neither a zip nor an old-format torch checkpoint '
                               '(the old .tar format is not read)')


# ----------------------------------------------------------------- entry points
def read_checkpoint(path: str,
                    map_location: Any = 'cpu',
                    trust_checkpoint: bool = False,
                    mmap: Optional[bool] = None,
                    bookkeeping: bool = False) -> Any:
    """Read a checkpoint file or URI.

    Args:
        path (str): Local path or any URI MMEngine's ``CheckpointLoader``
            knows (``http://``, ``s3://``, ``open-mmlab://``...): a remote file is
            fetched first (:mod:`~mmfusionload.files.remote`), then read like a local one.
        map_location: As in :func:`torch.load`. Defaults to ``'cpu'``.
        trust_checkpoint (bool): Unpickle arbitrary globals (runs code the file
            asks for). Only for files you trust. Defaults to False.
        mmap (bool, optional): Accepted for compatibility and ignored: every
            file is read once, through one descriptor, into private memory
            (:mod:`~mmfusionload.files.snapshot`), never mapped.
        bookkeeping (bool): Rebuild MMEngine's ``HistoryBuffer`` objects (what
            resuming a run needs) instead of leaving inert placeholders.
            Defaults to False.

    Returns:
        Any: What the file holds (usually a dict).

    Raises:
        FusionLoadError: The file is missing, unreadable, corrupt, breaks a
            rule, or asks for a global outside the admitted ones.
    """
    path = str(path)
    if not is_local(path):
        users = users_loader(path)
        if users is None:
            return _read_remote(path, map_location, trust_checkpoint, mmap, bookkeeping)
        try:  # a scheme the user registered: their code, called as MMEngine would
            return users(path, map_location=map_location)
        except Exception as e:
            raise FusionLoadError([f'{path}: {type(e).__name__}: {e}'],
                                  'cannot read checkpoint') from e
    path = osp.expanduser(path)
    if not osp.exists(path):
        raise FusionLoadError([f'{path}: no such file'], 'cannot read checkpoint')
    if osp.isdir(path):
        raise FusionLoadError([f'{path}: is a directory, not a checkpoint file'],
                              'cannot read checkpoint')
    try:
        if is_sharded_index(path):  # an index naming shards, each read like a file
            return read_sharded(path)
        return _read_file(path, map_location, trust_checkpoint, bookkeeping)
    except UnsafeGlobalError as e:
        e.__traceback__ = None  # its frames hold what the pickle had built
        raise FusionLoadError([
            f'{path}: the file asks to unpickle {e.name!r}, which is not a '
            'tensor, a plain container or an admitted MMEngine/numpy object; '
            'pass trust_checkpoint=True (source option, hook argument or '
            '--trust-checkpoint) only if you trust this file'
        ], 'refusing to read checkpoint') from e
    except FileChangedError as e:
        e.__traceback__ = None
        raise FusionLoadError([f'{path}: {e}'], 'cannot read checkpoint') from e
    except CorruptFileError as e:
        e.__traceback__ = None
        raise FusionLoadError([f'{path}: not a readable checkpoint (truncated or corrupt?): {e}'],
                              'cannot read checkpoint') from e
    except CheckpointValueError as e:
        e.__traceback__ = None
        raise FusionLoadError([f'{path}: {e}'], 'refusing to read checkpoint') from e
    except FusionLoadError:
        raise
    except Exception as e:
        e.__traceback__ = None
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
        raise FusionLoadError(
            [f'{path}: not a readable checkpoint (truncated or corrupt?): '
             f'{type(e).__name__}: {msg}'], 'cannot read checkpoint') from e


def _read_file(path: str, map_location: Any, trust_checkpoint: bool, bookkeeping: bool) -> Any:
    """Read one local file as one version of it (:class:`~.snapshot.Snapshot`)."""
    with Snapshot(path) as snap:
        if snap.size == 0:
            raise FusionLoadError([f'{path}: file is empty'], 'cannot read checkpoint')
        try:
            ckpt = _read_snapshot(snap, path, map_location, trust_checkpoint, bookkeeping)
        except FileChangedError:
            raise
        except Exception:
            snap.check()  # a file that changed explains the error better
            raise
        snap.check()
        return ckpt


def _read_snapshot(snap: Snapshot, path: str, map_location: Any, trust_checkpoint: bool,
                   bookkeeping: bool) -> Any:
    """What the file of ``snap`` holds (safetensors, a trusted or a restricted ``.pth``)."""
    head = snap.pread(0, min(9, snap.size))
    if is_safetensors(path, head):
        return read_safetensors(snap)
    if trust_checkpoint:  # plain unpickling, from the same open file (torch moves its offset)
        with os.fdopen(os.dup(snap.fd), 'rb') as f, objects_being_built():
            f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=False)
    return _read_pth(snap, map_location, bookkeeping)


@contextmanager
def objects_being_built() -> Iterator[None]:
    """Pause the cyclic garbage collector while a pickle becomes objects (restored after,
    also on error): its allocations would otherwise trigger full collections of every
    object the process holds (in a process that imported MMEngine, a read of a
    BEVFusion-size file went from 14 ms to 150 ms)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_remote(uri: str, map_location: Any, trust_checkpoint: bool, mmap: Optional[bool],
                 bookkeeping: bool) -> Any:
    """Fetch ``uri`` to a local file (:mod:`~mmfusionload.files.remote`), then read that file."""
    with local_copy(uri) as local:
        try:
            return read_checkpoint(local, map_location, trust_checkpoint, mmap, bookkeeping)
        except FusionLoadError as e:
            named = FusionLoadError([p.replace(local, f'{uri} ({local})', 1) for p in e.problems],
                                    e.title)
            named.report = e.report
            raise named from None


def load_local(filename: str, map_location: Any = None) -> Any:
    """MMEngine local-file scheme backed by :func:`read_checkpoint` (with bookkeeping,
    so ``resume`` gets its ``HistoryBuffer`` objects)."""
    return read_checkpoint(filename, map_location=map_location or 'cpu',
                           trust_checkpoint=_TRUST['local'], bookkeeping=True)


_TRUST = {'local': False}


def install_checkpoint_loader(trust_checkpoint: bool = False) -> Callable:
    """Make :func:`read_checkpoint` MMEngine's loader for local files and for every
    remote scheme MMEngine registers.

    After this, ``load_from``, ``resume`` and ``init_cfg=dict(type='Pretrained')``
    read every file through the restricted unpickler (a remote one once fetched), so
    checkpoints saved by a Runner load on torch >= 2.6 without trusting them and no
    URI runs code.

    Args:
        trust_checkpoint (bool): Read local files with plain unpickling.

    Returns:
        Callable: The registered loader.
    """
    _TRUST['local'] = bool(trust_checkpoint)
    remote = mmengine_schemes()
    CheckpointLoader.register_scheme(prefixes='', loader=load_local, force=True)
    if remote:
        CheckpointLoader.register_scheme(prefixes=remote, loader=load_remote, force=True)
    return load_local


def load_remote(filename: str, map_location: Any = None) -> Any:
    """MMEngine's remote schemes (``http(s)://``, ``torchvision://``, ``open-mmlab://``,
    ``s3://``...) backed by :func:`read_checkpoint`: fetched, then read like a local file."""
    return read_checkpoint(filename, map_location=map_location or 'cpu',
                           trust_checkpoint=_TRUST['local'], bookkeeping=True)


load_remote._mmfusionload_remote = True  # type: ignore[attr-defined]
