"""The README's demonstration command runs and loads both checkpoints exactly."""
import subprocess
import sys


def test_demo_command(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'mmfusionload', 'demo', '--work-dir',
                          str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "every loaded tensor equals the trained model's: True" in out
    assert 'spconv_layout 21' in out
    assert 'backbone. -> img_backbone.' in out
    assert (tmp_path / 'lidar_mmcv_layout.pth').exists()
