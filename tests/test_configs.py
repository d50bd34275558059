"""The shipped configs parse, inherit what they claim, and their hooks build.

``configs/bevfusion/*.py`` inherit MMDetection3D's BEVFusion configs from the user's
MMDetection3D source tree through ``{{$MMDET3D_ROOT:...}}`` in ``_base_``. Here that
tree is written by the tests (``bevfusion_tree.py``: only the values checked here,
``configs/`` linked to the installed mmdet3d's own), and, when ``MMDET3D_ROOT`` names a
real checkout, that checkout too (skipped otherwise). Configs are parsed with
``import_custom_modules=False``: ``projects.BEVFusion.bevfusion`` (CUDA ops) is not
imported, and no model is built.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import HOOKS

import mmfusionload  # noqa: F401  (registers FusionLoadHook, presets, modalities)
from bevfusion_tree import checkout, write_tree
from mmfusionload import KEY_PRESETS, MODALITIES, FusionLoadHook

ROOT = Path(__file__).resolve().parents[1]
BEVFUSION = sorted((ROOT / 'configs' / 'bevfusion').glob('*.py'))
LIDAR = sorted((ROOT / 'configs' / 'lidar').glob('*.py'))
RETINANET = ROOT / 'configs' / 'efficientvit' / 'retinanet_efficientvit-m4_fpn_1x_coco.py'
SWINT = ROOT / 'configs' / 'bevfusion' / \
    'bevfusion_lidar-cam_swint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'
MIT = ROOT / 'configs' / 'bevfusion' / \
    'bevfusion_lidar-cam_mit-bevfusion_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'
UPSTREAM_LIDAR_RUN = ('work_dirs/bevfusion_lidar_voxel0075_second_secfpn_'
                      '8xb4-cyclic-20e_nus-3d/epoch_20.pth')


@pytest.fixture(scope='module', params=['written', 'checkout'])
def mmdet3d_tree(request, tmp_path_factory) -> Path:
    """A BEVFusion-structured MMDetection3D tree written here, or MMDET3D_ROOT's checkout."""
    pytest.importorskip('mmdet3d')
    if request.param == 'checkout':
        root = checkout()
        if root is None:
            pytest.skip('MMDET3D_ROOT does not name an MMDetection3D checkout')
        return root
    return write_tree(tmp_path_factory.mktemp('mmdetection3d'))


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


def test_no_copied_configs():
    """Configs inherit MMDetection's and MMDetection3D's files; none is copied here."""
    assert not (ROOT / 'configs' / '_base_').exists()
    assert not (ROOT / 'tests' / 'data' / 'mmdet3d_tree').exists()


def _unscoped(value, scopes: set):
    """``value`` without the ``_scope_`` keys MMEngine adds (collected in ``scopes``)."""
    if isinstance(value, dict):
        scopes.update(v for k, v in value.items() if k == '_scope_')
        return {k: _unscoped(v, scopes) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(_unscoped(v, scopes) for v in value)
    return value


def test_retinanet_config_inherits_mmdetection_through_the_package_scope():
    """``mmdet::_base_/...`` resolves to the installed MMDetection 3.3.0 files and gives
    the values of its RetinaNet, COCO, 1x and runtime configs, with ours on top."""
    pytest.importorskip('mmdet')
    text = RETINANET.read_text()
    assert "'mmdet::_base_/models/retinanet_r50_fpn.py'" in text and '../_base_' not in text
    scoped = Config.fromfile(str(RETINANET), import_custom_modules=False)
    # MMEngine marks each typed dict inherited through `mmdet::` with `_scope_='mmdet'`,
    # the config's default scope, so nothing builds differently; the values follow
    scopes = set()
    cfg = Config(_unscoped(scoped.to_dict(), scopes))
    assert scopes == {'mmdet'} and scoped.default_scope == 'mmdet'
    model = cfg.model
    # MMDetection's RetinaNet
    assert model.type == 'RetinaNet' and model.neck.type == 'FPN'
    assert model.data_preprocessor == dict(
        type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True, pad_size_divisor=32)
    assert model.bbox_head.type == 'RetinaHead' and model.bbox_head.num_classes == 80
    assert model.bbox_head.anchor_generator.ratios == [0.5, 1.0, 2.0]
    assert model.bbox_head.loss_cls.type == 'FocalLoss'
    assert model.train_cfg.assigner.type == 'MaxIoUAssigner'
    assert model.test_cfg.nms == dict(type='nms', iou_threshold=0.5)
    # ours on top: the backbone replaced as a whole, the neck and anchors adapted
    assert model.backbone == dict(
        type='EfficientViT', arch='m4', img_size=None, out_indices=(0, 1, 2),
        frozen_stages=-1, norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='pretrained/efficientvit_m4.pth'))
    assert model.neck.in_channels == [128, 256, 384] and model.neck.start_level == 0
    assert model.neck.add_extra_convs == 'on_input' and model.neck.num_outs == 5
    assert model.bbox_head.anchor_generator.strides == [16, 32, 64, 128, 256]
    assert model.bbox_head.anchor_generator.octave_base_scale == 2
    # MMDetection's COCO dataset, 1x schedule and runtime
    assert cfg.train_dataloader.dataset.type == 'CocoDataset'
    assert cfg.train_dataloader.dataset.ann_file == 'annotations/instances_train2017.json'
    assert cfg.val_evaluator.type == 'CocoMetric'
    assert cfg.train_cfg == dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
    assert [s.type for s in cfg.param_scheduler] == ['LinearLR', 'MultiStepLR']
    assert cfg.param_scheduler[1].milestones == [8, 11]
    assert cfg.default_scope == 'mmdet'
    assert cfg.default_hooks.visualization.type == 'DetVisualizationHook'
    # Cream's optimizer replaces MMDetection's SGD
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999),
                                               weight_decay=0.05)
    assert 'momentum' not in cfg.optim_wrapper.optimizer


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
