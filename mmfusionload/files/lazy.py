"""Lazy state dicts: tensors created on first access, shapes and dtypes from headers.

Every lazy state is a :class:`LazyState`; :func:`is_lazy` is the one test the
rest of the package uses.
"""
import json
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .pages import file_mappings, madvise, track
from .pickle_ops import CheckpointValueError
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


def is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file (by suffix or header)."""
    if path.endswith('.safetensors'):
        return True
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and head[:4] != LOCAL_SIG


class SafetensorsState(LazyState):
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
            if t.numel() and madvise() is not None:
                if self._ranges is None:
                    self._ranges = file_mappings(self.path)
                # every tensor's own bytes are checked: only a view of the mapping is tracked
                track(t, self._ranges)
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


def read_safetensors(path: str) -> Dict[str, Any]:
    """Read a safetensors file as a checkpoint dict with ``state_dict`` and ``meta``.

    The state dict is a lazy :class:`SafetensorsState` (nothing is read here).
    ``module_versions`` must be a JSON object of module name -> int.
    """
    state = SafetensorsState(path)
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
