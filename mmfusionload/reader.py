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
import os
import os.path as osp
import pickle
import zipfile
from types import ModuleType
from typing import Any, Callable, Dict, Optional

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
# Modules whose numpy classes ``getattr`` may fetch (see ``_safe_getattr``).
SAFE_GETATTR_OWNERS = ('numpy', 'numpy.dtypes', 'numpy.core.multiarray',
                       'numpy._core.multiarray')

_ZIP_MAGIC = b'PK\x03\x04'


def _torch_allowed_globals() -> Dict[str, Any]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return dict(_get_allowed_globals())
    except Exception:  # pragma: no cover - older/newer torch
        return {}


def _safe_getattr(owner: Any, name: str) -> Any:
    """``getattr`` restricted to the uses numpy's and MMEngine's pickles make.

    numpy 2 pickles dtype classes as ``getattr(numpy.dtypes, 'Float64DType')``;
    MMEngine's ``HistoryBuffer`` pickles its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``.
    """
    if isinstance(owner, ModuleType):
        if owner.__name__ in SAFE_GETATTR_OWNERS and not name.startswith('_'):
            value = getattr(owner, name, None)
            if isinstance(value, type) and value.__module__.startswith('numpy'):
                return value
        owner_name = owner.__name__
    else:
        from mmengine.logging.history_buffer import HistoryBuffer
        if (owner is HistoryBuffer or type(owner) is HistoryBuffer) and \
                name in HistoryBuffer._statistics_methods:
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
            if module == 'torch' and name.endswith('Storage'):
                return super().find_class(module, name)
            raise UnsafeGlobalError(full)

    mod = ModuleType('mmfusionload_restricted_pickle')
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
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


def _read_safetensors(path: str) -> Dict[str, Any]:
    """Read a safetensors file as a checkpoint dict with ``state_dict`` and ``meta``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework='pt') as f:
        meta = f.metadata() or {}
    state = load_file(path)
    versions = json.loads(meta.pop('module_versions', '{}'))
    from collections import OrderedDict
    state = OrderedDict(state)
    if versions:
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, {'version': v}) for k, v in versions.items())
    return {'state_dict': state, 'meta': meta}


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
        if is_safetensors(path):
            return _read_safetensors(path)
        is_zip = zipfile.is_zipfile(path)
        kwargs: Dict[str, Any] = dict(map_location=map_location)
        if trust_checkpoint:
            kwargs['weights_only'] = False
        else:
            kwargs.update(weights_only=False, pickle_module=_restricted_pickle_module())
        if is_zip and (mmap is None or mmap):
            kwargs['mmap'] = True
        return torch.load(path, **kwargs)
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
