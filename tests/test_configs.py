"""The shipped configs parse, inherit what they claim, and their hooks build.

``configs/bevfusion/*.py`` inherit MMDetection3D's BEVFusion configs from the user's
MMDetection3D source tree through ``{{$MMDET3D_ROOT:...}}`` in ``_base_``. Here that
tree is a temporary folder: ``projects/`` copied from ``tests/data/mmdet3d_tree``
(upstream's two BEVFusion config files, verbatim) and ``configs/`` linked to the
installed mmdet3d's ``.mim/configs`` (their own ``_base_`` is
``../../../configs/_base_/default_runtime.py``). Configs are parsed with
``import_custom_modules=False``: ``projects.BEVFusion.bevfusion`` (CUDA ops) is not
imported, and no model is built.
"""
import importlib.util
import os
import os.path as osp
import shutil
import sys
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import HOOKS

import mmfusionload  # noqa: F401  (registers FusionLoadHook, presets, modalities)
from mmfusionload import KEY_PRESETS, MODALITIES, FusionLoadHook

ROOT = Path(__file__).resolve().parents[1]
VENDORED = Path(__file__).resolve().parent / 'data' / 'mmdet3d_tree'
BEVFUSION = sorted((ROOT / 'configs' / 'bevfusion').glob('*.py'))
LIDAR = sorted((ROOT / 'configs' / 'lidar').glob('*.py'))
SWINT = ROOT / 'configs' / 'bevfusion' / \
    'bevfusion_lidar-cam_swint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'
MIT = ROOT / 'configs' / 'bevfusion' / \
    'bevfusion_lidar-cam_mit-bevfusion_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'
UPSTREAM_LIDAR_RUN = ('work_dirs/bevfusion_lidar_voxel0075_second_secfpn_'
                      '8xb4-cyclic-20e_nus-3d/epoch_20.pth')


@pytest.fixture(scope='module')
def mmdet3d_tree(tmp_path_factory) -> Path:
    """A stand-in MMDetection3D source tree: vendored projects/, installed configs/."""
    mmdet3d = pytest.importorskip('mmdet3d')
    root = tmp_path_factory.mktemp('mmdetection3d')
    # copied, not linked: `projects/BEVFusion/configs/../../../configs` must resolve
    # inside this tree
    shutil.copytree(VENDORED / 'projects', root / 'projects')
    os.symlink(osp.join(osp.dirname(mmdet3d.__file__), '.mim', 'configs'), root / 'configs')
    return root


@pytest.fixture
def parse(mmdet3d_tree, monkeypatch):
    monkeypatch.setenv('MMDET3D_ROOT', str(mmdet3d_tree))

    def _parse(path) -> Config:
        return Config.fromfile(str(path), import_custom_modules=False)

    return _parse


def _fusion_hooks(cfg: Config):
    return [h for h in cfg.get('custom_hooks', []) if h['type'] == 'FusionLoadHook']


def _check_sources(cfg: Config) -> None:
    """Every FusionLoadHook builds (source options checked) and names known presets."""
    hooks = _fusion_hooks(cfg)
    assert hooks, 'no FusionLoadHook in custom_hooks'
    for h in hooks:
        hook = HOOKS.build(dict(h))
        assert isinstance(hook, FusionLoadHook) and hook.sources
        for s in hook.sources:
            mods = [s.modality] if isinstance(s.modality, str) else list(s.modality or [])
            for m in mods:
                assert MODALITIES.get(m) is not None, f'unknown modality {m!r}'
            if s.preset:
                assert KEY_PRESETS.get(s.preset) is not None, f'unknown preset {s.preset!r}'


def test_vendored_upstream_configs_present():
    names = {p.name for p in (VENDORED / 'projects' / 'BEVFusion' / 'configs').glob('*.py')}
    assert names == {'bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py',
                     'bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'}


@pytest.mark.parametrize('path', BEVFUSION, ids=lambda p: p.name)
def test_bevfusion_config_inherits_upstream_and_builds_hook(parse, path):
    cfg = parse(path)
    # MMDetection3D's BEVFusion lidar-cam model and schedule came through _base_
    assert cfg.model.type == 'BEVFusion'
    assert cfg.model.view_transform.type == 'DepthLSSTransform'
    assert cfg.model.pts_middle_encoder.type == 'BEVFusionSparseEncoder'
    assert cfg.model.bbox_head.type == 'TransFusionHead'
    assert cfg.default_scope == 'mmdet3d'
    # the weights come from the hook only
    assert cfg.load_from is None
    assert cfg.model.img_backbone.init_cfg is None
    assert cfg.custom_imports == dict(imports=['projects.BEVFusion.bevfusion', 'mmfusionload'],
                                      allow_failed_imports=False)
    assert 'projects.BEVFusion.bevfusion' not in sys.modules  # parsing imported nothing
    # upstream's lidar-cam config deletes the LiDAR config's DisableObjectSampleHook
    assert 'DisableObjectSampleHook' not in [h['type'] for h in cfg.custom_hooks]
    _check_sources(cfg)


def test_swint_config_is_the_published_recipe(parse):
    cfg = parse(SWINT)
    assert cfg.model.img_backbone.type == 'mmdet.SwinTransformer'
    assert cfg.train_cfg.max_epochs == 6  # upstream's fusion schedule, unchanged
    assert [h['type'] for h in cfg.custom_hooks] == ['FusionLoadHook']
    (hook,) = _fusion_hooks(cfg)
    lidar, camera = hook['sources']
    # `load_from` gave the LiDAR branch and the TransFusion head
    assert lidar == dict(modality=['lidar', 'head'], checkpoint=UPSTREAM_LIDAR_RUN)
    assert camera == dict(modality='camera',
                          checkpoint='pretrained/swint-nuimages-pretrained.pth')


def test_mit_config_loads_the_original_checkpoint_with_the_preset(parse):
    cfg = parse(MIT)
    (hook,) = _fusion_hooks(cfg)
    assert hook['sources'] == [dict(checkpoint='pretrained/bevfusion-det.pth',
                                    preset='mit-bevfusion')]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f'mmfl_tools_{name}',
                                                  ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoints_override_from_the_command_line(parse, monkeypatch):
    """The README's --cfg-options for other checkpoint files, through train.py's parser."""
    monkeypatch.setattr(sys, 'path', list(sys.path))  # train.py puts the cwd first
    monkeypatch.setenv('LOCAL_RANK', '0')  # its parse_args sets it when absent
    args = _tool('train').parse_args([
        str(SWINT), '--cfg-options', 'custom_hooks.0.sources.0.checkpoint=/ckpt/lidar.pth',
        'custom_hooks.0.sources.1.checkpoint=/ckpt/swint.pth'])
    cfg = parse(args.config)
    cfg.merge_from_dict(args.cfg_options)
    (hook,) = _fusion_hooks(cfg)
    assert [s['checkpoint'] for s in hook['sources']] == ['/ckpt/lidar.pth', '/ckpt/swint.pth']
    assert hook['sources'][0]['modality'] == ['lidar', 'head']
    _check_sources(cfg)


def test_without_mmdet3d_root_the_error_names_the_missing_tree(monkeypatch):
    default = SWINT.parent / '../../../mmdetection3d'  # relative to the config's folder
    if default.exists():
        pytest.skip(f'{default.resolve()} exists')
    monkeypatch.delenv('MMDET3D_ROOT', raising=False)
    with pytest.raises(FileNotFoundError, match=r'mmdetection3d/projects/BEVFusion/configs'):
        Config.fromfile(str(SWINT), import_custom_modules=False)


@pytest.mark.parametrize('path', LIDAR, ids=lambda p: p.name)
def test_lidar_configs_parse(path):
    pytest.importorskip('mmdet3d')
    cfg = Config.fromfile(str(path), import_custom_modules=False)
    assert cfg.model.type == 'CenterPoint'
    assert cfg.model.pts_middle_encoder.sparse_shape == [41, 128, 128]
    assert cfg.train_dataloader.dataset.type == 'NuScenesDataset'
    if _fusion_hooks(cfg):
        assert cfg.load_from is None
        _check_sources(cfg)
