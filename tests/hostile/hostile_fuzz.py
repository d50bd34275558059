"""Property-based fuzzing of the reader and the planner (run in a child by test_fuzz.py).

Three properties, each over a bounded, derandomized set of examples:

* ``bytes``: a good zip / old-format / safetensors checkpoint with a few bytes flipped,
  set, inserted, deleted or cut off either loads or raises ``FusionLoadError`` naming
  the file, with the model bit-identical; nothing else ever escapes;
* ``pickles``: random object trees built from admitted and refused globals, tensors
  with random geometry and literals, put into a checkpoint's ``meta`` or in place of
  a tensor: the same promise;
* ``planner``: random but well-formed checkpoints (missing, extra and misshapen keys,
  every dtype, NaN/Inf, values out of an integer target's range) and source options:
  a load either raises with the model unchanged, or writes exactly the checkpoint's
  values (cast into the model's dtype without loss, finite unless allowed).

Every example also checks that no marker file appeared and that argparse, MMEngine
and a canary tensor are intact.
"""
import os.path as osp
import sys
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, HERE)

from hostile_cases import HostileTiny, good_state, legacy_with, marker, zip_with  # noqa: E402
from hostile_child import World, same, snapshot  # noqa: E402
from hostile_pickles import (OD, Build, Call, Checkpoint, G, New, T, pickle_bytes,  # noqa: E402
                             write_zip)

import mmfusionload  # noqa: E402,F401
from mmfusionload import FusionLoadError, load_sources  # noqa: E402

EXAMPLES = dict(bytes=150, pickles=150, planner=100)
WORK = tempfile.mkdtemp(prefix='mmfl_fuzz_')
WORLD = World(WORK)


def _safetensors(d: str) -> str:
    from safetensors.torch import save_file
    path = osp.join(d, 'good.safetensors')
    save_file(dict(good_state()), path)
    return path


GOOD = {}
for _name, _fn in (('zip', lambda d: zip_with(d, 'good.pth')),
                   ('legacy', lambda d: legacy_with(d, 'good_legacy.pth')),
                   ('safetensors', _safetensors)):
    with open(_fn(WORK), 'rb') as _f:
        GOOD[_name] = _f.read()
_COUNT = [0]


def _path(suffix: str) -> str:
    _COUNT[0] += 1
    return osp.join(WORK, f'case{_COUNT[0]}{suffix}')


def promise(path: str, **options) -> None:
    """Load ``path``: a FusionLoadError naming it with the model unchanged, or a load."""
    model = HostileTiny()
    snap = snapshot(model)
    try:
        load_sources(model, [dict(options, checkpoint=path)], logger=None)
    except FusionLoadError as e:
        assert path in str(e), str(e)[:300]
        assert same(model, snap), 'the model changed after an error'
    bad = WORLD.violations(marker(WORK))
    assert not bad, bad


# ----------------------------------------------------------------- bytes
_EDITS = st.lists(st.tuples(st.sampled_from(['flip', 'set', 'insert', 'delete', 'cut']),
                            st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                  min_size=1, max_size=4)


@settings(max_examples=EXAMPLES['bytes'], deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(GOOD)), _EDITS)
def fuzz_bytes(kind, edits):
    data = bytearray(GOOD[kind])
    for op, where, value in edits:
        i = int(where * len(data))
        if op == 'flip':
            data[i] ^= 1 << (value % 8)
        elif op == 'set':
            data[i] = value
        elif op == 'insert':
            data[i:i] = bytes([value]) * (1 + value % 9)
        elif op == 'delete':
            del data[i:i + 1 + value % 9]
        else:
            del data[i:]
        if not data:
            data = bytearray(b'\x00')
    path = _path('.safetensors' if kind == 'safetensors' else '.pth')
    with open(path, 'wb') as f:
        f.write(bytes(data))
    promise(path)


# ----------------------------------------------------------------- pickles
_GLOBALS = [G(m, n) for m, n in [
    ('collections', 'OrderedDict'), ('collections', 'deque'), ('builtins', 'set'),
    ('builtins', 'frozenset'), ('builtins', 'getattr'), ('_codecs', 'encode'),
    ('torch', 'Size'), ('torch', 'device'), ('torch', 'Tensor'), ('torch', 'float32'),
    ('torch', 'FloatStorage'), ('torch._utils', '_rebuild_tensor_v2'),
    ('torch._utils', '_rebuild_parameter'), ('torch._utils', '_rebuild_parameter_with_state'),
    ('torch._tensor', '_rebuild_from_type_v2'), ('mmengine.logging.history_buffer',
                                                 'HistoryBuffer'),
    ('numpy', 'dtype'), ('numpy', 'ndarray'), ('numpy.core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('argparse', 'Namespace'), ('datetime', 'datetime'),
    ('builtins', 'range'), ('builtins', 'bytearray'), ('posix', 'system'),
    ('builtins', 'eval'), ('collections', 'Counter'), ('torch', 'load')]]
_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=16), st.sampled_from(_GLOBALS),
    st.builds(lambda key, n, size, stride, off: T(key, 'FloatStorage', n, size, stride, off),
              st.sampled_from(['0', '1', 'z', 'nothere']), st.integers(0, 2**40),
              st.lists(st.integers(0, 2**20), max_size=3).map(tuple),
              st.lists(st.integers(0, 2**20), max_size=3).map(tuple),
              st.integers(0, 2**40)))


def _extend(children):
    return st.one_of(
        st.lists(children, max_size=4), st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
        st.builds(lambda f, a: Call(f, tuple(a)), st.one_of(st.sampled_from(_GLOBALS), children),
                  st.lists(children, max_size=3)),
        st.builds(lambda c, a: New(c, tuple(a)), st.one_of(st.sampled_from(_GLOBALS), children),
                  st.lists(children, max_size=2)),
        st.builds(Build, children, children),
        st.builds(lambda items: OD(items), st.lists(st.tuples(st.text(max_size=4), children),
                                                    max_size=3)))


_TREE = st.recursive(_LEAF, _extend, max_leaves=12)


@settings(max_examples=EXAMPLES['pickles'], deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(_TREE, st.sampled_from(['meta', 'fc.weight', 'top']))
def fuzz_pickles(tree, where):
    ck = Checkpoint(None)
    items = []
    for k, v in good_state().items():
        items.append((k, tree if where == k else ck.tensor(v)))
    ck.storages.setdefault('z', b'\x00' * 4)
    obj = tree if where == 'top' else {'state_dict': OD(items),
                                       'meta': tree if where == 'meta' else {}}
    path = _path('.pth')
    try:
        blob = pickle_bytes(obj)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return  # a tree the assembler cannot write
    write_zip(path, blob, ck.storages)
    promise(path)


# ----------------------------------------------------------------- planner
_DTYPES = [torch.float16, torch.float32, torch.float64, torch.int32, torch.int64, torch.bool,
           torch.complex64]
_SPECIAL = [0.5, -3.0, float('nan'), float('inf'), 1e300, 1e5, 2.0**40 + 5, -2.0**40, 7.0]


@st.composite
def _state(draw):
    sd = {}
    for k, v in good_state().items():
        choice = draw(st.sampled_from(['keep', 'keep', 'drop', 'dtype', 'value', 'shape']))
        if choice == 'drop':
            continue
        t = v.clone()
        if choice in ('dtype', 'value'):
            t = t.to(draw(st.sampled_from(_DTYPES)))
        if choice == 'value' and t.numel():
            x = draw(st.sampled_from(_SPECIAL))
            try:
                t.reshape(-1)[0] = x
            except (RuntimeError, OverflowError):
                pass
        if choice == 'shape':
            t = torch.zeros(tuple(s + 1 for s in t.shape) or (2, ), dtype=t.dtype)
        sd[k] = t
    for extra in draw(st.lists(st.sampled_from(['fc.extra', 'bn.extra', 'other.w']),
                               max_size=2, unique=True)):
        sd[extra] = torch.ones(2)
    return sd


@settings(max_examples=EXAMPLES['planner'], deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(_state(), st.sampled_from([True, False, 'all']), st.booleans(),
       st.sampled_from(['auto', {'': ''}, {'fc.': 'fc.', 'bn.': 'bn.'}]))
def fuzz_planner(sd, strict, allow_nonfinite, prefix):
    path = _path('.pth')
    torch.save({'state_dict': sd}, path)
    model = HostileTiny()
    snap = snapshot(model)
    try:
        report = load_sources(model, [dict(checkpoint=path, strict=strict, prefix=prefix,
                                           allow_nonfinite=allow_nonfinite)], logger=None)
    except FusionLoadError as e:
        assert path in str(e), str(e)[:300]
        assert same(model, snap), 'the model changed after an error'
        return
    got = model.state_dict()
    for key in report.sources[0].loaded:
        src, dst = sd[key], got[key]
        back = dst.to(src.dtype)
        assert torch.equal(back, src) or (allow_nonfinite and src.is_floating_point() and
                                          torch.equal(back.isnan(), src.isnan())), key
        if not allow_nonfinite and dst.is_floating_point():
            assert bool(torch.isfinite(dst).all()), key
    assert not WORLD.violations(marker(WORK))


def main() -> int:
    torch.set_num_threads(1)
    for fn in (fuzz_bytes, fuzz_pickles, fuzz_planner):
        fn()
        print(f'{fn.__name__}: {EXAMPLES[fn.__name__[5:]]} examples passed', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
