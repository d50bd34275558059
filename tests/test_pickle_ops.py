"""The opcode loop against torch's own weights-only loop, and on hostile pickles."""
import _compat_pickle
import io
import pickle
import struct
import tracemalloc
import zipfile
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import _weights_only_unpickler as wou

from mmfusionload.files import pickle_ops
from mmfusionload.files.pickle_ops import OPCODES, OpcodeBudget, UnsafeGlobalError
from mmfusionload.files.safe_unpickle import (CheckpointValueError, HistoryBufferState, Storages,
                                        admitted_globals, unpickle)


class MemStorages(Storages):
    """Storages from a dict of raw bytes (the zip members of a ``torch.save`` buffer)."""

    def __init__(self, members=None):
        super().__init__()
        self.members = members or {}

    def storage(self, pid):
        _, kind, key, _, _ = pid
        raw = self.members[key]
        return SimpleNamespace(name=key, dtype=kind.dtype, nbytes=len(raw), raw=raw)

    def record(self, storage):
        return storage

    def view(self, rec, offset, size, stride, dtype):
        base = torch.frombuffer(bytearray(rec.raw), dtype=dtype) if rec.raw else \
            torch.empty(0, dtype=dtype)
        return base.as_strided(size, stride, offset)


def saved(obj):
    """``torch.save``'s data.pkl of ``obj`` and its storage members by key."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        names = z.namelist()
        pkl = z.read(next(n for n in names if n.endswith('/data.pkl')))
        members = {n.rsplit('/', 1)[1]: z.read(n) for n in names if '/data/' in n}
    return pkl, members


def torch_reference(pkl, members):
    """torch 2.13.0's weights-only loop with its own table: no code of this project."""
    def persistent_load(pid):
        _, kind, key, _, _ = pid
        untyped = torch.UntypedStorage.from_buffer(members[key], dtype=torch.uint8) \
            if members[key] else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=kind.dtype,
                                          _internal=True)
    unpickler = wou.Unpickler(io.BytesIO(pkl), encoding='utf-8')
    unpickler.persistent_load = persistent_load
    return unpickler.load()


def same(a, b, where='obj'):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == \
            (b.dtype, b.shape, b.stride(), b.storage_offset()), where
        assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                           b.contiguous().reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f'{where}[{k!r}]')
        assert vars(a).keys() == vars(b).keys() if isinstance(a, OrderedDict) else True
        if isinstance(a, OrderedDict):
            for k in vars(a):
                same(vars(a)[k], vars(b)[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f'{where}[{i}]')
    elif isinstance(a, float):
        assert struct.pack('>d', a) == struct.pack('>d', b), where
    else:
        assert a == b, where


def _state():
    g = torch.Generator().manual_seed(0)
    sd = OrderedDict([
        ('conv.weight', torch.randn(4, 3, 3, 3, generator=g)),
        ('bn.running_var', torch.rand(4, generator=g, dtype=torch.float64)),
        ('bn.num_batches_tracked', torch.tensor(7)),
        ('half', torch.randn(5, generator=g).half()),
        ('bf', torch.randn(2, 3, generator=g).bfloat16()),
        ('i8', torch.tensor([-128, 0, 127], dtype=torch.int8)),
        ('flag', torch.tensor([True, False])),
        ('empty', torch.zeros(0, 3)),
        ('scalar', torch.tensor(2.5)),
    ])
    sd._metadata = OrderedDict([('', {'version': 1}), ('bn', {'version': 2})])
    base = torch.arange(24, dtype=torch.int32)
    return sd, base


def _values():
    return {
        'ints': [0, 1, 255, 256, 65535, 65536, -1, -2**31, 2**31 - 1, 2**31, -2**31 - 1,
                 2**64 + 3, -(2**200)],
        'floats': (0.0, -0.0, 1.5, -3.25e-300, 1e308, float('inf')),
        'strings': ['', 'a', 'ü€\U0001f600', 'x' * 300],
        'bytes': [b'\x00\xff' * 40, b'a'],
        'consts': (None, True, False),
        'tuples': [(), (1, ), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
        'nested': {'a': [{'b': ({'c': [[], {}]}, )}], 3: 'int key', (1, 2): 'tuple key'},
        'od': OrderedDict([('x', 1), ('y', [2, 3])]),
        'set': {1, 2, 3},
    }


def _torch_saved():
    sd, base = _state()
    shared = [base[2:10].view(2, 4), base[::3], base]  # views of one storage
    yield 'state_dict', {'state_dict': sd, 'meta': {'epoch': 3, 'lr': [0.1, 0.01]}}
    yield 'shared_views', {'views': shared, 'same': [sd['half'], sd['half']]}
    yield 'values', _values()
    yield 'bare_tensor', torch.arange(6.).reshape(2, 3).t()


@pytest.mark.parametrize('name,obj', list(_torch_saved()), ids=lambda v: v
                         if isinstance(v, str) else '')
def test_torch_save_pickles_equal_torch_loop(name, obj):
    pkl, members = saved(obj)
    expected = torch_reference(pkl, members)
    same(unpickle(pkl, MemStorages(members)), expected)
    # the same pickle read from a file, followed by other bytes
    f = io.BytesIO(pkl + b'trailing raw data')
    same(unpickle(f, MemStorages(members)), expected)
    assert f.read() == b'trailing raw data'


@pytest.mark.parametrize('key', list(_values()))
def test_protocol2_pickles_equal_torch_loop(key):
    pkl = pickle.dumps(_values()[key], protocol=2)
    same(unpickle(pkl, MemStorages()), wou.load(io.BytesIO(pkl), encoding='utf-8'))


@pytest.mark.parametrize('pkl', [
    b'\x80\x02U\x03abcq\x00.',  # SHORT_BINSTRING
    b'\x80\x02\x8f.',  # EMPTY_SET
    b'\x80\x02]q\x00(K\x01K\x02e]a.',  # APPENDS, APPEND
    b'\x80\x02}(K\x01K\x02K\x03K\x04uK\x05K\x06s.',  # SETITEMS, SETITEM
    b'\x80\x02J\xff\xff\xff\xffr\xff\xff\xff\xffj\xff\xff\xff\xff\x86.',  # BININT < 0, LONG memo
    b'\x80\x02\x8a\x00\x8a\x01\x80\x8a\x02\xff\x7f\x87.',  # LONG1 of 0, -128, 32767
    b'\x80\x04N.',  # another protocol number
], ids=['short-binstring', 'empty-set', 'appends', 'setitems', 'long-memo', 'long1', 'proto4'])
def test_handmade_pickles_equal_torch_loop(pkl):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        expected = wou.load(io.BytesIO(pkl), encoding='utf-8')
    same(unpickle(pkl, MemStorages()), expected)
    same(unpickle(io.BytesIO(pkl), MemStorages()), expected)


def test_opcode_set_is_torch_loops():
    """A byte torch's loop refuses as an operand is exactly one outside OPCODES."""
    refused = set()
    for op in range(256):
        try:
            wou.load(io.BytesIO(bytes([op])), encoding='utf-8')
        except pickle.UnpicklingError as e:
            if 'Unsupported operand' in str(e):
                refused.add(op)
        except Exception:
            pass
    assert refused == set(range(256)) - set(OPCODES)


def test_python2_names_map_as_torch_maps_them():
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING
    table = admitted_globals(Storages())
    pairs = set(_compat_pickle.NAME_MAPPING) | {
        (m, n.rsplit('.', 1)[1]) for m in _compat_pickle.IMPORT_MAPPING for n in table}
    for module, name in pairs:
        tm, tn = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        assert (pickle_ops.global_name(module, name) in table) == (f'{tm}.{tn}' in table)


# ------------------------------------------------------------------ hostile pickles
def _both(pkl, storages=None):
    """The error for ``pkl`` as bytes and as a file (the same kind and text)."""
    errors = []
    for data in (pkl, io.BytesIO(pkl)):
        with pytest.raises(Exception) as info:
            unpickle(data, storages or MemStorages())
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]), errors
    return errors


@pytest.mark.parametrize('op', sorted(set(range(256)) - set(OPCODES)))
def test_opcode_outside_the_set_is_refused_by_name(op):
    for e in _both(b'\x80\x02N' + bytes([op]) + b'\x00' * 16 + b'.'):
        assert isinstance(e, pickle.UnpicklingError)
        assert pickle_ops.opcode_name(op) in str(e)
        if op in pickle_ops.NAMES:
            assert pickle_ops.NAMES[op] in str(e)


def test_opcode_names():
    assert pickle_ops.opcode_name(0x95) == 'FRAME (0x95)'
    assert pickle_ops.opcode_name(0x6F) == 'OBJ (0x6f)'


@pytest.mark.parametrize('pkl', [b'\x80\x02Nr\xff\xff\xff\xff.', b'\x80\x02Nq\xff.'])
def test_huge_memo_index_does_not_allocate(pkl):
    tracemalloc.start()
    try:
        assert unpickle(pkl, MemStorages()) is None
        assert unpickle(io.BytesIO(pkl), MemStorages()) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_memo_get_of_unset_entry():
    for e in _both(b'\x80\x02Nq\x01j\x07\x00\x00\x00.'):
        assert 'LONG_BINGET' in str(e) and 'memo' in str(e)


@pytest.mark.parametrize('pkl,what', [
    (b'', 'ends before'), (b'\x80\x02', 'ends before'), (b'\x80', 'PROTO'),
    (b'\x80\x02J\x01\x00', 'BININT'), (b'\x80\x02M\x01', 'BININT2'),
    (b'\x80\x02K', 'BININT1'), (b'\x80\x02G\x00\x00\x00', 'BINFLOAT'),
    (b'\x80\x02X\x05\x00\x00\x00abc', 'BINUNICODE'),
    (b'\x80\x02X\xf0\xff\xff\xffabc', 'BINUNICODE'),
    (b'\x80\x02U\x05ab', 'SHORT_BINSTRING'), (b'\x80\x02\x8a\x09\x01', 'LONG1'),
    (b'\x80\x02ctorch\nSize', 'GLOBAL'), (b'\x80\x02)R.', 'REDUCE'),
    (b'\x80\x02Nr\x00\x00', 'LONG_BINPUT'),
    (b'\x80\x02t.', 'TUPLE'), (b'\x80\x02N\x86.', 'TUPLE2'), (b'\x80\x02.', 'STOP'),
])
def test_truncated_or_malformed_input(pkl, what):
    for e in _both(pkl):
        assert isinstance(e, pickle.UnpicklingError), e
        assert what in str(e)


def _call(module, name, args=b')'):
    return b'\x80\x02c' + module + b'\n' + name + b'\n' + args + b'R.'


@pytest.mark.parametrize('pkl,kind,what', [
    (_call(b'posix', b'system', b'X\x01\x00\x00\x00x\x85'), UnsafeGlobalError, 'posix.system'),
    (_call(b'__builtin__', b'eval', b'X\x01\x00\x00\x00x\x85'), UnsafeGlobalError,
     'builtins.eval'),
    (_call(b'__builtin__', b'xrange', b'K\x05\x85'), UnsafeGlobalError, 'builtins.range'),
    # REDUCE of something that is not a table value: a string, a built object
    (b'\x80\x02X\x01\x00\x00\x00x)R.', pickle.UnpicklingError, 'reduce'),
    (_call(b'collections', b'OrderedDict')[:-1] + b')R.', pickle.UnpicklingError, 'reduce'),
    # REDUCE of an admitted callable with arguments that are not a tuple
    (b'\x80\x02ccollections\nOrderedDict\n]R.', pickle.UnpicklingError, 'not a tuple'),
    # NEWOBJ of an admitted function, of a marker value (not classes)
    (b'\x80\x02ccollections\nOrderedDict\n)\x81.', pickle.UnpicklingError, 'NEWOBJ'),
    (b'\x80\x02ctorch\nTensor\n)\x81.', pickle.UnpicklingError, 'NEWOBJ'),
    # BUILD on a class, a function, a dict, a list, an OrderedDict with a list state
    (b'\x80\x02cargparse\nNamespace\n}b.', pickle.UnpicklingError, 'build a type'),
    (b'\x80\x02ccollections\nOrderedDict\n}b.', pickle.UnpicklingError, 'build a function'),
    (b'\x80\x02}}b.', pickle.UnpicklingError, 'build a dict'),
    (b'\x80\x02]}b.', pickle.UnpicklingError, 'build a list'),
    (b'\x80\x02ccollections\nOrderedDict\n)R]b.', pickle.UnpicklingError,
     'build a OrderedDict'),
    # containers of the wrong kind
    (b'\x80\x02}K\x01a.', pickle.UnpicklingError, 'APPEND at byte 5 on a dict'),
    (b'\x80\x02)(K\x01e.', pickle.UnpicklingError, 'APPENDS at byte 6 on a tuple'),
    (b'\x80\x02]K\x01K\x02s.', pickle.UnpicklingError, 'SETITEM at byte 7 on a list'),
    (b'\x80\x02](K\x01K\x02u.', pickle.UnpicklingError, 'SETITEMS at byte 8 on a list'),
    (b'\x80\x02\x8fK\x01K\x02s.', pickle.UnpicklingError, 'SETITEM at byte 7 on a set'),
    (b'\x80\x02}(K\x01u.', pickle.UnpicklingError, 'odd number'),
    # persistent ids that are not storages
    (b'\x80\x02X\x06\x00\x00\x00module\x85Q.', pickle.UnpicklingError,
     "persistent_load of 'module'"),
    (b'\x80\x02U\x06module\x85Q.', pickle.UnpicklingError, "persistent_load of 'module'"),
    (b'\x80\x02N\x85Q.', pickle.UnpicklingError, 'persistent_load of NoneType'),
    (b'\x80\x02X\x01\x00\x00\x00xQ.', pickle.UnpicklingError, 'is a str'),
])
def test_refused(pkl, kind, what):
    for e in _both(pkl):
        assert isinstance(e, kind), e
        assert what in (e.name if kind is UnsafeGlobalError else str(e))


def test_build_on_tensor_is_refused():
    """Stricter than torch: its loop calls ``Tensor.set_`` with the file's state."""
    pkl, members = saved(torch.zeros(2))
    evil = pkl[:-1] + b'(tb.'  # BUILD with an empty tuple as state
    torch_reference(evil, members)  # torch's loop accepts it
    for e in _both(evil, MemStorages(members)):
        assert 'build a Tensor' in str(e)


def test_persistent_ids_torch_admits_pass():
    seen = []

    class Ids(MemStorages):
        def storage(self, pid):
            seen.append(pid)
            return pid
    for pkl in (b'\x80\x02K\x05Q.', b'\x80\x02)Q.', b'\x80\x02U\x07storage\x85Q.'):
        unpickle(pkl, Ids())
    assert seen == [5, (), ('storage', )]


def test_build_on_admitted_class_calls_its_setstate():
    pkl = (b'\x80\x02cmmengine.logging.history_buffer\nHistoryBuffer\n)\x81}('
           b'X\n\x00\x00\x00max_lengthK\x05ub.')
    for data in (pkl, io.BytesIO(pkl)):
        hb = unpickle(data, MemStorages())
        assert type(hb) is HistoryBufferState and hb.max_length == 5


def test_opcode_budget_for_bytes_and_files():
    pkl = b'\x80\x02]' + b'(' + b'}' * 1000 + b'e.'
    assert len(unpickle(pkl, MemStorages(), 1005)) == 1000  # 1005 opcodes
    with pytest.raises(CheckpointValueError, match='more than 1004 opcodes'):
        unpickle(pkl, MemStorages(), 1004)
    budget = OpcodeBudget(2010)  # shared by the pickles of one file
    f = io.BytesIO(pkl * 3)
    assert len(unpickle(f, MemStorages(), budget)) == 1000
    assert len(unpickle(f, MemStorages(), budget)) == 1000
    with pytest.raises(CheckpointValueError, match='more than 2010 steps'):
        unpickle(f, MemStorages(), budget)
    # MARK nesting is bounded by the budget too
    with pytest.raises(CheckpointValueError, match='opcodes'):
        unpickle(b'\x80\x02' + b'(' * 5000 + b'.', MemStorages(), 4000)


def test_deep_mark_nesting_within_budget():
    pkl = b'\x80\x02]' + b'(]' * 3000 + b'e' * 3000 + b'.'
    obj = unpickle(pkl, MemStorages())
    depth = 0
    while obj:
        obj, depth = obj[0], depth + 1
    assert depth == 3000
