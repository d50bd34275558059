"""The package's layers (``.importlinter``): each folder imports only from below, no cycles."""
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_import_contracts_hold():
    exe = osp.join(osp.dirname(sys.executable), 'lint-imports')
    proc = subprocess.run([exe, '--no-cache'], cwd=ROOT, capture_output=True, text=True,
                          env={'PYTHONPATH': ROOT, 'PATH': osp.dirname(sys.executable)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert 'Contracts: 2 kept, 0 broken.' in proc.stdout
