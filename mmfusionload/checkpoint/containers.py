"""Take the state dict out of whatever container a checkpoint file holds."""
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch

from ..errors import FusionLoadError, describe
from ..files.lazy import LazyState, is_lazy
from .fused import unfuse
from .trainers import choose_copy

WRAPPER_PREFIXES = ('module.', )
_ORIG_MOD = re.compile(r'(^|\.)_orig_mod\.')


@dataclass
class Unwrapped:
    """A checkpoint's tensors with the keys the model would use.

    Args:
        state (Mapping): Key -> tensor: an ``OrderedDict``, or for a lazy source
            (a ``.safetensors`` file) a lazy mapping whose tensors are created on
            first access (:class:`~mmfusionload.files.lazy.SafetensorsState` or a
            :class:`RenamedState` of one); use :func:`shape_of` for shapes.
        metadata (dict): ``_metadata`` of the state dict (module -> info), keyed
            like ``state``.
        container (str): Where the tensors were found (``'state_dict'``,
            ``'model_ema'``, ``'<bare>'``...).
        stripped (list[str]): Wrapper prefixes removed from the keys.
        meta (dict): The checkpoint's ``meta`` entry, if any.
        skipped (list[str]): Entries that were not tensors.
        family (str): The trainer family the container belongs to.
        copy (str): Which copy was taken and why (``'state_dict: EMA weights,
            MMEngine EMAHook'``).
        fused (list[str]): spconv QAT fused conv-BN modules read as a conv and its
            BatchNorm (:mod:`~mmfusionload.checkpoint.fused`).
    """
    state: Mapping[str, torch.Tensor]
    metadata: Dict[str, dict]
    container: str
    stripped: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)
    family: str = ''
    copy: str = ''
    fused: List[str] = field(default_factory=list)
    #: What sources sharing this object compute once (shapes, identity).
    cache: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Key -> shape of every tensor (no lazy tensor is created), computed once."""
        if 'shapes' not in self.cache:
            state = self.state
            self.cache['shapes'] = ({k: tuple(state.shape(k)) for k in state} if is_lazy(state)
                                    else {k: tuple(v.shape) for k, v in state.items()})
        return self.cache['shapes']


class RenamedState(LazyState):
    """A lazy state dict under new keys: ``view[new]`` is ``base[names[new]]``.

    Keeps a :class:`~mmfusionload.files.lazy.SafetensorsState` lazy through unwrapping:
    no tensor is created until its key is looked up.

    Args:
        base (Mapping): The lazy state dict (``shape(key)`` from its header).
        names (dict): New key -> key in ``base``, in order.
    """

    def __init__(self, base: Mapping, names: Dict[str, str]):
        self.base = base
        self.names = dict(names)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.base[self.names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key) -> bool:
        return key in self.names

    def shape(self, key: str) -> Tuple[int, ...]:
        """The tensor's shape, from the header (no tensor is created)."""
        return self.base.shape(self.names[key])

    def dtype(self, key: str) -> str:
        """The tensor's dtype as the file names it."""
        return self.base.dtype(self.names[key])

    @property
    def materialized(self) -> List[str]:
        """Keys (new names) whose tensors have been created."""
        done = set(self.base.materialized)
        return [new for new, old in self.names.items() if old in done]


def shape_of(state: Mapping, key: str) -> Tuple[int, ...]:
    """A tensor's shape, without creating the tensor of a lazy state dict."""
    return tuple(state.shape(key)) if is_lazy(state) else tuple(state[key].shape)


def _is_state_dict(obj: Any) -> bool:
    if is_lazy(obj):  # a safetensors file holds tensors only: no need to create them
        return len(obj) > 0
    return (isinstance(obj, Mapping) and len(obj) > 0
            and sum(torch.is_tensor(v) for v in obj.values()) >= max(1, len(obj) // 2))


def find_state_dict(ckpt: Any, filename: str, prefer_ema: bool = False,
                    weights: str = 'auto') -> Tuple[Mapping, str]:
    """Locate the state dict inside a checkpoint (see :func:`choose_copy`).

    Args:
        ckpt: What the file holds.
        filename (str): For messages.
        prefer_ema (bool): The same as ``weights='ema'``.
        weights (str): ``'auto'``, ``'ema'`` or ``'raw'``.

    Returns:
        tuple[Mapping, str]: The state dict and the container's name.
    """
    choice = choose_copy(ckpt, filename, 'ema' if prefer_ema else weights)
    return choice.state, choice.key


def _short(value: Any) -> str:
    return describe(value) if type(value) in (str, bytes, int, float, bool) or value is None \
        else f'of type {type(value).__name__}'


def _key_text(key: Any) -> str:
    """A state dict key as text: a string as it is, an int in digits, else described."""
    return key if type(key) is str else str(key) if type(key) is int else describe(key)


def _checked_metadata(meta: Any, filename: str) -> Dict[str, dict]:
    """``_metadata`` as module name -> dict whose ``version`` is an int or absent."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise FusionLoadError([f'{filename}: _metadata is {_short(meta)}, not a mapping'],
                              'not a checkpoint')
    out = {}
    for k, v in meta.items():
        version = v.get('version') if isinstance(v, Mapping) else v
        if not isinstance(k, str) or not isinstance(v, Mapping) or not (
                version is None or type(version) is int):
            raise FusionLoadError([f'{filename}: _metadata entry {_short(k)}: version '
                                   f'{_short(version)} is not an int'], 'not a checkpoint')
        out[k] = v
    return out


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def unwrap(ckpt: Any, filename: str, prefer_ema: bool = False,
           weights: str = 'auto') -> Unwrapped:
    """Unwrap a checkpoint into a plain state dict.

    Removes model-wrapper prefixes (``module.`` when most keys carry it) and
    ``torch.compile``'s ``_orig_mod.`` wherever it occurs, in the keys and in
    ``_metadata`` alike.

    Args:
        ckpt: What the file holds.
        filename (str): For messages.
        prefer_ema (bool): The same as ``weights='ema'`` (kept for old callers).
        weights (str): Which copy: ``'auto'`` (what the file's trainer deploys),
            ``'ema'`` (the averaged weights; an error without them) or ``'raw'``.

    Returns:
        Unwrapped: The tensors and where they came from.
    """
    choice = choose_copy(ckpt, filename, 'ema' if prefer_ema else weights)
    state, container = choice.state, choice.key
    metadata = _checked_metadata(getattr(state, '_metadata', None), filename)
    keys = list(state.keys())
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise FusionLoadError([f'{filename}: state dict key {_short(bad[0])} is not a string'],
                              'not a checkpoint')
    stripped = []
    for prefix in WRAPPER_PREFIXES:
        if sum(k.startswith(prefix) for k in keys) * 2 > len(keys):
            stripped.append(prefix)
    compiled = any(_ORIG_MOD.search(k) for k in keys)
    if compiled:
        stripped.append('_orig_mod.')

    def fix(key: str) -> str:
        for p in stripped:
            if p != '_orig_mod.':
                key = _strip(key, p)
        return _ORIG_MOD.sub(r'\1', key) if compiled else key

    lazy = is_lazy(state)
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    names: Dict[str, Any] = {}  # new key -> original key
    skipped = []
    # a lazy state dict holds tensors only: go by its keys, create no tensor
    for k, v in ((k, None) for k in keys) if lazy else state.items():
        if not lazy and not torch.is_tensor(v):
            skipped.append(_key_text(k))
            continue
        new = fix(_key_text(k))
        if new in names:
            raise FusionLoadError(
                [f'{filename}: keys {describe(names[new])} and {describe(k)} both become '
                 f'{describe(new)} '
                 f'after removing {stripped}'], 'key collision')
        names[new] = k
        if not lazy:
            out[new] = v
    if lazy:
        renamed = any(new != old for new, old in names.items())
        out = RenamedState(state, names) if renamed else state  # type: ignore[assignment]
    fixed_meta = {}
    for k, v in metadata.items():
        # module names in _metadata carry no trailing dot; compare with one
        name = fix(k + '.')[:-1] if k else k
        fixed_meta[name] = v
    fused: List[str] = []
    if not lazy:  # safetensors files have no _metadata, so no fused module is known
        out, fixed_meta, fused = unfuse(out, fixed_meta, filename)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, Mapping) else {}
    return Unwrapped(out, fixed_meta, container, stripped,
                     meta if isinstance(meta, dict) else {}, skipped,
                     family=choice.family, copy=choice.describe(), fused=fused)
