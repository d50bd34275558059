"""tools/test.py: the tested checkpoint is never overwritten by a training config's sources."""
import importlib.util
import os.path as osp

import pytest
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
    assert cfg.custom_hooks == [dict(type='FusionLoadHook')]
