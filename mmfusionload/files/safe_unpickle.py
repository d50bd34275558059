"""Unpickle a checkpoint's object tree without running code the file chooses.

The opcode loop is this project's own (:mod:`mmfusionload.files.pickle_ops`): it
knows exactly the opcodes torch 2.13.0's weights-only unpickler knows (the
protocol-2 ones ``torch.save`` writes), builds (``BUILD``) only ``OrderedDict``
and instances of admitted classes, appends only to lists and sets items only
on dicts. What it may look up by name is decided here, not by torch's default
table nor by ``torch.serialization.add_safe_globals``: the loop sees only this
module's table (:func:`admitted_globals`). Every entry is either a value with
no behaviour (dtypes, markers) or a function written here that checks its
arguments and does work bounded by them (and so by the file's size):

* tensors: ``torch._utils._rebuild_tensor{,_v2,_v3}``, ``_rebuild_parameter``,
  ``_rebuild_parameter_with_state`` (its attributes dropped) and
  ``torch._tensor._rebuild_from_type_v2`` (plain tensors only), each checking
  offset, sizes and strides against the storage record before a view exists
  (:class:`Storages`);
* containers: ``OrderedDict``, ``set``, ``frozenset`` and ``deque`` (as a list)
  of a list or tuple from the file only, never of an iterator that could run on;
* ``_codecs.encode`` with ``latin1`` only (how protocol 2 spells bytes);
* numpy numbers and arrays of a numeric dtype, rebuilt from their bytes
  (object, string and structured dtypes are refused);
* MMEngine's ``HistoryBuffer`` as :class:`HistoryBufferState`: numbers and the
  names of its built-in statistics, rebuilt into a real ``HistoryBuffer`` only
  when asked (resuming a run) and through its constructor;
* ``argparse.Namespace`` and ``datetime`` objects as inert :class:`Placeholder`
  objects: no constructor, no ``__setstate__``, nothing kept.

Not admitted, among others: ``range``, ``bytearray``, ``collections.Counter``,
``defaultdict``, object arrays, ``getattr`` other than ``getattr(HistoryBuffer,
name)``, quantized, sparse, nested and meta tensors, and torch's own
``set``/``bytearray``/``Counter`` entries.

A pickle runs at most :func:`opcode_limit` steps: each opcode is one, and each
item an admitted call makes or copies (``set``, ``frozenset``, ``deque``,
``OrderedDict``, numpy shapes) and each item of a tuple used as a dict key is
one more, every time; the bytes ``_codecs.encode`` and numpy rebuilds make are
counted too (:class:`~mmfusionload.files.pickle_ops.OpcodeBudget`). Dict keys and
set items are strings, ints below 2**60 or flat tuples of them
(:func:`~mmfusionload.files.pickle_ops.check_key`), so no hash costs more than
its bytes. No object the file built is passed to ``str``/``repr``
(:func:`~mmfusionload.errors.describe`). So what a file makes, and the time it
takes, are bounded by its size.
"""
import re
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any, Dict, List, Tuple, Union

import torch

from ..errors import describe
from .pickle_ops import (CheckpointValueError, CorruptFileError, OpcodeBudget,
                         UnsafeGlobalError, check_key, load, load_file)

#: Most dimensions of a tensor or array.
MAX_DIMS = 64
#: Sizes, strides and offsets are int64 in torch.
_INT64 = 1 << 63
#: Longest history a HistoryBuffer may keep (MMEngine's default is 1e6).
MAX_HISTORY = 10_000_000
#: HistoryBuffer's built-in statistics (mmengine 0.10.7 ``_set_default_statistics``).
HISTORY_STATISTICS = ('min', 'max', 'current', 'mean')
_NUMPY_DTYPE = re.compile(r'^(b1|[iu][1248]|f[248]|c(8|16))$')


# ----------------------------------------------------------------- inert objects
class Placeholder:
    """What an object a weight load does not need becomes: its name, nothing else.

    Calling, creating or building it runs no code of the named class and keeps
    no argument; ``repr`` shows ``<argparse.Namespace (not loaded)>``.
    """
    global_name = 'object'
    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __reduce__(self):
        return (make_placeholder, (self.global_name, ))

    def __repr__(self) -> str:
        return f'<{self.global_name} (not loaded)>'


_PLACEHOLDERS: Dict[str, type] = {}


def placeholder_class(name: str) -> type:
    """The :class:`Placeholder` subclass standing for the global ``name``."""
    cls = _PLACEHOLDERS.get(name)
    if cls is None:
        cls = type(name.rsplit('.', 1)[-1], (Placeholder, ),
                   dict(global_name=name, __slots__=(), __module__=__name__))
        _PLACEHOLDERS[name] = cls
    return cls


def make_placeholder(name: str) -> Placeholder:
    """A :class:`Placeholder` for the global ``name``."""
    return placeholder_class(name)()


class _Marker:
    """A named value with no behaviour (``numpy.ndarray``, ``torch.Tensor``...)."""
    __slots__ = ('name', )

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f'<{self.name}>'


class MethodName(str):
    """``getattr(HistoryBuffer, name)`` as read: only the name."""


class _StorageKind:
    """A ``torch.<Type>Storage`` name from a persistent id: its dtype."""
    __slots__ = ('dtype', 'name')

    def __init__(self, dtype: torch.dtype, name: str):
        self.dtype, self.name = dtype, name


class NumpyDtype(Placeholder):
    """``numpy.dtype`` of a numeric kind, checked; ``value`` is the real dtype."""
    global_name = 'numpy.dtype'
    __slots__ = ('value', 'code')

    def __init__(self, *args, **kwargs):
        self.value = None
        code = args[0] if args else None
        if not (isinstance(code, str) and _NUMPY_DTYPE.match(code)):
            raise CheckpointValueError(f'numpy dtype {code!r} is not a number type '
                                       '(object, string and record arrays are refused)')
        self.code = code

    def __setstate__(self, state: Any) -> None:
        import numpy as np
        if not (isinstance(state, tuple) and len(state) >= 8 and state[1] in '<>|='
                and all(s is None for s in state[2:5])):
            raise CheckpointValueError(f'numpy dtype {self.code!r}: unexpected state')
        self.value = np.dtype(self.code).newbyteorder(state[1])


class NumpyArray(Placeholder):
    """A numpy array of a numeric dtype rebuilt from its bytes; ``value`` is the array."""
    global_name = 'numpy.ndarray'
    __slots__ = ('value', )

    def __init__(self, *args, **kwargs):
        self.value = None

    def __setstate__(self, state: Any) -> None:
        import numpy as np
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CheckpointValueError('numpy array: unexpected state')
        _, shape, dtype, fortran, raw = state
        shape = _int_tuple(shape, 'numpy array shape')
        if not (isinstance(dtype, NumpyDtype) and dtype.value is not None):
            raise CheckpointValueError('numpy array of a dtype that is not a number type')
        if not isinstance(raw, bytes):
            raise CheckpointValueError('numpy array without raw bytes (an object array?)')
        n = 1
        for d in shape:
            n *= d
        _spend(len(shape), len(raw))
        if n * dtype.value.itemsize != len(raw):
            raise CheckpointValueError(f'numpy array of shape {list(shape)} and {dtype.value} '
                                       f'needs {n * dtype.value.itemsize} bytes, has {len(raw)}')
        arr = np.frombuffer(raw, dtype=dtype.value).reshape(shape, order='F' if fortran else 'C')
        self.value = arr.copy(order='K')


class HistoryBufferState(Placeholder):
    """MMEngine's ``HistoryBuffer`` as numbers: its ``__setstate__`` never runs.

    Attributes:
        max_length (int): At most :data:`MAX_HISTORY`.
        log_history (list[float]): The logged values.
        count_history (list[float]): Their counts.
    """
    global_name = 'mmengine.logging.history_buffer.HistoryBuffer'
    __slots__ = ('max_length', 'log_history', 'count_history')

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not set(state) <= {
                'max_length', '_log_history', '_count_history', 'statistics_methods'}:
            what = sorted(describe(k) for k in list(state)[:5]) if isinstance(state, dict) else \
                type(state).__name__
            raise CheckpointValueError(f'HistoryBuffer: unexpected state {what}')
        length = state.get('max_length', 1000000)
        if type(length) is not int or not 1 <= length <= MAX_HISTORY:
            raise CheckpointValueError(f'HistoryBuffer: max_length {length!r} is not an int '
                                       f'in [1, {MAX_HISTORY}]')
        self.max_length = length
        self.log_history = _numbers(state.get('_log_history', []), 'HistoryBuffer log')
        self.count_history = _numbers(state.get('_count_history', []), 'HistoryBuffer counts')
        if len(self.log_history) != len(self.count_history):
            raise CheckpointValueError('HistoryBuffer: logs and counts differ in length')
        methods = state.get('statistics_methods', {})
        if not isinstance(methods, dict) or not all(
                isinstance(k, str) and isinstance(v, MethodName) for k, v in methods.items()):
            raise CheckpointValueError('HistoryBuffer: statistics_methods is not a table of '
                                       'method names')

    def rebuild(self) -> Any:
        """A real ``HistoryBuffer`` through its constructor, built-in statistics only."""
        from mmengine.logging.history_buffer import HistoryBuffer
        if not hasattr(self, 'max_length'):  # never built: an empty buffer
            return HistoryBuffer()
        return HistoryBuffer(self.log_history, self.count_history, self.max_length)


def _int_tuple(value: Any, what: str) -> Tuple[int, ...]:
    if type(value) is tuple and len(value) <= MAX_DIMS:  # the common case, in one loop
        for v in value:
            if type(v) is not int or v < 0:
                break
        else:
            return value
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or len(value) > MAX_DIMS or not all(
            type(v) is int and v >= 0 for v in value):
        raise CheckpointValueError(f'{what} {_short(value)} is not a tuple of at most '
                                   f'{MAX_DIMS} non-negative ints')
    return value


def _numbers(value: Any, what: str) -> List[float]:
    if isinstance(value, NumpyArray):
        arr = value.value
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in 'biuf':
            raise CheckpointValueError(f'{what} is not a 1-D array of numbers')
        return arr.tolist()
    if isinstance(value, (list, tuple)) and all(
            type(v) in (int, float) for v in value):
        _spend(len(value))
        return list(value)
    raise CheckpointValueError(f'{what} is not a list of numbers')


def _short(value: Any) -> str:
    if type(value) is tuple and len(value) < 20 and all(type(v) is int for v in value):
        return '(' + ', '.join(map(describe, value)) + (',)' if len(value) == 1 else ')')
    return describe(value)


#: The budget of the pickle being read (set by :func:`unpickle`).
_WORK: ContextVar[OpcodeBudget] = ContextVar('mmfusionload_unpickle_work')


def _spend(items: int, nbytes: int = 0) -> None:
    """Charge what an admitted call makes to the pickle's budget."""
    work = _WORK.get(None)
    if work is not None:
        work.spend(items)
        if nbytes:
            work.spend_bytes(nbytes)


def _keys(items: Any) -> None:
    """Check every item used as a set item or dict key (:func:`check_key`)."""
    work = _WORK.get(None)
    for k in items:
        if type(k) is not str:
            check_key(k, work)


# ----------------------------------------------------------------- bounded callables
def _sequence(value: Any, what: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise CheckpointValueError(f'{what} of a {type(value).__name__}; only a list or '
                                   'tuple stored in the file is accepted')
    return value


def _ordered_dict(*args):
    if not args:
        return OrderedDict()
    if len(args) != 1:
        raise CheckpointValueError('OrderedDict with more than one argument')
    items = _sequence(args[0], 'OrderedDict')
    _spend(len(items))
    if not all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        raise CheckpointValueError('OrderedDict of items that are not pairs')
    _keys(p[0] for p in items)
    return OrderedDict(items)


def _set(*args):
    items = _sequence(args[0], 'set') if args else ()
    _spend(len(items))
    _keys(items)
    return set(items)


def _frozenset(*args):
    items = _sequence(args[0], 'frozenset') if args else ()
    _spend(len(items))
    _keys(items)
    return frozenset(items)


def _deque(*args):
    items = list(_sequence(args[0], 'deque')) if args else []
    _spend(len(items))
    maxlen = args[1] if len(args) > 1 else None
    if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
        raise CheckpointValueError(f'deque maxlen {maxlen!r}')
    return items[-maxlen:] if maxlen else ([] if maxlen == 0 else items)


def _encode(text: Any, encoding: Any = 'utf-8') -> bytes:
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise CheckpointValueError(f'_codecs.encode with {type(text).__name__} and '
                                   f'{_short(encoding)} (only str and latin1)')
    _spend(1, len(text))
    return text.encode('latin1')


def _size(*args):
    return torch.Size(_int_tuple(args[0] if args else (), 'torch.Size'))


def _device(*args):
    if not args or len(args) > 2 or not isinstance(args[0], str) or len(args[0]) > 32 or (
            len(args) == 2 and type(args[1]) is not int):
        raise CheckpointValueError(f'torch.device{_short(args)}')
    return torch.device(*args)


_HB_CLASS = HistoryBufferState
_TENSOR = _Marker('torch.Tensor')
_PARAMETER = _Marker('torch.nn.parameter.Parameter')


def _getattr(owner: Any, name: Any) -> MethodName:
    if owner is _HB_CLASS and isinstance(name, str) and len(name) <= 64:
        return MethodName(name)
    raise UnsafeGlobalError(f'getattr({getattr(owner, "__name__", type(owner).__name__)}, '
                            f'{_short(name)})')


def _np_reconstruct(cls: Any, shape: Any = (0, ), typecode: Any = b'b') -> NumpyArray:
    if cls is not NumpyArray:
        raise CheckpointValueError('numpy _reconstruct of a class that is not ndarray')
    return NumpyArray()


def _np_scalar(dtype: Any, raw: Any = None) -> Any:
    import numpy as np
    if not (isinstance(dtype, NumpyDtype) and dtype.value is not None
            and isinstance(raw, bytes) and len(raw) == dtype.value.itemsize):
        raise CheckpointValueError('numpy scalar that is not a number of its dtype')
    return np.frombuffer(raw, dtype=dtype.value)[0]


def storage_kinds() -> Dict[str, _StorageKind]:
    """``torch.<Type>Storage`` names of plain dtypes -> their dtype (torch 2.13.0)."""
    kinds = {}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        if not name.startswith('Q'):  # quantized storages
            kinds[f'torch.{name}'] = _StorageKind(dtype, name)
    kinds['torch.UntypedStorage'] = _StorageKind(torch.uint8, 'UntypedStorage')
    return kinds


_DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                               torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                               torch.bool, torch.complex64, torch.complex128)}
_STORAGE_KINDS = storage_kinds()


class Invalid:
    """A tensor or storage that broke a rule, kept (no view made) so that the error
    can name where in the checkpoint it sits."""
    __slots__ = ('reason', )

    def __init__(self, reason: str):
        self.reason = reason


class Storages:
    """What one file's tensors may view, and the builders that check them.

    Subclasses (one per file format) implement :meth:`storage` (a persistent id
    -> a storage record) and :meth:`view` (the tensor, or a deferred one).
    """

    def __init__(self):
        self.builders = {
            'torch._utils._rebuild_tensor': self._rebuild_tensor,
            'torch._utils._rebuild_tensor_v2': self._rebuild_tensor_v2,
            'torch._utils._rebuild_tensor_v3': self._rebuild_tensor_v3,
        }

    # the builders, with torch._utils' signatures (torch 2.13.0)
    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self.checked(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self.checked(storage, storage_offset, size, stride, None,
                            (backward_hooks, metadata))

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, dtype, metadata=None):
        if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():
            return Invalid(f'tensor of dtype {_short(dtype)}')
        return self.checked(storage, storage_offset, size, stride, dtype,
                            (backward_hooks, metadata))

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if isinstance(data, Invalid):
            return data
        if not self.is_tensor(data):
            raise CheckpointValueError('parameter of something that is not a tensor')
        try:
            _no_extras(backward_hooks, None)
        except CheckpointValueError as e:
            return Invalid(str(e))
        return data  # a plain tensor: attributes the file gives are dropped

    def _rebuild_from_type(self, func, new_type, args, state=None):
        if func not in self.builders.values() or new_type not in (_TENSOR, _PARAMETER) or \
                not isinstance(args, tuple):
            raise CheckpointValueError('tensor of a type other than torch.Tensor/Parameter')
        return func(*args)

    def checked(self, storage, offset, size, stride, dtype, extras=(None, None)):
        """Check ``(offset, size, stride)`` against ``storage`` and build the view
        (an :class:`Invalid` instead when a check fails). ``extras``: the backward
        hooks and metadata the file gives, which must be empty."""
        if isinstance(storage, Invalid):
            return storage
        try:
            hooks, metadata = extras
            if metadata is not None or not (hooks is None or type(hooks) is OrderedDict
                                            and not hooks):
                _no_extras(hooks, metadata)
            return self._checked(storage, offset, size, stride, dtype)
        except CorruptFileError:
            raise
        except CheckpointValueError as e:
            return Invalid(str(e))

    def _checked(self, storage, offset, size, stride, dtype):
        if type(offset) is not int or offset < 0:
            raise CheckpointValueError(f'storage offset {_short(offset)}')
        numel = last = 0
        if type(size) is tuple and type(stride) is tuple and len(size) == len(stride) and \
                len(size) <= MAX_DIMS:  # what torch.save writes, checked in one loop
            numel = 1
            for s, st in zip(size, stride):
                if type(s) is not int or type(st) is not int or s < 0 or st < 0:
                    numel = -1
                    break
                numel *= s
                last += (s - 1) * st
        else:
            numel = -1
        if numel < 0:
            size = _int_tuple(tuple(size) if isinstance(size, torch.Size) else size,
                              'tensor size')
            stride = _int_tuple(stride, 'tensor stride')
            if len(size) != len(stride):
                raise CheckpointValueError(f'size {list(size)} and stride {list(stride)} differ '
                                           'in length')
            numel, last = 1, 0
            for s, st in zip(size, stride):
                numel *= s
                last += (s - 1) * st
        rec = self.record(storage)
        dtype = dtype or rec.dtype
        itemsize = dtype.itemsize
        capacity = rec.nbytes // itemsize
        if numel and (offset + last + 1) > capacity:
            raise CheckpointValueError(
                f'{rec.name}: a tensor of size {list(size)}, stride {list(stride)} at offset '
                f'{offset} reaches element {offset + last + 1} of a storage holding {capacity}')
        if numel > capacity:
            raise CheckpointValueError(
                f'{rec.name}: a tensor of {numel} elements views a storage of {capacity} '
                '(an expanded view; save it with .contiguous())')
        if offset > capacity:
            raise CheckpointValueError(f'{rec.name}: storage offset {offset} past its '
                                       f'{capacity} elements')
        if any(v >= _INT64 for v in size) or any(v >= _INT64 for v in stride):
            raise CheckpointValueError(f'{rec.name}: a size or stride beyond int64 (size '
                                       f'{_short(size)}, stride {_short(stride)})')
        try:
            return self.view(rec, offset, size, stride, dtype)
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:  # torch refused
            raise CheckpointValueError(f'{rec.name}: a view of size {_short(size)}, stride '
                                       f'{_short(stride)} at offset {offset}: '
                                       f'{type(e).__name__}: {str(e)[:120]}') from None

    def record(self, storage: Any) -> Any:
        raise CheckpointValueError('a tensor of something that is not a storage of this file')

    def view(self, rec, offset, size, stride, dtype) -> Any:
        raise NotImplementedError

    def is_tensor(self, obj: Any) -> bool:
        return torch.is_tensor(obj)

    def storage(self, saved_id: Any) -> Any:
        raise NotImplementedError


def _no_extras(backward_hooks: Any, metadata: Any) -> None:
    if backward_hooks not in (None, ) and not (isinstance(backward_hooks, dict)
                                               and not backward_hooks):
        raise CheckpointValueError('tensor with backward hooks')
    if metadata is not None and not (isinstance(metadata, dict) and not metadata):
        raise CheckpointValueError('tensor with metadata (conjugate/negative bits)')


def admitted_globals(storages: Storages) -> Dict[str, Any]:
    """Global name -> what the pickle gets for it, for one file."""
    table: Dict[str, Any] = {
        'collections.OrderedDict': _ordered_dict,
        'collections.deque': _deque,
        'builtins.set': _set,
        'builtins.frozenset': _frozenset,
        'builtins.getattr': _getattr,
        '_codecs.encode': _encode,
        'torch.Size': _size,
        'torch.device': _device,
        'torch.Tensor': _TENSOR,
        'torch.nn.parameter.Parameter': _PARAMETER,
        'torch._utils._rebuild_parameter': storages._rebuild_parameter,
        'torch._utils._rebuild_parameter_with_state': storages._rebuild_parameter,
        'torch._tensor._rebuild_from_type_v2': storages._rebuild_from_type,
        'mmengine.logging.history_buffer.HistoryBuffer': HistoryBufferState,
        'numpy.ndarray': NumpyArray,
        'numpy.dtype': NumpyDtype,
    }
    table.update(storages.builders)
    table.update(_DTYPES)
    table.update(_STORAGE_KINDS)
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        table[f'{mod}._reconstruct'] = _np_reconstruct
        table[f'{mod}.scalar'] = _np_scalar
    for name in ('argparse.Namespace', 'datetime.datetime', 'datetime.date',
                 'datetime.timedelta', 'datetime.time'):
        table[name] = placeholder_class(name)
    return table


def opcode_limit(file_bytes: int) -> int:
    """Opcodes a pickle in a file of ``file_bytes`` may run: :data:`BASE_OPCODES` plus
    one per 64 bytes of the file."""
    return BASE_OPCODES + file_bytes // 64


#: Opcodes any file may run (a checkpoint with optimizer state runs about 30 per tensor).
BASE_OPCODES = 500_000


def unpickle(data: Any, storages: Storages,
             limit: Union[int, OpcodeBudget, None] = None) -> Any:
    """Unpickle ``data`` (bytes or a binary file) with the admitted globals only.

    Args:
        data (bytes | file): The pickle; a file is read up to and including
            the pickle's ``STOP`` and left there (the next pickle or raw data
            follows).
        storages (Storages): Resolves persistent ids and builds tensors.
        limit (int | OpcodeBudget, optional): Most opcodes this pickle may
            run, or (for a file) a budget its pickles share. Defaults to
            :func:`opcode_limit` of the bytes' length (:data:`BASE_OPCODES` for
            a file).

    Returns:
        Any: The object tree (tensors, containers, numbers, strings, placeholders).

    Raises:
        UnsafeGlobalError: A global outside the table.
        CheckpointValueError: A value that breaks a rule, or too many opcodes.
        Exception: Anything else a malformed pickle raises
            (``pickle.UnpicklingError`` naming the opcode, mostly).
    """
    table = admitted_globals(storages)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        steps = limit.left if isinstance(limit, OpcodeBudget) else \
            limit or opcode_limit(len(data))
        work = limit if isinstance(limit, OpcodeBudget) else OpcodeBudget(steps)
        token = _WORK.set(work)
        try:
            return load(data, table, storages.storage, steps, work=work)[0]
        finally:
            _WORK.reset(token)
    if not isinstance(limit, OpcodeBudget):
        limit = OpcodeBudget(limit or BASE_OPCODES)
    token = _WORK.set(limit)
    try:
        return load_file(data, table, storages.storage, limit)
    finally:
        _WORK.reset(token)
