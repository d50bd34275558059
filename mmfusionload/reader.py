"""Read checkpoint files safely: ``.pth`` through a restricted unpickler, ``.safetensors`` lazily.

``torch.load(weights_only=True)`` refuses every checkpoint an MMEngine Runner
saves (its ``message_hub`` pickles ``HistoryBuffer`` objects and numpy values),
and ``weights_only=False`` runs whatever code the file asks for. The reader here
sits between the two: tensors, plain containers, torch's own allowlist and a
short list of MMEngine/numpy bookkeeping classes are rebuilt for real; any
other global is refused with a message naming it. Pass
``trust_checkpoint=True`` to load a file you trust completely.
"""
import _compat_pickle
import cmath
import functools
import os
import os.path as osp
import pickle
import sys
import zipfile
from collections import OrderedDict
from types import ModuleType
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Tuple)

import torch
from mmengine.runner.checkpoint import CheckpointLoader

from .errors import FusionLoadError

# Globals admitted beside torch's own weights-only allowlist, as 'module.name'.
EXTRA_SAFE_GLOBALS = {
    'mmengine.logging.history_buffer.HistoryBuffer',
    # training scripts (timm, Cream, DeiT) save their argparse arguments
    'argparse.Namespace',
    'numpy.ndarray',
    'numpy.dtype',
    'numpy.core.multiarray._reconstruct',
    'numpy.core.multiarray.scalar',
    'numpy._core.multiarray._reconstruct',
    'numpy._core.multiarray.scalar',
    'builtins.slice',
    'builtins.frozenset',
    'builtins.range',
    'collections.defaultdict',
    'collections.deque',
    'datetime.datetime',
    'datetime.timedelta',
    'datetime.date',
}
# HistoryBuffer's built-in statistics (its registry fills only once one is built).
HISTORY_BUFFER_STATISTICS = {'min', 'max', 'current', 'mean'}

_ZIP_MAGIC = b'PK\x03\x04'
# torch's storage classes (``torch.FloatStorage``...), as old checkpoints name them.
_STORAGE_NAMES = frozenset(n for n in dir(torch) if n.endswith('Storage')
                           and isinstance(getattr(torch, n), type))


def _torch_allowed_globals() -> Dict[str, Any]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return dict(_get_allowed_globals())
    except Exception:  # pragma: no cover - older/newer torch
        return {}


def _safe_getattr(owner: Any, name: str) -> Any:
    """``getattr`` restricted to the one use MMEngine's pickles make.

    MMEngine's ``HistoryBuffer`` pickles its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``; anything else is refused.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if (owner is HistoryBuffer or type(owner) is HistoryBuffer) and \
            name in HISTORY_BUFFER_STATISTICS | set(HistoryBuffer._statistics_methods):
        return getattr(owner, name)
    owner_name = getattr(owner, '__name__', type(owner).__name__)
    raise UnsafeGlobalError(f'getattr({owner_name}, {name!r})')


class UnsafeGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowlist."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f'unsupported global {name!r}')


def _restricted_pickle_module() -> ModuleType:
    """A stand-in for the ``pickle`` module whose Unpickler refuses unknown globals."""
    allowed = _torch_allowed_globals()
    extra = set(EXTRA_SAFE_GLOBALS)
    for obj in torch.serialization.get_safe_globals():
        obj = obj[0] if isinstance(obj, tuple) else obj
        extra.add(f'{obj.__module__}.{obj.__qualname__}')

    class RestrictedUnpickler(pickle.Unpickler):

        def find_class(self, module: str, name: str) -> Any:
            # protocol-2 pickles name Python 2 modules (``__builtin__``...)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            full = f'{module}.{name}'
            if full in allowed:
                return allowed[full]
            if full in extra:
                return super().find_class(module, name)
            if full == 'builtins.getattr':
                return _safe_getattr
            if module == 'torch' and name in _STORAGE_NAMES:
                return super().find_class(module, name)
            raise UnsafeGlobalError(full)

    def load(file, **kwargs) -> Any:
        # torch's reader of old-format (non-zip) files calls ``pickle_module.load``
        return RestrictedUnpickler(file, **kwargs).load()

    mod = ModuleType('mmfusionload_restricted_pickle')
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = load  # type: ignore[attr-defined]
    mod.__name__ = 'pickle'
    return mod


def is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file (by suffix or header)."""
    if path.endswith('.safetensors'):
        return True
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and head[:4] != _ZIP_MAGIC


# ---------------------------------------------------------------------------
# Memory-mapped tensors: find them, give their pages back, check them cheaply.
#
# Both readers return tensors that are views of a private, read-only-in-practice
# mapping of the file (``torch.load(mmap=True)`` and safetensors' ``safe_open``):
# reading a tensor faults its pages in, and those pages then count in the
# process's RSS (as ``RssFile``) until the mapping is dropped. ``release_pages``
# hands the pages of one tensor back to the page cache after it has been read, so
# a load's peak RSS stays near one tensor instead of the whole checkpoint; the
# data is re-read from the page cache on the next access.
_MADV_DONTNEED = 4
_MAPPED_ATTR = '_mmfl_mapped'
_MADVISE: Dict[str, Any] = {}


def _madvise() -> Optional[Callable]:
    """libc's ``madvise`` on Linux, else None (found once)."""
    if 'fn' not in _MADVISE:
        fn = None
        if sys.platform.startswith('linux'):
            try:
                import ctypes
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _MADVISE['page'] = os.sysconf('SC_PAGE_SIZE')
            except (OSError, AttributeError, ValueError):  # pragma: no cover
                fn = None
        _MADVISE['fn'] = fn
    return _MADVISE['fn']


def _file_mappings(path: str) -> List[Tuple[int, int]]:
    """Address ranges of this process's private mappings of ``path`` (Linux)."""
    real = osp.realpath(path)
    out = []
    try:
        with open('/proc/self/maps') as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].rstrip('\n') == real and parts[1][3] == 'p':
                    lo, hi = parts[0].split('-')
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:  # pragma: no cover - not Linux
        return []
    return out


def _tag_if_inside(t: torch.Tensor, ranges: Iterable[Tuple[int, int]]) -> bool:
    """Tag ``t`` for :func:`release_pages` if its own bytes lie inside one of ``ranges``."""
    if not torch.is_tensor(t) or t.device.type != 'cpu' or t.numel() == 0:
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if any(lo <= start and end <= hi for lo, hi in ranges):
        setattr(t, _MAPPED_ATTR, t._version)
        return True
    return False


def mark_mapped(tensors: Iterable[torch.Tensor], path: str,
                ranges: Optional[List[Tuple[int, int]]] = None) -> int:
    """Tag the tensors whose data lies in a private file mapping of ``path``.

    Only tagged tensors are ever released by :func:`release_pages`; a tensor
    copied out of the file (an older safetensors, a legacy ``.pth``) or backed by
    any other memory is left alone: each tensor's own byte range is checked.

    Args:
        tensors (Iterable[Tensor]): Candidates.
        path (str): The file.
        ranges (list[tuple[int, int]], optional): The file's mapped address ranges
            (:func:`_file_mappings`), when already known; read from
            ``/proc/self/maps`` on the first candidate otherwise.

    Returns:
        int: How many tensors were tagged.
    """
    if _madvise() is None:
        return 0
    n = 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type != 'cpu' or t.numel() == 0:
            continue
        if ranges is None:
            ranges = _file_mappings(path)
        if not ranges:
            return 0
        n += _tag_if_inside(t, ranges)
    return n


def release_pages(t: torch.Tensor) -> bool:
    """Give back the memory pages a memory-mapped checkpoint tensor occupies.

    A no-op for tensors :func:`mark_mapped` did not tag, for tensors written
    in place since (their version counter moved; a private page written to is
    no longer the file's), and off Linux. Only whole pages inside the tensor are
    released, never a neighbour's. The values stay the same: the next read
    faults the pages in again from the page cache.

    Returns:
        bool: Whether pages were released.
    """
    version = getattr(t, _MAPPED_ATTR, None)
    if version is None or t._version != version:
        return False
    fn = _madvise()
    if fn is None:
        return False
    page = _MADVISE['page']
    ptr = t.data_ptr()
    lo = -(-ptr // page) * page
    hi = (ptr + t.numel() * t.element_size()) // page * page
    if hi <= lo:
        return False
    return fn(lo, hi - lo, _MADV_DONTNEED) == 0


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN/Inf, in one read and without a mask.

    ``torch.isfinite(t).all()`` writes a bool mask as large as ``t``; a sum is
    finite only if every element is (NaN and Inf propagate through addition),
    so the mask is built only when the sum overflows.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    low = t.dtype.itemsize < 4 and not t.is_complex()  # float16/bfloat16/float8
    total = (t.sum(dtype=torch.float32) if low else t.sum()).item()
    if cmath.isfinite(total):
        return True
    return bool(torch.isfinite(t).all())


class SafetensorsState(Mapping):
    """A safetensors file as a lazy ``key -> tensor`` mapping.

    Keys, shapes and dtypes come from the header (:meth:`shape`, :meth:`dtype`);
    a tensor is created on first access through ``safe_open(...).get_tensor``,
    which maps the file rather than reading it, so a tensor's data is read only
    when something reads the tensor. ``_metadata`` carries the module versions
    stored under the ``module_versions`` metadata key.

    Args:
        path (str): The file.
    """

    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        self._file = safe_open(path, framework='pt')
        self._keys = list(self._file.keys())
        self._index = set(self._keys)
        self._cache: Dict[str, torch.Tensor] = {}
        self.metadata: Dict[str, str] = dict(self._file.metadata() or {})
        # the file's mapped address ranges, read once (safe_open maps the file once)
        self._ranges: Optional[List[Tuple[int, int]]] = None

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._cache.get(key)
        if t is None:
            if key not in self._index:
                raise KeyError(key)
            t = self._file.get_tensor(key)
            if t.numel() and _madvise() is not None:
                if self._ranges is None:
                    self._ranges = _file_mappings(self.path)
                # every tensor's own bytes are checked: only a view of the mapping is tagged
                _tag_if_inside(t, self._ranges)
            self._cache[key] = t
        return t

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    @property
    def materialized(self) -> List[str]:
        """Keys whose tensors have been created."""
        return list(self._cache)

    def shape(self, key: str) -> Tuple[int, ...]:
        """The tensor's shape, from the header."""
        return tuple(self._file.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The tensor's dtype as safetensors names it (``F32``, ``BF16``...)."""
        return self._file.get_slice(key).get_dtype()


def _read_safetensors(path: str) -> Dict[str, Any]:
    """Read a safetensors file as a checkpoint dict with ``state_dict`` and ``meta``.

    The state dict is a lazy :class:`SafetensorsState` (nothing is read here).
    """
    import json

    state = SafetensorsState(path)
    meta = dict(state.metadata)
    versions = json.loads(meta.pop('module_versions', '{}'))
    if versions:
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, {'version': v}) for k, v in versions.items())
    return {'state_dict': state, 'meta': meta}


def _tensors_in(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif depth < 4 and isinstance(obj, Mapping) and not isinstance(obj, SafetensorsState):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)


_NOT_HANDLED = object()


def _native_byteorder(reader: Any) -> bool:
    """Whether a zip checkpoint's tensors are stored in this machine's byte order
    (torch byte-swaps the mapped pages otherwise, and they are no longer the file's)."""
    order = (reader.get_record('byteorder').decode()
             if reader.has_record('byteorder') else 'little')
    return order == sys.byteorder


def _rebuild_tensor_mapped(bounds, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for CPU storages of a mapped file, tagged for
    :func:`release_pages` (torch's own also looks for fake/meta modes, per tensor).

    ``bounds`` is the mapping's ``(start, end)`` address range: a tensor is tagged only
    when its own bytes lie inside it.
    """
    t = torch.empty((0, ), dtype=storage.dtype).set_(storage._untyped_storage, storage_offset,
                                                     size, stride)
    if requires_grad:
        t.requires_grad = True
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)
    t._backward_hooks = backward_hooks
    _tag_if_inside(t, (bounds, ))
    return t


def _load_zip_mapped(path: str, pickle_module: Any) -> Any:
    """``torch.load(path, mmap=True, map_location='cpu')`` for the common case, faster.

    The file is mapped once and every storage is a slice of that mapping, as
    ``torch.load(mmap=True)`` does, but tensors are rebuilt without torch's
    per-tensor fake-mode and device bookkeeping (a third of a BEVFusion load's
    read time). ``pickle_module`` decides which globals may be unpickled, as in
    ``torch.load``. Returns ``_NOT_HANDLED`` for anything unusual (another byte
    order, another pickle layout, a fake/meta mode active, no ``madvise``), for
    which the caller uses ``torch.load``.
    """
    import io

    from torch.serialization import StorageType
    if _madvise() is None or torch._guards.detect_fake_mode(None) is not None:
        return _NOT_HANDLED
    reader = torch._C.PyTorchFileReader(path)
    if not reader.has_record('data.pkl'):
        return _NOT_HANDLED
    if not _native_byteorder(reader):
        return _NOT_HANDLED
    whole = torch.UntypedStorage.from_file(path, False, os.path.getsize(path))
    rebuild = functools.partial(_rebuild_tensor_mapped,
                                (whole.data_ptr(), whole.data_ptr() + whole.nbytes()))
    storages: Dict[str, Any] = {}

    def persistent_load(saved_id):
        typename, storage_type, key, _location, numel = saved_id
        if (typename.decode() if isinstance(typename, bytes) else typename) != 'storage':
            raise pickle.UnpicklingError(f'unknown persistent id {typename!r}')
        key = key.decode() if isinstance(key, bytes) else key
        typed = storages.get(key)
        if typed is None:
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            nbytes = numel * dtype.itemsize
            offset = reader.get_record_offset(f'data/{key}')
            typed = torch.storage.TypedStorage(wrap_storage=whole[offset:offset + nbytes],
                                               dtype=dtype, _internal=True)
            storages[key] = typed
        return typed

    class MappedUnpickler(pickle_module.Unpickler):  # type: ignore[name-defined]

        def find_class(self, module: str, name: str) -> Any:
            if type(name) is str and 'Storage' in name:  # as torch.load does
                try:
                    return StorageType(name)
                except KeyError:
                    pass
            if module == 'torch._utils' and name == '_rebuild_tensor_v2':
                super().find_class(module, name)  # the allowlist still decides
                return rebuild
            return super().find_class('torch._tensor' if module == 'torch.tensor' else module,
                                      name)

    unpickler = MappedUnpickler(io.BytesIO(reader.get_record('data.pkl')), encoding='utf-8')
    unpickler.persistent_load = persistent_load
    result = unpickler.load()
    torch._utils._validate_loaded_sparse_tensors()
    return result


def read_checkpoint(path: str,
                    map_location: Any = 'cpu',
                    trust_checkpoint: bool = False,
                    mmap: Optional[bool] = None) -> Any:
    """Read a checkpoint file or URI.

    Args:
        path (str): Local path or any URI MMEngine's ``CheckpointLoader``
            knows (``http://``, ``s3://``, ``open-mmlab://``...).
        map_location: As in :func:`torch.load`. Defaults to ``'cpu'``.
        trust_checkpoint (bool): Unpickle arbitrary globals (runs code the file
            asks for). Only for files you trust. Defaults to False.
        mmap (bool, optional): Memory-map a local zip checkpoint so only the
            tensors used are read. Defaults to True for local ``.pth`` files.

    Returns:
        Any: What the file holds (usually a dict).

    Raises:
        FusionLoadError: The file is missing, unreadable, corrupt, or asks
            for a global outside the allowlist.
    """
    path = str(path)
    loader = CheckpointLoader._get_checkpoint_loader(path)
    if loader is not load_local and getattr(loader, '__name__', '') != 'load_from_local':
        try:
            return loader(path, map_location=map_location)
        except Exception as e:
            raise FusionLoadError([f'{path}: {type(e).__name__}: {e}'],
                                  'cannot read checkpoint') from e
    path = osp.expanduser(path)
    if not osp.exists(path):
        raise FusionLoadError([f'{path}: no such file'], 'cannot read checkpoint')
    if osp.isdir(path):
        raise FusionLoadError([f'{path}: is a directory, not a checkpoint file'],
                              'cannot read checkpoint')
    if os.path.getsize(path) == 0:
        raise FusionLoadError([f'{path}: file is empty'], 'cannot read checkpoint')
    try:
        from .sharded import is_sharded_index, read_sharded
        if is_sharded_index(path):
            return read_sharded(path)
        if is_safetensors(path):
            return _read_safetensors(path)
        is_zip = zipfile.is_zipfile(path)
        kwargs: Dict[str, Any] = dict(map_location=map_location)
        if trust_checkpoint:
            kwargs['weights_only'] = False
        else:
            kwargs.update(weights_only=False, pickle_module=_restricted_pickle_module())
        mapped = is_zip and (mmap is None or mmap)
        if mapped and str(map_location) == 'cpu':
            ckpt = _load_zip_mapped(path, kwargs.get('pickle_module', pickle))
            if ckpt is not _NOT_HANDLED:
                return ckpt
        if mapped:
            kwargs['mmap'] = True
        ckpt = torch.load(path, **kwargs)
        if mapped and _native_byteorder(torch._C.PyTorchFileReader(path)):
            mark_mapped(_tensors_in(ckpt), path)
        return ckpt
    except UnsafeGlobalError as e:
        raise FusionLoadError([
            f'{path}: the file asks to unpickle {e.name!r}, which is not a '
            'tensor, a plain container or an allowed MMEngine/numpy object; '
            'pass trust_checkpoint=True (source option, hook argument or '
            '--trust-checkpoint) only if you trust this file'
        ], 'refusing to read checkpoint') from e
    except FusionLoadError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise FusionLoadError(
            [f'{path}: not a readable checkpoint (truncated or corrupt?): '
             f'{type(e).__name__}: {msg}'], 'cannot read checkpoint') from e


def load_local(filename: str, map_location: Any = None) -> Any:
    """MMEngine local-file scheme backed by :func:`read_checkpoint`."""
    return read_checkpoint(filename, map_location=map_location or 'cpu',
                           trust_checkpoint=_TRUST['local'])


_TRUST = {'local': False}


def install_checkpoint_loader(trust_checkpoint: bool = False) -> Callable:
    """Make :func:`read_checkpoint` MMEngine's loader for local files.

    After this, ``load_from``, ``resume`` and ``init_cfg=dict(type='Pretrained')``
    read local files through the restricted unpickler, so checkpoints saved by
    a Runner load on torch >= 2.6 without trusting them.

    Args:
        trust_checkpoint (bool): Read local files with plain unpickling.

    Returns:
        Callable: The registered loader.
    """
    _TRUST['local'] = bool(trust_checkpoint)
    CheckpointLoader.register_scheme(prefixes='', loader=load_local, force=True)
    return load_local
