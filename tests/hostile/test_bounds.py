"""Work bounded by the file's bytes: hash bombs and amplification through admitted calls.

Each pickle is a few hundred KB at most; before the budget charged what admitted calls
make and checked dict keys, each took minutes, gigabytes or the process (SIGSEGV).
"""
import os
import os.path as osp
import subprocess
import sys
import time

import pytest

from mmfusionload.errors import describe
from mmfusionload.files.pickle_ops import KEY_INT_LIMIT, CheckpointValueError, check_key
from mmfusionload.files.safe_unpickle import Storages, unpickle

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
sys.path.insert(0, HERE)
from hostile_pickles import Call, G, Get, Put, Raw, pickle_bytes  # noqa: E402


def _deep_tuple(depth: int) -> Raw:
    return Raw(b'N' + b'\x85' * depth)  # TUPLE1 on TUPLE1...: ((((None,),),),)


def _shared_tuple(levels: int) -> Put:
    """A tuple of ``levels`` shared levels: 2**levels leaves when walked or hashed."""
    expr = Put(('x', 'x'), 0)
    for i in range(1, levels):
        expr = Put((expr, Get(i - 1)), i)
    return expr


def keyed(key) -> Raw:
    """A dict ``{key: 1}`` (``key`` an expression, not hashed here)."""
    return Raw(b'}(' + pickle_bytes(key)[2:-1] + b'K\x01u')


def _bounded(data: bytes, match: str, seconds: float = 5.0) -> None:
    t0 = time.perf_counter()
    with pytest.raises(CheckpointValueError, match=match):
        unpickle(data, Storages())
    assert time.perf_counter() - t0 < seconds


def test_deep_tuple_as_a_dict_key_is_refused_without_hashing(tmp_path):
    """450,000 nested 1-tuples as a key: hashing it overflowed the C stack (SIGSEGV)."""
    code = ('import sys; sys.path.insert(0, %r)\n' % HERE +
            'from hostile_pickles import Raw, pickle_bytes\n'
            'from test_bounds import keyed\n'
            'from mmfusionload.files.safe_unpickle import Storages, unpickle\n'
            'data = pickle_bytes(keyed(Raw(b"N" + b"\\x85" * 450000)))\n'
            'try:\n    unpickle(data, Storages())\n'
            'except Exception as e:\n    print(type(e).__name__, str(e)[:200])\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0, proc.returncode
    assert proc.stdout.startswith('CheckpointValueError a dict key or set item that is a '
                                  'tuple holding a tuple'), proc.stdout


def test_shared_tuple_as_a_dict_key_is_refused():
    """A tuple of 40 shared levels hashes over 2**40 leaves (hours)."""
    data = pickle_bytes(keyed(_shared_tuple(40)))
    assert len(data) < 5000
    _bounded(data, 'tuple holding a tuple')


def test_ints_that_hash_alike_are_refused():
    """60,000 int keys ``k * (2**61 - 1)`` all hash to 0: quadratic inserts."""
    modulus = (1 << 61) - 1
    body = b''.join(pickle_bytes(k * modulus)[2:-1] + b'N' for k in range(1, 60001))
    data = pickle_bytes(Raw(b'}(' + body + b'u'))  # built here without a dict of them
    assert len(data) < 1_000_000
    _bounded(data, 'an int of 6[0-9] bits')
    # as set items too
    _bounded(pickle_bytes(Call(G('builtins', 'set'), ([k * modulus for k in range(1, 100)], ))),
             'an int of')


def test_set_of_a_memoized_list_is_charged_each_time():
    """``set()`` of one memoized 250k-item list 60,000 times (about 100 s before)."""
    big = Raw(b']' + b'(' + b'K\x00' * 250_000 + b'e')
    sets = [Put(Call(Put(G('builtins', 'set'), 2), (Put(big, 0), )), 1)] + \
        [Call(Get(2), (Get(0), ))] * 60_000
    data = pickle_bytes(sets)
    assert len(data) < 1_000_000
    _bounded(data, 'steps')
    for name in (('builtins', 'frozenset'), ('collections', 'deque')):
        data = pickle_bytes([Put(Call(Put(G(*name), 2), (Put(big, 0), )), 1)] +
                            [Call(Get(2), (Get(0), ))] * 60_000)
        _bounded(data, 'steps')


def test_codecs_encode_of_a_memoized_string_is_charged_in_bytes():
    """``_codecs.encode`` of one 1 MiB string 1,500 times: +1.5 GiB from a 1 MB file."""
    text = Put('a' * (1 << 20), 0)
    calls = [Call(Put(G('_codecs', 'encode'), 1), (text, Put('latin1', 2)))] + \
        [Call(Get(1), (Get(0), Get(2)))] * 1500
    data = pickle_bytes(calls)
    assert len(data) < 1_100_000
    _bounded(data, 'bytes')


def test_numpy_rebuilds_are_charged_in_bytes():
    """One 1 MiB ``bytes`` memoized, rebuilt into 1,500 numpy arrays."""
    raw = Put(Call(G('_codecs', 'encode'), ('\x00' * (1 << 20), 'latin1')), 0)
    dtype = Put(Call(G('numpy', 'dtype'), ('u1', False, True)), 1)
    from hostile_pickles import Build

    def arr(first):
        state = (1, (1 << 20, ), Build(dtype, (3, '|', None, None, None, -1, -1, 0))
                 if first else Get(1), False, raw if first else Get(0))
        return Build(Call(G('numpy.core.multiarray', '_reconstruct'),
                          (G('numpy', 'ndarray'), (0, ), b'b')), state)
    data = pickle_bytes([arr(True)] + [arr(False)] * 1500)
    assert len(data) < 1_300_000
    _bounded(data, 'bytes', seconds=20)


def test_keys_that_pass():
    """Strings, bytes, small ints, bools, None and flat tuples of them are keys."""
    for key in ('a', b'a', 0, -5, KEY_INT_LIMIT - 1, True, None, ('a', 1, None), ()):
        check_key(key, None)
    for key in (KEY_INT_LIMIT, 1.5, (('a', ), ), frozenset(), ('a', ) * 65, (1 << 61, )):
        with pytest.raises(CheckpointValueError):
            check_key(key, None)
    obj = unpickle(pickle_bytes({('layer', 1): 2, 7: 'x', 'k': Call(G('builtins', 'set'),
                                                                      ([1, 'a'], ))}),
                   Storages())
    assert obj == {('layer', 1): 2, 7: 'x', 'k': {1, 'a'}}


def test_describe_never_walks_what_the_file_built():
    deep = None
    for _ in range(450_000):
        deep = (deep, )
    shared = ('x', 'x')
    for _ in range(60):
        shared = (shared, shared)
    t0 = time.perf_counter()
    assert describe(deep) == '<tuple of 1 items>'
    assert describe(shared) == '<tuple of 2 items>'
    assert describe('a' * 10**6).endswith("'...") and len(describe('a' * 10**6)) < 80
    assert describe(1 << 1000) == '<int of 1001 bits>' and describe(-3) == '-3'
    assert time.perf_counter() - t0 < 0.5
    del deep
