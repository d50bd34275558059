"""Bounded property-based fuzzing of the reader and the planner, in a child process
(a crash or a runaway allocation there fails this test instead of the test run)."""
import os
import os.path as osp
import resource
import subprocess
import sys

import pytest

pytest.importorskip('hypothesis')
HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
TIMEOUT_S = 600
ADDRESS_SPACE = 16 << 30


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_reader_and_planner_fuzz():
    env = dict(os.environ, PYTHONWARNINGS='ignore', PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, osp.join(HERE, 'hostile_fuzz.py')], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          preexec_fn=_limit)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert proc.stdout.count('examples passed') == 3, proc.stdout
