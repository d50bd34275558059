"""What convert and merge write: plain bounded metadata, no temporary file left behind."""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmfusionload.files.writer import META_NODES, atomic_write, plain_metadata

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_plain_metadata_is_bounded_and_plain():
    shared = ['x']
    for _ in range(60):  # 2**60 leaves when expanded; a json.dumps of it never ends
        shared = [shared, shared]
    notes = []
    t0 = time.perf_counter()
    out = plain_metadata({'laughs': shared, 'epoch': np.int64(3), 'lr': np.float32(0.5),
                          'inf': float('inf'), 'obj': object(), 'cfg': 'x' * 10,
                          'nested': {'a': [1, 2.5, None, True]}, 3: 'non-string key'}, notes)
    assert time.perf_counter() - t0 < 1.0
    assert out == {'epoch': 3, 'lr': 0.5, 'inf': 'inf', 'cfg': 'x' * 10,
                   'nested': {'a': [1, 2.5, None, True]}}
    assert type(out['epoch']) is int and type(out['lr']) is float
    assert any("'laughs'" in n and str(META_NODES) in n for n in notes), notes
    assert any("'obj'" in n and 'object' in n for n in notes), notes


_CHILD = r'''
import os, signal, sys
from mmfusionload.files.writer import atomic_write
def writer(tmp):
    with open(tmp, 'wb') as f:
        f.write(b'partial')
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
atomic_write(sys.argv[1], writer)
'''


def test_temporary_file_removed_on_signal(tmp_path):
    for sig in ('SIGTERM', 'SIGINT'):
        dst = tmp_path / f'out_{sig}.pth'
        proc = subprocess.run([sys.executable, '-c', _CHILD, str(dst), sig],
                              env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                              timeout=120)
        assert proc.returncode != 0
        assert not dst.exists() and not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process is untouched


def test_temporary_file_removed_on_error(tmp_path):
    dst = str(tmp_path / 'out.pth')

    def writer(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise ValueError('disk full')

    with pytest.raises(ValueError, match='disk full'):
        atomic_write(dst, writer)
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_the_file_whole(tmp_path):
    dst = tmp_path / 'out.pth'
    dst.write_bytes(b'old contents')
    os.chmod(dst, 0o640)

    def writer(tmp):
        assert osp.dirname(tmp) == str(tmp_path) and tmp != str(dst)
        assert dst.read_bytes() == b'old contents'  # the old file stays until the end
        with open(tmp, 'wb') as f:
            f.write(b'new contents')

    atomic_write(str(dst), writer)
    assert dst.read_bytes() == b'new contents'
    assert os.stat(dst).st_mode & 0o777 == 0o640  # the replaced file's permissions
    assert os.listdir(tmp_path) == ['out.pth']
