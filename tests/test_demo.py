"""The README's demonstration command runs, loads both checkpoints exactly, and leaves
nothing behind unless asked to."""
import os
import subprocess
import sys


def _demo(tmp_path, *args):
    tmp = tmp_path / 'tmp'
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp))  # where tempfile puts the demo's folder
    out = subprocess.run([sys.executable, '-m', 'mmfusionload', 'demo', *args], env=env,
                         capture_output=True, text=True, check=True).stdout
    return out, tmp


def test_demo_command_leaves_nothing_behind(tmp_path):
    out, tmp = _demo(tmp_path)
    assert "every loaded tensor equals the trained model's: True" in out
    assert 'spconv_layout 21' in out
    assert 'backbone. -> img_backbone.' in out
    assert f'wrote {tmp}' in out  # it did write its checkpoints there
    assert list(tmp.iterdir()) == []


def test_demo_keep_and_work_dir_say_where(tmp_path):
    from mmfusionload.cli.demo import run_demo
    out, tmp = _demo(tmp_path, '--keep')
    (kept,) = tmp.iterdir()
    assert f'kept the demo checkpoints in {kept}' in out
    assert sorted(p.name for p in kept.iterdir()) == ['lidar_mmcv_layout.pth',
                                                      'swin_detector.pth']
    work = tmp_path / 'work'
    work.mkdir()
    assert run_demo(str(work)).ok
    assert sorted(p.name for p in work.iterdir()) == ['lidar_mmcv_layout.pth',
                                                      'swin_detector.pth']
