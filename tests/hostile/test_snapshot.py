"""A file replaced, truncated or rewritten while it is read: one version or a
``FusionLoadError`` ("changed while being read"), never a signal, never bytes of two
versions in the model.

Deterministic triggers run the change at a chosen point of the read (right after
the zip directory was checked, or after the values were checked); a bounded
natural race runs a writer beside repeated loads. Each runs in a child process,
so a ``SIGBUS`` fails the test instead of ending the test run.
"""
import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))

_PRELUDE = r'''
import os, sys, torch, torch.nn as nn
from collections import OrderedDict
import mmfusionload.files.reader as reader
from mmfusionload import FusionLoadError, load_sources, read_checkpoint

def state(fill, n=1 << 16):
    return OrderedDict(w=torch.full((n, ), float(fill)), b=torch.full((4, ), float(fill)))

class M(nn.Module):
    def __init__(self, n=1 << 16):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))
        self.b = nn.Parameter(torch.zeros(4))

def save(obj, path):
    torch.save(obj, path)

def values(model):
    return sorted(set(model.w.detach().tolist()) | set(model.b.detach().tolist()))

path, other = sys.argv[1], sys.argv[1] + '.new'
save({'state_dict': state(1.0)}, path)
save({'state_dict': state(2.0)}, other)
real_members = reader.zip_members
'''


def _child(tmp_path, body: str, timeout: int = 120) -> str:
    code = _PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'latest.pth')],
                          env=dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS='ignore'),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    return proc.stdout


def test_replaced_by_rename_after_the_directory_check_loads_the_first_version(tmp_path):
    """``latest.pth`` replaced by ``os.replace`` between the zip directory check and the
    read of the tensors: the load reads the file it opened, whole."""
    out = _child(tmp_path, '''
        def members(f, size):
            got = real_members(f, size)
            os.replace(other, path)  # another file at the path, another layout
            return got
        reader.zip_members = members
        m = M()
        load_sources(m, [dict(checkpoint=path)], logger=None)
        print(values(m))
    ''')
    assert out.split('\n')[-2] == '[1.0]', out


@pytest.mark.parametrize('keep', [0, 2000, 70000])
def test_truncated_after_the_directory_check_fails_with_a_load_error(tmp_path, keep):
    """The file truncated (as ``torch.save`` to the same path does first) after the
    directory was checked: a ``FusionLoadError`` saying it changed, no ``SIGBUS``, the
    model bit-identical."""
    out = _child(tmp_path, f'''
        def members(f, size):
            got = real_members(f, size)
            os.truncate(path, {keep})
            return got
        reader.zip_members = members
        m = M()
        try:
            load_sources(m, [dict(checkpoint=path)], logger=None)
            print('loaded', values(m))
        except FusionLoadError as e:
            print('error', path in str(e), 'changed while being read' in str(e), values(m))
    ''')
    assert out.split('\n')[-2] == 'error True True [0.0]', out


def test_rewritten_in_place_after_the_directory_check_fails_with_a_load_error(tmp_path):
    """The same bytes rewritten in place with NaN after the directory check: the load
    fails (the file's time moved), nothing of either version reaches the model."""
    out = _child(tmp_path, '''
        save({'state_dict': state(float('nan'))}, other)
        def members(f, size):
            got = real_members(f, size)
            data = open(other, 'rb').read()
            with open(path, 'r+b') as g:  # in place: same inode, same size
                g.write(data)
            return got
        reader.zip_members = members
        m = M()
        try:
            load_sources(m, [dict(checkpoint=path)], logger=None)
            print('loaded', values(m))
        except FusionLoadError as e:
            print('error', 'changed while being read' in str(e), values(m))
    ''')
    assert out.split('\n')[-2] == 'error True [0.0]', out


def test_rewritten_after_the_value_check_keeps_the_checked_values(tmp_path):
    """A writer puts NaN into the file after the load checked the values and before it
    copies them: the model gets the values that were checked."""
    out = _child(tmp_path, '''
        import mmfusionload.load.pipeline as pipeline
        save({'state_dict': state(float('nan'))}, other)
        real_problem = pipeline.entry_problem
        done = []
        def problem(e, allow):
            got = real_problem(e, allow)
            if not done:
                done.append(1)
                data = open(other, 'rb').read()
                with open(path, 'r+b') as g:
                    g.write(data)
            return got
        pipeline.entry_problem = problem
        m = M()
        load_sources(m, [dict(checkpoint=path)], logger=None)
        print(values(m))
    ''')
    assert out.split('\n')[-2] == '[1.0]', out


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_natural_race_one_version_or_an_error(tmp_path, suffix):
    """A writer replaces, truncates and rewrites the file in a loop while a reader loads
    it for about two seconds: every load gives one version whole or fails with
    ``FusionLoadError``; the process gets no signal."""
    out = _child(tmp_path, f'''
        import threading, time
        from safetensors.torch import save_file
        suffix = {suffix!r}
        path = path[:-4] + suffix
        versions = []
        for i, fill in enumerate((1.0, 2.0, 3.0)):
            p = f'{{path}}.v{{i}}'
            if suffix == '.pth':
                save({{'state_dict': state(fill)}}, p)
            else:
                save_file(dict(state(fill)), p)
            versions.append(open(p, 'rb').read())
        open(path, 'wb').write(versions[0])
        stop = []
        def writer():
            i = 0
            while not stop:
                data = versions[i % 3]
                mode = i % 3
                if mode == 0:  # replaced by rename
                    tmp = path + '.tmp'
                    open(tmp, 'wb').write(data)
                    os.replace(tmp, path)
                elif mode == 1:  # truncated, then written (torch.save to the same path)
                    with open(path, 'wb') as g:
                        g.write(data[:len(data) // 2])
                        g.flush()
                        g.write(data[len(data) // 2:])
                else:  # rewritten in place
                    with open(path, 'r+b') as g:
                        g.write(data)
                i += 1
        t = threading.Thread(target=writer)
        t.start()
        counts = dict(ok=0, error=0, mixed=0)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            m = M()
            try:
                load_sources(m, [dict(checkpoint=path)], logger=None)
            except FusionLoadError as e:
                counts['error'] += 1
                continue
            v = values(m)
            counts['ok' if v in ([1.0], [2.0], [3.0]) else 'mixed'] += 1
        stop.append(1)
        t.join()
        print(counts['mixed'], counts['ok'] + counts['error'] > 0)
    ''')
    assert out.split('\n')[-2] == '0 True', out
