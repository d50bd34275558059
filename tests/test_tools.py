"""tools/test.py: the tested checkpoint is never overwritten by a training config's sources."""
import importlib.util
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mmfusionload import FusionLoadHook

TOOLS = osp.join(osp.dirname(osp.dirname(__file__)), 'tools')


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', osp.join(TOOLS, f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize('kind', ['FusionLoadHook', 'mmengine.FusionLoadHook', FusionLoadHook])
def test_sources_dropped_whatever_the_type_spelling(kind):
    cfg = Config(dict(load_from='trained.pth', custom_hooks=[
        dict(type='EMAHook'),
        dict(type=kind, sources=[dict(modality='lidar', checkpoint='pre.pth')])]))
    _tool('test').use_fusion_load_hook(cfg)
    hooks = cfg.custom_hooks
    assert len(hooks) == 2 and hooks[1]['sources'] == [] and hooks[0]['type'] == 'EMAHook'


def test_hook_added_when_absent():
    cfg = Config(dict(load_from='trained.pth', custom_hooks=[]))
    _tool('test').use_fusion_load_hook(cfg)
    assert cfg.custom_hooks == [dict(type='FusionLoadHook', load_from_strict=True,
                                     report_file='fusionload_report_test.json')]
    _tool('test').use_fusion_load_hook(cfg, allow_missing=True)
    assert cfg.custom_hooks[0]['load_from_strict'] is False


def _tested(tmp_path, ckpt, allow_missing):
    """tools/test.py's hook set-up in a real Runner testing ``ckpt``."""
    from test_hook_runner import Snapshot, _runner
    cfg = Config(dict(load_from=ckpt, custom_hooks=[]))
    _tool('test').use_fusion_load_hook(cfg, allow_missing=allow_missing)
    snap = Snapshot()
    runner = _runner(tmp_path, 'test', [*cfg.custom_hooks, snap], load_from=ckpt,
                     optim_wrapper=None, train_dataloader=None, train_cfg=None)
    return runner, snap


def test_checkpoint_without_head_stops_the_test_unless_allowed(tmp_path):
    """A checkpoint that lacks tensors of the model (here the fusion head) is an error;
    with --allow-missing the test runs, and its report says the file was applied and
    leaves the training run's report alone."""
    pytest.importorskip('spconv')
    from builders import randomize
    from mmfusionload import FusionLoadError
    from tiny_fusion import TinyFusion
    trained = randomize(TinyFusion(), seed=1).state_dict()
    headless = {k: v for k, v in trained.items() if not k.startswith('fusion_layer.')}
    ckpt = str(tmp_path / 'headless.pth')
    torch.save({'state_dict': headless}, ckpt)
    train_report = tmp_path / 'fusionload_report.json'
    train_report.write_text('{"title": "the training run"}')

    runner, snap = _tested(tmp_path, ckpt, allow_missing=False)
    with pytest.raises(FusionLoadError) as info:
        runner.test()
    msg = str(info.value)
    assert 'load_from lacks tensors of the model' in msg and 'load_from_strict=False' in msg
    assert f'{ckpt}: 5 model tensor(s) get nothing from it: fusion_layer.1.bias; ' in msg
    assert snap.model is None  # stopped before the test loop

    runner, snap = _tested(tmp_path, ckpt, allow_missing=True)
    runner.test()
    for k, v in headless.items():
        assert torch.equal(snap.model[k], v), k
    hook = next(h for h in runner.hooks if type(h).__name__ == 'FusionLoadHook')
    assert hook.report.applied and 'not applied' not in hook.report.format()
    assert len(hook.report.sources[0].loaded) == len(headless)
    assert train_report.read_text() == '{"title": "the training run"}'
    test_report = json.loads((tmp_path / 'fusionload_report_test.json').read_text())
    assert test_report['applied'] is True and test_report['sources'][0]['label'] == 'load_from'
    assert len(test_report['sources'][0]['missing']) > 0


@pytest.mark.parametrize('script', ['dist_train', 'dist_test'])
def test_dist_scripts_use_the_set_up_interpreter(tmp_path, script):
    """$PYTHON wins; else the repository's .venv/bin/python; else python on PATH."""
    import os
    import shutil
    import subprocess
    (tmp_path / 'tools').mkdir()
    shutil.copy(osp.join(TOOLS, f'{script}.sh'), tmp_path / 'tools')

    def fake(path, name):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        path.chmod(0o755)
        return path

    bin_dir = tmp_path / 'bin'
    fake(bin_dir / 'python', 'path-python')
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    env.pop('PYTHON', None)
    args = ['bash', str(tmp_path / 'tools' / f'{script}.sh'), 'cfg.py'] + \
        (['ckpt.pth'] if script == 'dist_test' else []) + ['2']

    def first_word():
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
        assert '-m torch.distributed.run' in out and '--nproc_per_node=2' in out
        return out.split()[0]

    assert first_word() == 'path-python'
    fake(tmp_path / '.venv' / 'bin' / 'python', 'venv-python')
    assert first_word() == 'venv-python'
    env['PYTHON'] = str(fake(tmp_path / 'mine', 'chosen-python'))
    assert first_word() == 'chosen-python'
