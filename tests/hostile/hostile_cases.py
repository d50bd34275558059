"""The hostile-file corpus: every case a file (or a source option) and what must happen.

Each :class:`Case` builds its file in a folder and names the paths it goes
through (``load``: ``load_sources`` and ``dry_run``; the ``wide`` cases also
``convert``, ``merge``, ``inspect --source``, MMEngine ``load_from`` and
``resume`` in a Runner, and the 2-rank broadcast reader). An ``error`` case must
raise :class:`~mmfusionload.FusionLoadError` naming the file and ``key``; an
``ok`` case (a control) must load the expected values.
"""
import io
import json
import os
import os.path as osp
import struct
import tarfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModel

from hostile_pickles import (OD, Build, Call, Checkpoint, G, Get, New, Persistent, Put, Raw, T,
                             as_od, legacy_tensor, pickle_bytes, write_legacy, write_zip)

#: Created by any payload that manages to run a command.
MARKER_NAME = 'code_ran'
HB = G('mmengine.logging.history_buffer', 'HistoryBuffer')
GETATTR = G('builtins', 'getattr')


class HostileTiny(BaseModel):
    """The model every case loads into: float32, float16, int32 and int64 tensors."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer('count', torch.zeros(2, dtype=torch.int32))
        self.low = nn.Parameter(torch.zeros(2, dtype=torch.float16))

    def forward(self, inputs=None, data_samples=None, mode='tensor'):
        return self.fc(inputs)


def good_state() -> 'OrderedDict[str, torch.Tensor]':
    """The values a good file carries (none equal the model's initial ones)."""
    return OrderedDict([
        ('fc.weight', torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7),
        ('fc.bias', torch.tensor([0.5, -1.5, 2.5])),
        ('bn.weight', torch.tensor([1.5, 2.0, 0.25])),
        ('bn.bias', torch.tensor([-0.5, 0.0, 0.5])),
        ('bn.running_mean', torch.tensor([0.1, 0.2, 0.3])),
        ('bn.running_var', torch.tensor([1.1, 1.2, 1.3])),
        ('bn.num_batches_tracked', torch.tensor(7)),
        ('count', torch.tensor([3, 4], dtype=torch.int32)),
        ('low', torch.tensor([0.5, 1.5], dtype=torch.float16)),
    ])


@dataclass
class Case:
    name: str
    family: str
    build: Callable[[str], str]
    key: Optional[str] = None  # what the error must name besides the file
    expect: str = 'error'
    wide: bool = False
    source: Dict[str, Any] = field(default_factory=dict)  # extra source options
    pollute: bool = False  # add os.system to torch's safe globals first
    #: Run on the file's path when a load first reads tensor bytes (the file is put
    #: back as built before each read): a file replaced, truncated or rewritten
    #: while it is read.
    during: Optional[Callable[[str], None]] = None
    promise: str = ''  # what the case checks, in words


CASES: List[Case] = []


def case(name, family, key=None, expect='error', wide=False, **kw):
    def deco(fn):
        promise = kw.pop('promise', '') or (fn.__doc__ or '').strip() or _PROMISES.get(
            family, '')
        CASES.append(Case(name, family, fn, key, expect, wide, promise=promise, **kw))
        return fn
    return deco


#: The promise each family checks, unless a case says its own.
_PROMISES = {
    'code': 'no code the file names runs: FusionLoadError naming the global',
    'memory': 'time and memory bounded by the file size: FusionLoadError naming the key',
    'values': 'no silent wrong value: FusionLoadError naming the key, model unchanged',
    'zip': 'a broken archive is refused with FusionLoadError naming file and member',
    'legacy': 'a broken old-format file is refused with FusionLoadError',
    'safetensors': 'a broken safetensors header is refused with FusionLoadError',
    'control': 'a good file loads its exact values',
    'bounds': 'no hash or call does more work than the file has bytes: FusionLoadError',
    'dtype': 'every safetensors dtype loads exactly or is refused by key',
    'messages': 'a storage-level problem names the tensor key, not only the member',
    'snapshot': 'a file changed while being read: one version, or "changed while being '
                'read"; never a signal, never two versions',
}


def _p(d: str, name: str) -> str:
    return osp.join(d, name)


def marker(d: str) -> str:
    return osp.join(d, MARKER_NAME)


def zip_with(d, name, extra=None, state=None, meta=None, metadata=None, top=None):
    """A zip checkpoint of ``state`` (default: the good one) plus ``extra`` entries."""
    ck = Checkpoint(None)
    od = as_od(state if state is not None else good_state(), ck, metadata)
    obj = {'state_dict': od, 'meta': meta if meta is not None else {'epoch': 1}}
    obj.update(extra or {})
    ck.obj = top if top is not None else obj
    return write_zip(_p(d, name), pickle_bytes(ck.obj), ck.storages)


def legacy_with(d, name, extra=None):
    sd = good_state()
    storages, elem, items = {}, {}, []
    for i, (k, v) in enumerate(sd.items()):
        storages[str(i)] = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        elem[str(i)] = v.element_size()
        items.append((k, legacy_tensor(v, str(i))))
    obj = {'state_dict': OD(items), 'meta': {'epoch': 1}}
    obj.update(extra or {})
    return write_legacy(_p(d, name), pickle_bytes(obj), storages, elem)


def with_tensor(key: str, expr_fn) -> Callable:
    """Replace one tensor of the good state by ``expr_fn(ck)``."""
    def build(d, name):
        ck = Checkpoint(None)
        items = []
        for k, v in good_state().items():
            items.append((k, expr_fn(ck) if k == key else ck.tensor(v)))
        ck.obj = {'state_dict': OD(items), 'meta': {}}
        return write_zip(_p(d, name), pickle_bytes(ck.obj), ck.storages)
    return build


# ================================================================ code execution
def _fmt(x: Any, d: str) -> Any:
    """``{m}`` in the strings of ``x`` replaced by the marker file's path."""
    if isinstance(x, str):
        return x.replace('{m}', marker(d))
    if isinstance(x, (list, tuple)):
        return type(x)(_fmt(v, d) for v in x)
    return x


def _payload_case(name, func: G, args, key, wide=False, **kw):
    @case(name, 'code', key, wide=wide, **kw)
    def build(d):
        return zip_with(d, name + '.pth', {'payload': Call(func, _fmt(args, d))})


_payload_case('os-system', G('posix', 'system'), ('touch {m}', ), 'posix.system', wide=True)
_payload_case('os-system-os-module', G('os', 'system'), ('touch {m}', ), 'os.system')
_payload_case('subprocess-popen', G('subprocess', 'Popen'), (['touch', '{m}'], ),
              'subprocess.Popen')
_payload_case('builtins-eval', G('builtins', 'eval'), ('open("{m}", "w")', ), 'builtins.eval')
_payload_case('builtins-exec', G('builtins', 'exec'), ('open("{m}", "w")', ), 'builtins.exec')
_payload_case('py2-builtin-eval', G('__builtin__', 'eval'), ('1', ), 'builtins.eval')
_payload_case('builtins-import', G('builtins', '__import__'), ('os', ), 'builtins.__import__')
_payload_case('importlib', G('importlib', 'import_module'), ('os', ), 'importlib.import_module')
_payload_case('nested-torch-load', G('torch', 'load'), ('/dev/null', ), 'torch.load')
_payload_case('numpy-load', G('numpy', 'load'), ('/dev/null', ), 'numpy.load')
_payload_case('functools-partial', G('functools', 'partial'), (1, ), 'functools.partial')
_payload_case('operator-attrgetter', G('operator', 'attrgetter'), ('x', ), 'operator.attrgetter')
_payload_case('pickle-loads', G('pickle', 'loads'), (b'N.', ), 'pickle.loads')
_payload_case('copyreg-reconstructor', G('copyreg', '_reconstructor'), (1, 2, 3),
              'copyreg._reconstructor')
_payload_case('builtins-range', G('builtins', 'range'), (10**15, ), 'builtins.range')
_payload_case('builtins-bytearray', G('builtins', 'bytearray'), (10**12, ), 'builtins.bytearray',
              wide=True)
_payload_case('torch-storage-from-file', G('torch', 'from_file'), ('/etc/passwd', ),
              'torch.from_file')
_payload_case('collections-counter', G('collections', 'Counter'), ([1], ), 'collections.Counter')
_payload_case('defaultdict', G('collections', 'defaultdict'), (), 'collections.defaultdict')
_payload_case('traceback-framesummary', G('traceback', 'FrameSummary'),
              ('/etc/hostname', 1, 'x'), 'traceback.FrameSummary', wide=True)
_payload_case('torch-tensor-setstate', G('torch._tensor', 'Tensor'), (), 'torch._tensor.Tensor')
_payload_case('serialization-add-safe-globals', G('torch.serialization', 'add_safe_globals'),
              ([], ), 'torch.serialization.add_safe_globals')
_payload_case('os-system-polluted-allowlist', G('posix', 'system'), ('touch {m}', ),
              'posix.system', pollute=True)


@case('getattr-foreign-owner', 'code', 'getattr')
def _(d):
    return zip_with(d, 'getattr.pth', {'payload': Call(GETATTR, (
        G('collections', 'OrderedDict'), '__globals__'))})


@case('history-buffer-statistics-chain', 'code', 'reduce', wide=True)
def _(d):
    # the state names a dunder statistic; then getattr(HistoryBuffer, '__getattribute__')
    # is called like a function on its way to os.system
    stats = {'__getattribute__': Call(GETATTR, (HB, 'mean'))}
    hb = Build(New(HB, ()), {'statistics_methods': stats, 'max_length': 10,
                             '_log_history': [], '_count_history': []})
    chain = Call(Call(GETATTR, (HB, '__getattribute__')), (HB, '__init__'))
    return zip_with(d, 'hb_chain.pth', {'message_hub': {'log_scalars': {'x': hb}},
                                        'payload': chain})


@case('build-on-argparse-class', 'code', 'build', wide=True)
def _(d):
    return zip_with(d, 'argparse_build.pth', {'payload': Build(
        G('argparse', 'Namespace'), (None, {'__init__': Call(GETATTR, (HB, 'mean'))}))})


@case('build-on-admitted-function', 'code', 'build')
def _(d):
    return zip_with(d, 'od_build.pth', {'payload': Build(
        G('collections', 'OrderedDict'), (None, {'__defaults__': (1, )}))})


@case('build-on-history-buffer-class', 'code', 'build')
def _(d):
    return zip_with(d, 'hb_class_build.pth', {'payload': Build(
        HB, (None, {'_statistics_methods': {'__getattribute__': 1}}))})


@case('parameter-state-sets-reader-attribute', 'code', 'fc.weight', wide=True)
def _(d):
    # a stride-0 view the size of the target, with an attribute named like a page tag
    return with_tensor('fc.weight', lambda ck: Call(
        G('torch._utils', '_rebuild_parameter_with_state'),
        (T(_one(ck), 'FloatStorage', 1, (3, 4), (0, 0)), False, OD(),
         {'_mmfl_mapped': 0})))(d, 'param_state.pth')


def _one(ck: Checkpoint) -> str:
    ck.storages['z'] = struct.pack('<f', 1.0)
    return 'z'


@case('legacy-os-system', 'code', 'posix.system', wide=True)
def _(d):
    return legacy_with(d, 'legacy_evil.pth', {'payload': Call(G('posix', 'system'),
                                                                (_fmt('touch {m}', d), ))})


@case('bare-pickle-os-system', 'code', 'posix.system')
def _(d):
    path = _p(d, 'bare.pth')
    with open(path, 'wb') as f:
        f.write(pickle_bytes(Call(G('posix', 'system'), (_fmt('touch {m}', d), ))))
    return path


@case('legacy-payload-in-sys-info', 'code', 'posix.system')
def _(d):
    sd = good_state()
    head = [pickle_bytes(torch.serialization.MAGIC_NUMBER),
            pickle_bytes(torch.serialization.PROTOCOL_VERSION),
            pickle_bytes(Call(G('posix', 'system'), (_fmt('touch {m}', d), )))]
    return write_legacy(_p(d, 'legacy_sysinfo.pth'), pickle_bytes({}), {}, {}, head=head)


@case('ok-inert-objects', 'control', expect='ok')
def _(d):
    # argparse, datetime and HistoryBuffer state with hostile names: inert, nothing runs
    ns = Build(New(G('argparse', 'Namespace'), ()), {'__init__': 'x', 'lr': 0.1})
    when = Call(G('datetime', 'datetime'), (b'\x07\xe8\x01\x01\x00\x00\x00\x00\x00\x00', ))
    hb = Build(New(HB, ()), {'statistics_methods': {'__class__': Call(GETATTR, (HB, 'x'))},
                             'max_length': 5, '_log_history': [1.0], '_count_history': [1]})
    return zip_with(d, 'inert.pth', {'args': ns, 'time': when,
                                     'message_hub': {'log_scalars': {'loss': hb}}})


@case('ok-parameter-state-ignored', 'control', expect='ok')
def _(d):
    def expr(ck):
        t = ck.tensor(good_state()['fc.weight'])
        return Call(G('torch._utils', '_rebuild_parameter_with_state'),
                    (t, False, OD(), {'_mmfl_mapped': 0, 'data': 1}))
    return with_tensor('fc.weight', expr)(d, 'param_state_ok.pth')


# ================================================================ memory and time
@case('deque-of-range', 'memory', 'builtins.range', wide=True)
def _(d):
    return zip_with(d, 'deque.pth', {'payload': Call(G('collections', 'deque'), (
        Call(G('builtins', 'range'), (10**15, )), 0))})


@case('set-of-range', 'memory', 'builtins.range')
def _(d):
    return zip_with(d, 'setrange.pth', {'payload': Call(G('builtins', 'set'), (
        Call(G('builtins', 'range'), (10**12, )), ))})


@case('py2-xrange', 'memory', 'builtins.range')
def _(d):
    return zip_with(d, 'xrange.pth', {'payload': Call(G('__builtin__', 'xrange'), (10**12, ))})


def _np_dtype(code):
    return Build(Call(G('numpy', 'dtype'), (code, False, True)),
                 (3, '|', None, None, None, -1, -1, 63))


@case('numpy-object-array', 'memory', 'numpy dtype', wide=True)
def _(d):
    arr = Build(Call(G('numpy.core.multiarray', '_reconstruct'), (G('numpy', 'ndarray'), (0, ),
                                                                   b'b')),
                (1, (10**9, ), _np_dtype('O8'), False, [None]))
    return zip_with(d, 'objarr.pth', {'meta': {'a': arr}})


@case('numpy-array-size-lie', 'memory', 'numpy array')
def _(d):
    arr = Build(Call(G('numpy._core.multiarray', '_reconstruct'), (G('numpy', 'ndarray'), (0, ),
                                                                    b'b')),
                (1, (10**9, ), _np_dtype('f8'), False, b'\x00' * 8))
    return zip_with(d, 'nparr.pth', {'meta': {'a': arr}})


@case('numpy-string-dtype', 'memory', 'numpy dtype')
def _(d):
    return zip_with(d, 'npstr.pth', {'meta': {'a': _np_dtype('U1000000000')}})


@case('codecs-encode-other-codec', 'memory', '_codecs.encode')
def _(d):
    return zip_with(d, 'codec.pth', {'meta': {'a': Call(G('_codecs', 'encode'),
                                                         (b'x'.decode(), 'zlib'))}})


@case('torch-size-of-tensor', 'memory', 'torch.Size')
def _(d):
    return with_tensor('fc.bias', lambda ck: Call(G('torch', 'Size'), (ck.tensor(
        torch.zeros(3)), )))(d, 'size_tensor.pth')


@case('ordered-dict-of-expanded-tensor', 'memory', 'OrderedDict')
def _(d):
    return zip_with(d, 'od_tensor.pth', {'meta': {'a': Call(G('collections', 'OrderedDict'), (
        T('x', 'FloatStorage', 1, (1, ), (1, )), ))}})


def _deflated(d, name, member_suffix):
    src = zip_with(d, name + '.src')
    out = _p(d, name)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, 'w') as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(member_suffix):
                if member_suffix == 'data.pkl':  # a 1000x bomb: a long string in meta
                    data = data[:-1] + b'X' + struct.pack('<I', 4 << 20) + b'a' * (4 << 20) + \
                        b'0.'
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info.filename, data)
    os.unlink(src)
    return out


@case('deflated-data-pkl-bomb', 'memory', 'data.pkl', wide=True)
def _(d):
    return _deflated(d, 'bomb.pth', 'data.pkl')


@case('deflated-storage', 'values', 'data/0')
def _(d):
    return _deflated(d, 'deflated_storage.pth', 'data/0')


def _laughs(levels):
    """``levels`` lists, each holding the previous one twice (2**levels leaves)."""
    return [Put(['x', 'x'] if i == 0 else [Get(i - 1), Get(i - 1)], i) for i in range(levels)]


@case('billion-laughs-deep', 'memory', 'meta', wide=True)
def _(d):
    return zip_with(d, 'laughs.pth', meta={'a': _laughs(80)})


@case('ok-billion-laughs-shallow', 'control', expect='ok')
def _(d):
    # 2**40 leaves when expanded; bounded by the memo for loads, by a budget in convert
    return zip_with(d, 'laughs_ok.pth', meta={'a': _laughs(40)})


@case('deep-nesting', 'memory', 'meta')
def _(d):
    path = zip_with(d, 'deep.pth', meta={'a': Raw(b']' + b'(]' * 100000 + b'e' * 100000)})
    return path


@case('string-length-lie', 'memory')
def _(d):
    return zip_with(d, 'strlie.pth', meta={'a': Raw(b'X' + struct.pack('<I', 0xFFFFFFF0))})


@case('storage-numel-lie', 'memory', 'fc.weight')
def _(d):
    return with_tensor('fc.weight', lambda ck: T(_one(ck), 'FloatStorage', 2**40, (3, 4)))(
        d, 'numel_lie.pth')


@case('expanded-view', 'memory', 'fc.weight')
def _(d):
    return with_tensor('fc.weight', lambda ck: T(_one(ck), 'FloatStorage', 1, (3, 4), (0, 0)))(
        d, 'expanded.pth')


@case('huge-expanded-view', 'memory', 'fc.weight')
def _(d):
    return with_tensor('fc.weight', lambda ck: T(_one(ck), 'FloatStorage', 1, (10**6, 10**6),
                                                 (0, 0)))(d, 'expanded_huge.pth')


@case('view-past-storage', 'memory', 'fc.weight')
def _(d):
    return with_tensor('fc.weight', lambda ck: T(_one(ck), 'FloatStorage', 1, (3, 4)))(
        d, 'past.pth')


@case('offset-past-storage', 'memory', 'fc.bias')
def _(d):
    return with_tensor('fc.bias', lambda ck: T(ck.tensor(torch.zeros(3)).key, 'FloatStorage',
                                               3, (3, ), (1, ), offset=2**62))(d, 'offset.pth')


@case('negative-offset', 'memory', 'fc.bias')
def _(d):
    return with_tensor('fc.bias', lambda ck: T(ck.tensor(torch.zeros(3)).key, 'FloatStorage',
                                               3, (3, ), (1, ), offset=-1))(d, 'negoff.pth')


@case('negative-stride', 'memory', 'fc.bias')
def _(d):
    return with_tensor('fc.bias', lambda ck: T(ck.tensor(torch.zeros(3)).key, 'FloatStorage',
                                               3, (3, ), (-1, ), offset=2))(d, 'negstride.pth')


@case('stride-size-length-differ', 'memory', 'fc.bias')
def _(d):
    return with_tensor('fc.bias', lambda ck: T(ck.tensor(torch.zeros(3)).key, 'FloatStorage',
                                               3, (3, ), (1, 1)))(d, 'strides.pth')


@case('pickle-opcode-budget', 'memory', 'opcodes')
def _(d):
    # 700k empty dicts in a file of about 700 KB: more opcodes than the file may run
    return zip_with(d, 'budget.pth', meta={'a': Raw(b']' + b'(' + b'}' * 700000 + b'e')})


@case('ok-many-small-objects', 'control', expect='ok')
def _(d):
    return zip_with(d, 'many.pth', meta={'a': Raw(b']' + b'(' + b'}' * 200000 + b'e')})


# ================================================================ silent wrong values
@case('record-shorter-than-storage', 'values', 'fc.weight', wide=True)
def _(d):
    def expr(ck):
        t = ck.tensor(good_state()['fc.weight'])
        ck.storages[t.key] = ck.storages[t.key][:16]
        return t
    return with_tensor('fc.weight', expr)(d, 'short_record.pth')


@case('float64-overflows-float32', 'values', 'fc.weight')
def _(d):
    return with_tensor('fc.weight', lambda ck: ck.tensor(torch.full((3, 4), 1e300,
                                                                    dtype=torch.float64)))(
        d, 'f64.pth')


@case('float32-overflows-float16', 'values', 'low')
def _(d):
    return with_tensor('low', lambda ck: ck.tensor(torch.tensor([1.0, 1e5])))(d, 'f16.pth')


@case('int64-overflows-int32', 'values', 'count')
def _(d):
    return with_tensor('count', lambda ck: ck.tensor(torch.tensor([2**40 + 5, 1])))(d, 'i64.pth')


@case('int64-underflows-int32', 'values', 'count')
def _(d):
    return with_tensor('count', lambda ck: ck.tensor(torch.tensor([-2**40, 1])))(d, 'i64n.pth')


@case('ok-int64-fits-int32', 'control', expect='ok')
def _(d):
    return with_tensor('count', lambda ck: ck.tensor(torch.tensor([3, 4])))(d, 'i64ok.pth')


@case('nan-weight', 'values', 'fc.weight')
def _(d):
    return with_tensor('fc.weight', lambda ck: ck.tensor(torch.full((3, 4), float('nan'))))(
        d, 'nan.pth')


@case('inf-running-var', 'values', 'bn.running_var')
def _(d):
    return with_tensor('bn.running_var', lambda ck: ck.tensor(torch.tensor([1., float('inf'),
                                                                             1.])))(d, 'inf.pth')


@case('nan-float16', 'values', 'low')
def _(d):
    return with_tensor('low', lambda ck: ck.tensor(torch.tensor([float('nan'), 1.],
                                                                 dtype=torch.float16)))(
        d, 'nan16.pth')


@case('float-into-int-buffer', 'values', 'bn.num_batches_tracked')
def _(d):
    return with_tensor('bn.num_batches_tracked', lambda ck: ck.tensor(torch.tensor(1.5)))(
        d, 'float_int.pth')


@case('complex-into-float', 'values', 'fc.bias')
def _(d):
    def expr(ck):
        ck.storages['c'] = torch.zeros(3, dtype=torch.complex64).view(torch.uint8).numpy().tobytes()
        return T('c', 'ComplexFloatStorage', 3, (3, ))
    return with_tensor('fc.bias', expr)(d, 'complex.pth')


@case('wrong-shape', 'values', 'fc.weight')
def _(d):
    return with_tensor('fc.weight', lambda ck: ck.tensor(torch.zeros(4, 3)))(d, 'shape.pth')


@case('prefix-collision', 'values', "'b.weight'",
      source=dict(prefix={'a.': 'fc.', 'b.': 'fc.'}))
def _(d):
    sd = good_state()
    state = OrderedDict([('a.weight', sd['fc.weight']), ('b.weight', sd['fc.weight'] * 2)])
    return zip_with(d, 'prefix.pth', state=state)


@case('wrapper-prefix-collision', 'values', 'fc.weight')
def _(d):
    state = OrderedDict(('module.' + k, v) for k, v in good_state().items())
    state['fc.weight'] = good_state()['fc.weight']
    return zip_with(d, 'wrapcoll.pth', state=state)


@case('sparse-trusted', 'values', 'fc.weight', source=dict(trust_checkpoint=True))
def _(d):
    sd = good_state()
    sd['fc.weight'] = sd['fc.weight'].to_sparse()
    path = _p(d, 'sparse.pth')
    torch.save({'state_dict': sd}, path)
    return path


@case('meta-tensor-trusted', 'values', 'fc.bias', source=dict(trust_checkpoint=True))
def _(d):
    sd = good_state()
    sd['fc.bias'] = torch.empty(3, device='meta')
    path = _p(d, 'metadev.pth')
    torch.save({'state_dict': sd}, path)
    return path


def _torch_saved(name, transform, key):
    @case(name, 'values', key)
    def build(d):
        sd = good_state()
        sd['fc.weight'] = transform(sd['fc.weight'])
        path = _p(d, name + '.pth')
        torch.save({'state_dict': sd}, path)
        return path


_torch_saved('sparse-untrusted', lambda t: t.to_sparse(), '_rebuild_sparse_tensor')
_torch_saved('meta-untrusted', lambda t: torch.empty(3, 4, device='meta'),
             '_rebuild_meta_tensor_no_storage')
_torch_saved('quantized-untrusted', lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
             '_rebuild_qtensor')
_torch_saved('nested-untrusted', lambda t: torch.nested.nested_tensor([t, t]), 'nested')


@case('tensor-with-backward-hooks', 'values', 'fc.bias')
def _(d):
    def expr(ck):
        t = ck.tensor(good_state()['fc.bias'])
        return Call(G('torch._utils', '_rebuild_tensor_v2'), (
            Persistent(('storage', G('torch', 'FloatStorage'), t.key, 'cpu', 3)), 0, (3, ), (1, ),
            False, OD([('h', 1)])))
    return with_tensor('fc.bias', expr)(d, 'hooks.pth')


@case('storage-named-twice-differently', 'values', 'bn.bias')
def _(d):
    def expr(ck):
        return T('0', 'DoubleStorage', 1, (3, ))
    return with_tensor('bn.bias', expr)(d, 'twice.pth')


@case('storage-member-missing', 'values', 'fc.bias')
def _(d):
    return with_tensor('fc.bias', lambda ck: T('nothere', 'FloatStorage', 3, (3, )))(
        d, 'nomember.pth')


@case('storage-key-traversal', 'values', 'fc.bias')
def _(d):
    return with_tensor('fc.bias', lambda ck: T('../../etc/passwd', 'FloatStorage', 3, (3, )))(
        d, 'keytrav.pth')


@case('persistent-id-not-storage', 'values', 'persistent_load')
def _(d):
    return with_tensor('fc.bias', lambda ck: Call(G('torch._utils', '_rebuild_tensor_v2'), (
        Persistent(('module', 1, 2, 3, 4)), 0, (3, ), (1, ), False, OD())))(d, 'pid.pth')


@case('non-string-key', 'values', '5')
def _(d):
    state = good_state()
    state[5] = torch.zeros(1)
    return zip_with(d, 'intkey.pth', state=state)


@case('string-metadata-version', 'values', "'fc'",
      )
def _(d):
    return zip_with(d, 'mdstr.pth', metadata={'fc': {'version': 'two'}})


@case('metadata-not-a-mapping', 'values', '_metadata')
def _(d):
    return zip_with(d, 'mdlist.pth', metadata=[1, 2])


@case('not-a-dict', 'values')
def _(d):
    return zip_with(d, 'list.pth', top=[1, 2, 3])


# ================================================================ zip structure
def _good_zip_bytes(d) -> bytes:
    path = zip_with(d, 'good.tmp')
    data = open(path, 'rb').read()
    os.unlink(path)
    return data


def _bytes_case(name, family, fn, key=None, suffix='.pth', **kw):
    @case(name, family, key, **kw)
    def build(d):
        path = _p(d, name + suffix)
        with open(path, 'wb') as f:
            f.write(fn(d))
        return path


for _i, _frac in enumerate([0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
                            0.75, 0.8, 0.85, 0.9, 0.93, 0.96, 0.98, 0.995]):
    _bytes_case(f'zip-truncated-{_i:02d}', 'zip',
                lambda d, f=_frac: (lambda b: b[:int(len(b) * f)])(_good_zip_bytes(d)))


def _central(data: bytes) -> List[int]:
    out, i = [], data.find(b'PK\x01\x02')
    while i >= 0:
        out.append(i)
        i = data.find(b'PK\x01\x02', i + 4)
    return out


def _edit(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


_bytes_case('zip-eocd-directory-offset-wrong', 'zip', lambda d: (lambda b: _edit(
    b, b.rfind(b'PK\x06\x06') + 48, struct.pack('<Q', 7)))(_good_zip_bytes(d)))
_bytes_case('zip-local-name-mismatch', 'zip', lambda d: (lambda b: _edit(
    b, b.find(b'data.pkl'), b'DATA.PKL'))(_good_zip_bytes(d)), 'local header')
_bytes_case('zip-member-size-too-large', 'zip', lambda d: (lambda b: _edit(
    _edit(b, _central(b)[1] + 20, struct.pack('<I', 10**8)), _central(b)[1] + 24,
    struct.pack('<I', 10**8)))(_good_zip_bytes(d)), 'run past')
def _grow_first(b: bytes) -> bytes:
    at = _central(b)[0]
    size = struct.unpack('<I', b[at + 24:at + 28])[0] + 64
    return _edit(_edit(b, at + 20, struct.pack('<I', size)), at + 24, struct.pack('<I', size))


_bytes_case('zip-members-overlap', 'zip', lambda d: _grow_first(_good_zip_bytes(d)), 'overlap')
_bytes_case('zip-encrypted-flag', 'zip', lambda d: (lambda b: _edit(
    b, _central(b)[1] + 8, struct.pack('<H', 1)))(_good_zip_bytes(d)), 'encrypted')
_bytes_case('zip-compression-method-lie', 'zip', lambda d: (lambda b: _edit(
    b, _central(b)[1] + 10, struct.pack('<H', 8)))(_good_zip_bytes(d)), 'compressed')
_bytes_case('random-bytes', 'zip', lambda d: bytes((i * 7919 + 13) % 251 for i in range(4096)))
_bytes_case('zip-magic-then-garbage', 'zip', lambda d: b'PK\x03\x04' + b'\x00' * 200)
_bytes_case('text-file', 'zip', lambda d: b'hello, I am not a checkpoint\n' * 10)


def _zip_names(d, name, names, data_pkl=None):
    path = _p(d, name)
    pkl = data_pkl or pickle_bytes({'state_dict': {}})
    with zipfile.ZipFile(path, 'w') as z:
        for n in names:
            z.writestr(n, pkl if n.endswith('data.pkl') else b'little')
    return path


for _n, _names, _key in [
        ('zip-path-traversal', ['../evil/data.pkl'], '../evil/data.pkl'),
        ('zip-absolute-name', ['/tmp/evil/data.pkl'], '/tmp/evil/data.pkl'),
        ('zip-backslash-name', ['a\\..\\x/data.pkl'], 'data.pkl'),
        ('zip-dot-component', ['a/./data.pkl'], 'a/./data.pkl'),
        ('zip-two-archives', ['a/data.pkl', 'b/data.pkl'], 'data.pkl'),
        ('zip-stray-member', ['a/data.pkl', 'b/other'], 'b/other'),
        ('zip-no-data-pkl', ['a/version'], 'data.pkl'),
        ('zip-byteorder-garbage', ['a/data.pkl', 'a/byteorder'], 'byteorder')]:
    def _mk(d, n=_n, names=_names):
        if n == 'zip-byteorder-garbage':
            path = _p(d, n + '.pth')
            with zipfile.ZipFile(path, 'w') as z:
                z.writestr('a/data.pkl', pickle_bytes({'state_dict': {}}))
                z.writestr('a/byteorder', b'middle')
            return path
        return _zip_names(d, n + '.pth', names)
    CASES.append(Case(_n, 'zip', _mk, _key, promise=_PROMISES['zip']))


@case('zip-duplicate-names', 'zip', 'repeated')
def _(d):
    import warnings
    path = _p(d, 'dup.pth')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('a/data.pkl', pickle_bytes({'state_dict': {}}))
            z.writestr('a/data.pkl', pickle_bytes({'state_dict': {}}))
    return path


@case('empty-file', 'zip', 'empty')
def _(d):
    open(_p(d, 'empty.pth'), 'wb').close()
    return _p(d, 'empty.pth')


@case('directory', 'zip', 'directory')
def _(d):
    os.makedirs(_p(d, 'dir.pth'), exist_ok=True)
    return _p(d, 'dir.pth')


@case('missing-file', 'zip', 'no such file')
def _(d):
    return _p(d, 'missing.pth')


@case('ok-base', 'control', expect='ok')
def _(d):
    return zip_with(d, 'good.pth')


@case('ok-numpy-and-runner-meta', 'control', expect='ok')
def _(d):
    scalar = Call(G('numpy.core.multiarray', 'scalar'), (_np_dtype('i8'), struct.pack('<q', 3)))
    arr = Build(Call(G('numpy.core.multiarray', '_reconstruct'), (G('numpy', 'ndarray'), (0, ),
                                                                   b'b')),
                (1, (2, ), Build(Call(G('numpy', 'dtype'), ('f8', False, True)),
                                 (3, '<', None, None, None, -1, -1, 0)), False,
                 struct.pack('<2d', 1.0, 2.0)))
    return zip_with(d, 'runner_meta.pth', meta={'seed': scalar, 'arr': arr, 'epoch': 2,
                                                'classes': ('car', 'ped'),
                                                'cfg': 'model = dict()'})


# ================================================================ old format
def _good_legacy_bytes(d) -> bytes:
    path = legacy_with(d, 'legacy.tmp')
    data = open(path, 'rb').read()
    os.unlink(path)
    return data


for _i, _frac in enumerate([0.01, 0.03, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95, 0.99]):
    _bytes_case(f'legacy-truncated-{_i:02d}', 'legacy',
                lambda d, f=_frac: (lambda b: b[:int(len(b) * f)])(_good_legacy_bytes(d)))


@case('ok-legacy', 'control', expect='ok')
def _(d):
    return legacy_with(d, 'legacy_good.pth')


@case('legacy-bad-magic', 'legacy', 'magic')
def _(d):
    return write_legacy(_p(d, 'magic.pth'), pickle_bytes({}), {}, {},
                        head=[pickle_bytes(12345)])


@case('legacy-bad-protocol', 'legacy', 'protocol')
def _(d):
    return write_legacy(_p(d, 'proto.pth'), pickle_bytes({}), {}, {}, head=[
        pickle_bytes(torch.serialization.MAGIC_NUMBER), pickle_bytes(7)])


@case('legacy-big-endian', 'legacy', 'byte order')
def _(d):
    return write_legacy(_p(d, 'bigendian.pth'), pickle_bytes({}), {}, {}, head=[
        pickle_bytes(torch.serialization.MAGIC_NUMBER),
        pickle_bytes(torch.serialization.PROTOCOL_VERSION),
        pickle_bytes({'little_endian': False})])


@case('legacy-module-id', 'legacy', 'persistent_load')
def _(d):
    obj = {'state_dict': {'fc.weight': Persistent(('module', 'x', 'y', 'z'))}}
    return write_legacy(_p(d, 'module.pth'), pickle_bytes(obj), {}, {})


@case('legacy-storage-without-data', 'legacy', 'storage')
def _(d):
    t = good_state()['fc.bias']
    obj = {'state_dict': OD([('fc.bias', legacy_tensor(t, '0'))])}
    return write_legacy(_p(d, 'nodata.pth'), pickle_bytes(obj), {}, {}, keys=[])


@case('legacy-numel-lie', 'legacy', 'storage')
def _(d):
    t = good_state()['fc.bias']
    obj = {'state_dict': OD([('fc.bias', legacy_tensor(t, '0', numel=2**40))])}
    return write_legacy(_p(d, 'legnumel.pth'), pickle_bytes(obj),
                        {'0': t.numpy().tobytes()}, {'0': 4})


@case('legacy-count-header-lie', 'legacy', 'storage')
def _(d):
    t = good_state()['fc.bias']
    obj = {'state_dict': OD([('fc.bias', legacy_tensor(t, '0', numel=2**58))])}
    path = write_legacy(_p(d, 'legcount.pth'), pickle_bytes(obj), {}, {}, keys=[])
    with open(path, 'rb') as f:
        data = f.read()
    data = data[:-len(pickle_bytes([]))] + pickle_bytes(['0']) + struct.pack('<q', 2**58)
    with open(path, 'wb') as f:
        f.write(data + b'\x00' * 64)
    return path


@case('legacy-view-past-root', 'legacy', 'storage')
def _(d):
    t = good_state()['fc.bias']
    tensor = Call(G('torch._utils', '_rebuild_tensor_v2'), (
        Persistent(('storage', G('torch', 'FloatStorage'), '0', 'cpu', 3, ('v', 2, 5))), 0, (3, ),
        (1, ), False, OD()))
    return write_legacy(_p(d, 'legview.pth'), pickle_bytes({'state_dict': OD([('fc.bias',
                                                                            tensor)])}),
                        {'0': t.numpy().tobytes()}, {'0': 4})


@case('legacy-tar-format', 'legacy', 'tar')
def _(d):
    path = _p(d, 'old.tar.pth')
    with tarfile.open(path, 'w') as tar:
        info = tarfile.TarInfo('storages')
        info.size = 4
        tar.addfile(info, io.BytesIO(b'\x80\x02K\x00'))
    return path


# ================================================================ safetensors
def _st_bytes(header: Any, data: bytes = b'', raw_len: Optional[int] = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack('<Q', len(h) if raw_len is None else raw_len) + h + data


def _st_case(name, header, data=b'', key=None, raw_len=None):
    _bytes_case(name, 'safetensors', lambda d: _st_bytes(header, data, raw_len), key,
                suffix='.safetensors')


_F = {'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 12]}
_st_case('st-header-longer-than-file', {'fc.bias': _F}, b'\x00' * 12, raw_len=10**6)
_st_case('st-header-length-huge', {'fc.bias': _F}, b'\x00' * 12, raw_len=2**63)
_st_case('st-header-not-json', b'{not json', b'')
_st_case('st-offsets-past-end', {'fc.bias': _F}, b'\x00' * 4)
_st_case('st-offsets-overlap', {'fc.bias': _F, 'bn.bias': _F}, b'\x00' * 12)
_st_case('st-shape-size-mismatch', {'fc.bias': dict(_F, shape=[30])}, b'\x00' * 12)
_st_case('st-unknown-dtype', {'fc.bias': dict(_F, dtype='X9')}, b'\x00' * 12)
_st_case('st-module-versions-not-json', {'fc.bias': _F, '__metadata__': {
    'module_versions': '{bad'}}, b'\x00' * 12, 'module_versions')
_st_case('st-module-versions-string', {'fc.bias': _F, '__metadata__': {
    'module_versions': '{"fc": "two"}'}}, b'\x00' * 12, 'module_versions')


@case('ok-safetensors', 'control', expect='ok')
def _(d):
    from safetensors.torch import save_file
    path = _p(d, 'good.safetensors')
    save_file(dict(good_state()), path, metadata={'module_versions': '{"bn": 2}'})
    return path


# ================================================================ bounded work (hash/amplification)
def _keyed(key: Any, value: Any = 1) -> Raw:
    """A dict ``{key: value}`` whose key is an expression (not hashed while building)."""
    return Raw(b'}(' + pickle_bytes(key)[2:-1] + pickle_bytes(value)[2:-1] + b'u')


def _deep_tuple(depth: int) -> Raw:
    return Raw(b'N' + b'\x85' * depth)


def _shared_tuple(levels: int, base: int = 0) -> Put:
    """A tuple of ``levels`` shared levels (2**levels leaves when hashed or printed)."""
    expr: Any = Put(('x', 'x'), base)
    for i in range(1, levels):
        expr = Put((expr, Get(base + i - 1)), base + i)
    return expr


def _memo_calls(func: G, arg: Any, times: int, extra: Tuple = ()) -> Raw:
    """``[func(arg), func(arg)...]`` with ``func`` and ``arg`` memoized: each call costs
    a few bytes of the file."""
    first = Call(Put(func, 900), (Put(arg, 901), ) + extra)
    rest = Call(Get(900), (Get(901), ) + extra)
    return Raw(pickle_bytes([first] + [rest] * times)[2:-1])


_MODULUS = (1 << 61) - 1


def _colliding_ints(n: int) -> Raw:
    return Raw(b'}(' + b''.join(pickle_bytes(k * _MODULUS)[2:-1] + b'N'
                                for k in range(1, n + 1)) + b'u')


_BIG_LIST = Raw(b']' + b'(' + b'K\x00' * 250_000 + b'e')
for _name, _key, _meta in [
        ('deep-tuple-dict-key', 'dict key', _keyed(_deep_tuple(450_000))),
        ('deep-tuple-set-item', 'set item', Call(G('builtins', 'set'), ([_deep_tuple(450_000)], ))),
        ('shared-tuple-dict-key', 'dict key', _keyed(_shared_tuple(40))),
        ('shared-tuple-frozenset-item', 'set item',
         Call(G('builtins', 'frozenset'), ([_shared_tuple(40)], ))),
        ('shared-tuple-od-key', 'dict key', Call(G('collections', 'OrderedDict'),
                                                 ([(_shared_tuple(40), 1)], ))),
        ('colliding-int-keys-20k', 'dict key', _colliding_ints(20_000)),
        ('colliding-int-keys-60k', 'dict key', _colliding_ints(60_000)),
        ('colliding-int-set-items', 'set item', Call(G('builtins', 'set'), (
            [k * _MODULUS for k in range(1, 5000)], ))),
        ('float-dict-key', 'dict key', _keyed(1.5)),
        ('huge-int-dict-key', 'dict key', _keyed(1 << 200)),
        ('frozenset-dict-key', 'dict key', _keyed(Call(G('builtins', 'frozenset'), ([1], )))),
        ('long-tuple-dict-key', 'dict key', _keyed(tuple(range(65)))),
        ('nested-tuple-dict-key', 'dict key', _keyed((('a', 1), 2))),
        ('set-of-memoized-list', 'steps', _memo_calls(G('builtins', 'set'), _BIG_LIST, 60_000)),
        ('frozenset-of-memoized-list', 'steps',
         _memo_calls(G('builtins', 'frozenset'), _BIG_LIST, 60_000)),
        ('deque-of-memoized-list', 'steps',
         _memo_calls(G('collections', 'deque'), _BIG_LIST, 60_000)),
        ('od-of-memoized-pairs', 'steps', _memo_calls(
            G('collections', 'OrderedDict'),
            Raw(pickle_bytes([Put((0, None), 902)] + [Get(902)] * 60_000)[2:-1]), 60_000)),
        ('codecs-encode-memoized', 'bytes', _memo_calls(G('_codecs', 'encode'), 'a' * (1 << 20),
                                                        1500, ('latin1', ))),
]:
    case(_name, 'bounds', _key)(lambda d, n=_name, m=_meta: zip_with(d, n + '.pth',
                                                                      meta={'a': m}))


@case('numpy-rebuild-memoized', 'bounds', 'bytes')
def _(d):
    """One 1 MiB bytes rebuilt into 1,500 numpy arrays: the copies count as bytes."""
    raw = Put(Call(G('_codecs', 'encode'), ('\x00' * (1 << 20), 'latin1')), 950)
    dtype = Put(Build(Call(G('numpy', 'dtype'), ('u1', False, True)),
                      (3, '|', None, None, None, -1, -1, 0)), 951)

    def arr(first):
        state = (1, (1 << 20, ), dtype if first else Get(951), False, raw if first else Get(950))
        return Build(Call(G('numpy.core.multiarray', '_reconstruct'),
                          (G('numpy', 'ndarray'), (0, ), b'b')), state)
    return zip_with(d, 'np_memo.pth', meta={'a': [arr(True)] + [arr(False)] * 1500})


@case('ok-shared-tuple-version', 'control', expect='ok')
def _(d):
    """A tuple of 40 shared levels as the top-level ``version`` (str() of it hung): loads."""
    return zip_with(d, 'version_tuple.pth', extra={'version': _shared_tuple(40)})


@case('ok-flat-keys', 'control', expect='ok')
def _(d):
    """Keys a checkpoint has: strings, small ints (optimizer state), flat tuples."""
    return zip_with(d, 'flat_keys.pth', extra={'optimizer': {'state': {0: {'step': 3},
                                                                        1: {'step': 3}},
                                                              ('layer', 1): 'x', b'raw': None}})


@case('legacy-shared-tuple-dict-key', 'bounds', 'dict key')
def _(d):
    return legacy_with(d, 'legacy_key.pth', {'a': _keyed(_shared_tuple(40))})


# ================================================================ storage-level messages
def _zeros3(ck: Checkpoint) -> str:
    return ck.tensor(torch.zeros(3)).key


for _name, _size, _stride in [('size-beyond-int64', (0, 1 << 64), (1, 1)),
                              ('stride-beyond-int64', (0, 3), (1 << 70, 1)),
                              ('stride-at-int64', (3, ), (1 << 63, )),
                              ('size-product-overflows', (1 << 40, 1 << 40), (0, 0))]:
    case(_name, 'messages', 'fc.bias')(
        lambda d, n=_name, sz=_size, st=_stride: with_tensor(
            'fc.bias', lambda ck: T(_zeros3(ck), 'FloatStorage', 3, sz, st))(d, n + '.pth'))


@case('legacy-stride-beyond-int64', 'messages', 'fc.bias')
def _(d):
    sd = good_state()
    storages, elem, items = {}, {}, []
    for i, (k, v) in enumerate(sd.items()):
        storages[str(i)] = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        elem[str(i)] = v.element_size()
        items.append((k, legacy_tensor(v, str(i), size=(0, 3), stride=(1 << 70, 1))
                      if k == 'fc.bias' else legacy_tensor(v, str(i))))
    return write_legacy(_p(d, 'legacy_stride.pth'), pickle_bytes({'state_dict': OD(items)}),
                        storages, elem)


# ================================================================ every safetensors dtype
def _st_state(key: str, dtype: torch.dtype, values: Optional[torch.Tensor] = None):
    sd = OrderedDict((k, v.clone()) for k, v in good_state().items())
    sd[key] = (values if values is not None else sd[key]).to(dtype) if dtype != torch.uint64 \
        or values is None else values.view(torch.uint64)
    return sd


def _st_dtype_case(name, key, dtype, expect, values=None, promise=''):
    @case(name, 'dtype', None if expect == 'ok' else key, expect=expect, promise=promise)
    def build(d):
        from safetensors.torch import save_file
        path = _p(d, name + '.safetensors')
        save_file(dict(_st_state(key, dtype, values)), path)
        return path


def _safetensors_dtypes():
    from safetensors.torch import _TYPES
    return sorted(_TYPES.items())


for _st_name, _dt in _safetensors_dtypes():
    _int = not _dt.is_floating_point and not _dt.is_complex and _dt != torch.bool
    _st_dtype_case(f'st-dtype-{_st_name}-into-int32', 'count', _dt, 'ok' if _int else 'error')
    _st_dtype_case(f'st-dtype-{_st_name}-into-float32', 'fc.bias', _dt,
                   'ok' if _dt.is_floating_point else 'error')
    if _dt.is_floating_point:
        _st_dtype_case(f'st-dtype-{_st_name}-nan', 'fc.bias', _dt, 'error',
                       torch.tensor([0.5, float('nan'), 2.5]))
_st_dtype_case('st-dtype-U64-past-int64', 'count', torch.uint64, 'error',
               torch.tensor([-1, 4], dtype=torch.int64),
               promise='uint64 of 2**64-1 is refused by key, not wrapped to -1')
_st_dtype_case('st-dtype-U32-past-int32', 'count', torch.uint32, 'error',
               torch.tensor([1 << 31, 4], dtype=torch.int64),
               promise='uint32 2**31 does not fit int32: refused by key')


# ================================================================ files changed while read
def _replace_with(make: Callable[[str], None]) -> Callable[[str], None]:
    def during(path: str) -> None:
        tmp = path + '.other'
        make(tmp)
        os.replace(tmp, path)
    return during


def _write_other(path: str) -> None:
    torch.save({'state_dict': OrderedDict((k, torch.zeros_like(v))
                                          for k, v in good_state().items())}, path)


def _truncate(n: Optional[int]) -> Callable[[str], None]:
    def during(path: str) -> None:
        os.truncate(path, os.path.getsize(path) // 2 if n is None else n)
    return during


def _rewrite_in_place(path: str) -> None:
    """The same bytes with every float replaced by NaN bytes, written over the file."""
    with open(path, 'r+b') as f:
        data = bytearray(f.read())
        f.seek(0)
        f.write(bytes(data[:len(data) // 2]) + b'\xff' * (len(data) - len(data) // 2))


def _append(path: str) -> None:
    with open(path, 'ab') as f:
        f.write(b'\x00' * 64)


_CHANGES = [
    ('replaced', _replace_with(_write_other), 'ok',
     'replaced by rename while read: the file opened is read whole'),
    ('unlinked', os.unlink, 'ok', 'unlinked while read: the file opened is read whole'),
    ('truncated-empty', _truncate(0), 'error', ''),
    ('truncated-half', _truncate(None), 'error', ''),
    ('truncated-header', _truncate(100), 'error', ''),
    ('rewritten-in-place', _rewrite_in_place, 'error', ''),
    ('appended', _append, 'error', ''),
]


def _safetensors_good(d: str, name: str) -> str:
    from safetensors.torch import save_file
    path = _p(d, name + '.safetensors')
    save_file(dict(good_state()), path)
    return path


for _fmt_name, _make in [('zip', lambda d, n: zip_with(d, n + '.pth')),
                         ('legacy', lambda d, n: legacy_with(d, n + '.pth')),
                         ('st', _safetensors_good)]:
    for _chg, _fn, _expect, _promise in _CHANGES:
        case(f'during-{_fmt_name}-{_chg}', 'snapshot',
             None if _expect == 'ok' else 'changed while being read', expect=_expect,
             during=_fn, promise=_promise)(lambda d, m=_make, n=f'{_fmt_name}-{_chg}': m(d, n))


def by_name() -> Dict[str, Case]:
    out = {}
    for c in CASES:
        assert c.name not in out, c.name
        out[c.name] = c
    return out
