"""EfficientViT configs: the RetinaNet config trains for two iterations through
``tools/train.py`` (a subprocess, as users run it) with a Cream release file as the
backbone's ``init_cfg``; the BEVFusion variant parses and its camera branch fits the
view transform."""
import json
import math
import os
import os.path as osp
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config

from bevfusion_tree import checkout, write_tree
from test_efficientvit_pretrained import bias_idxs, bicubic, cream_release, cream_state

REPO = Path(__file__).resolve().parents[1]
RETINANET = REPO / 'configs' / 'efficientvit' / 'retinanet_efficientvit-m4_fpn_1x_coco.py'
BEVFUSION = (REPO / 'configs' / 'bevfusion' /
             'bevfusion_lidar-cam_efficientvit-m4_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py')
UPSTREAM_CFG = ('projects/BEVFusion/configs/'
                'bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py')
H, W = 128, 160

# A real hook, registered by the config's custom_imports in the training process: it saves
# the backbone as it is when the first iteration starts (after init_weights).
SNAPSHOT_HOOK = '''
import os.path as osp
import shutil

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class BackboneSnapshotHook(Hook):
    priority = 'VERY_HIGH'

    def __init__(self, filename='backbone_at_start.pth'):
        self.filename = filename

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter != 0:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
        torch.save(state, osp.join(runner.work_dir, self.filename))
'''


def write_coco(root: Path) -> None:
    """Three 128x160 PNGs with filled rectangles and their COCO instances file."""
    import cv2
    (root / 'images').mkdir(parents=True)
    (root / 'annotations').mkdir()
    rng = np.random.default_rng(0)
    boxes = {1: [(16, 20, 60, 48, 1), (90, 60, 50, 40, 3)],
             2: [(30, 10, 80, 70, 3)],
             3: [(8, 8, 40, 90, 1), (70, 30, 72, 64, 3)]}
    images, anns = [], []
    for img_id, objs in boxes.items():
        img = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
        for x, y, w, h, cat in objs:
            color = (40, 200, 60) if cat == 1 else (220, 80, 30)
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, thickness=-1)
            anns.append(dict(id=len(anns) + 1, image_id=img_id, category_id=cat,
                             bbox=[x, y, w, h], area=w * h, iscrowd=0, segmentation=[]))
        name = f'{img_id:06d}.png'
        assert cv2.imwrite(str(root / 'images' / name), img)
        images.append(dict(id=img_id, file_name=name, height=H, width=W))
    categories = [dict(id=1, name='person'), dict(id=3, name='car')]  # COCO class names
    (root / 'annotations' / 'instances_tiny.json').write_text(json.dumps(
        dict(images=images, annotations=anns, categories=categories)))


def test_retinanet_config_parses():
    cfg = Config.fromfile(str(RETINANET))
    assert cfg.custom_imports == dict(imports=['mmfusionload'], allow_failed_imports=False)
    bb = cfg.model.backbone
    assert bb == dict(type='EfficientViT', arch='m4', img_size=None, out_indices=(0, 1, 2),
                      frozen_stages=-1, norm_eval=False,
                      init_cfg=dict(type='Pretrained',
                                    checkpoint='pretrained/efficientvit_m4.pth'))
    neck = cfg.model.neck
    assert (neck.type, neck.in_channels, neck.start_level, neck.num_outs,
            neck.add_extra_convs) == ('FPN', [128, 256, 384], 0, 5, 'on_input')
    anchors = cfg.model.bbox_head.anchor_generator
    assert anchors.strides == [16, 32, 64, 128, 256] and anchors.octave_base_scale == 2
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                                               weight_decay=0.05)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys.attention_biases.decay_mult == 0
    assert cfg.train_cfg.max_epochs == 12 and cfg.default_scope == 'mmdet'


def test_train_two_iterations_with_cream_checkpoint(tmp_path):
    data = tmp_path / 'coco'
    write_coco(data)
    state = cream_state('m4', seed=4)
    ckpt = tmp_path / 'efficientvit_m4.pth'
    torch.save(cream_release(state), str(ckpt))
    (tmp_path / 'evit_snapshot_hook.py').write_text(SNAPSHOT_HOOK)
    # a user's config on top of the shipped one; only the test hook is added
    child = tmp_path / 'retinanet_evit_test.py'
    child.write_text(textwrap.dedent(f'''\
        _base_ = [{str(RETINANET)!r}]
        custom_imports = dict(imports=['mmfusionload', 'evit_snapshot_hook'],
                              allow_failed_imports=False)
        custom_hooks = [dict(type='BackboneSnapshotHook')]
        '''))
    work_dir = tmp_path / 'work_dir'
    ds = 'train_dataloader.dataset'
    options = [
        f'model.backbone.init_cfg.checkpoint={ckpt}',
        f'{ds}.data_root={data}/', f'{ds}.ann_file=annotations/instances_tiny.json',
        f'{ds}.data_prefix.img=images/', f'{ds}.pipeline.2.scale=({W},{H})',
        'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'train_cfg._delete_=True', 'train_cfg.type=IterBasedTrainLoop',
        'train_cfg.max_iters=2',
        'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None',
        'log_processor.by_epoch=False', 'default_hooks.logger.interval=1',
        'default_hooks.checkpoint.by_epoch=False', 'default_hooks.checkpoint.interval=1000',
        'default_hooks.checkpoint.save_last=False', 'randomness.seed=0',
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(
                   [str(tmp_path)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    cmd = [sys.executable, str(REPO / 'tools' / 'train.py'), str(child),
           '--work-dir', str(work_dir), '--cfg-options', *options]
    start = time.time()
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=540)
    took = time.time() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    # the backbone at the first iteration is the Cream file, stage 3 resized
    snap = torch.load(str(work_dir / 'backbone_at_start.pth'), weights_only=True)
    assert len(snap) == 692
    resized = []
    for k, v in snap.items():
        if k.endswith('attention_bias_idxs'):
            assert torch.equal(v, bias_idxs(7)), k
            continue
        src = state[k]
        if src.shape != v.shape:
            resized.append(k)
            src = bicubic(src, 7)
        assert torch.equal(v, src), k
    assert resized == [f'blocks3.{i}.mixer.m.attn.attention_biases' for i in (3, 4, 5)]

    # the run's log: the load report, and finite losses at both iterations
    (run_dir, ) = [p for p in work_dir.iterdir() if p.is_dir()]
    log = (run_dir / f'{run_dir.name}.log').read_text()
    assert 'mmfusionload: 1 source(s), applied' in log
    assert 'repaired (resize) (3): blocks3.{3..5}.mixer.m.attn.attention_biases' in log
    assert 'unexpected (7): head.bn.bias' in log
    lines = (run_dir / 'vis_data' / 'scalars.json').read_text().splitlines()
    scalars = [json.loads(line) for line in lines if line.strip()]
    assert [s['iter'] for s in scalars] == [1, 2], scalars
    for s in scalars:
        for key in ('loss', 'loss_cls', 'loss_bbox'):
            assert math.isfinite(s[key]), (key, s)
        assert s['loss'] > 0
    print(f'tools/train.py, 2 iterations: {took:.1f} s')


# ---------------------------------------------------------------- BEVFusion variant
STUB_UPSTREAM = '''
# Stand-in for MMDetection3D's BEVFusion lidar-cam config: only what the variant changes
# or relies on (values as upstream).
custom_imports = dict(imports=['projects.BEVFusion.bevfusion'], allow_failed_imports=False)
model = dict(
    type='BEVFusion',
    img_backbone=dict(
        type='mmdet.SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24], window_size=7, out_indices=[1, 2, 3],
        convert_weights=True,
        init_cfg=dict(type='Pretrained', checkpoint='swin_tiny_patch4_window7_224.pth')),
    img_neck=dict(
        type='GeneralizedLSSFPN', in_channels=[192, 384, 768], out_channels=256,
        start_level=0, num_outs=3, norm_cfg=dict(type='BN2d', requires_grad=True),
        act_cfg=dict(type='ReLU', inplace=True),
        upsample_cfg=dict(mode='bilinear', align_corners=False)),
    view_transform=dict(
        type='DepthLSSTransform', in_channels=256, out_channels=80,
        image_size=[256, 704], feature_size=[32, 88], xbound=[-54.0, 54.0, 0.3],
        ybound=[-54.0, 54.0, 0.3], zbound=[-10.0, 10.0, 20.0], dbound=[1.0, 60.0, 0.5],
        downsample=2),
    pts_backbone=dict(type='SECOND', in_channels=256, out_channels=[128, 256]))
'''


def upstream_root(tmp_path, kind):
    """The MMDetection3D tree of the BEVFusion configs: one the tests write
    (``bevfusion_tree.py``) or ``MMDET3D_ROOT``'s checkout (skipped without one)."""
    if kind == 'checkout':
        root = checkout()
        if root is None:
            pytest.skip('MMDET3D_ROOT does not name an MMDetection3D checkout')
        return root
    return write_tree(tmp_path / 'mmdet3d_tree')


def parse_bevfusion(root, monkeypatch):
    monkeypatch.setenv('MMDET3D_ROOT', str(root))
    # custom_imports name upstream's `projects.BEVFusion.bevfusion`, absent here
    return Config.fromfile(str(BEVFUSION), import_custom_modules=False)


def check_bevfusion_cfg(cfg):
    model = cfg.model
    assert model.type == 'BEVFusion'
    assert model.img_backbone == dict(type='mmdet.EfficientViT', arch='m4', img_size=None,
                                      out_indices=(0, 1, 2), frozen_stages=-1,
                                      norm_eval=False, init_cfg=None)
    assert model.img_neck.type == 'SECONDFPN' and model.img_neck.in_channels == [128, 256, 384]
    assert 'num_outs' not in model.img_neck  # GeneralizedLSSFPN's keys are gone
    assert 'mmfusionload' in cfg.custom_imports.imports
    (hook, ) = [h for h in cfg.custom_hooks if h.type == 'FusionLoadHook']
    assert [s.modality for s in hook.sources] == [['lidar', 'head'], 'camera']
    assert hook.sources[1].checkpoint == 'pretrained/efficientvit_m4.pth'
    vt = model.view_transform
    assert sum(model.img_neck.out_channels) == vt.in_channels
    return vt


def test_bevfusion_variant_substitutes_mmdet3d_root(tmp_path, monkeypatch):
    """MMEngine 0.10.7 substitutes ``{{$MMDET3D_ROOT:default}}`` before reading ``_base_``."""
    upstream = tmp_path / 'mmdetection3d' / UPSTREAM_CFG
    upstream.parent.mkdir(parents=True)
    upstream.write_text(STUB_UPSTREAM)
    cfg = parse_bevfusion(tmp_path / 'mmdetection3d', monkeypatch)
    check_bevfusion_cfg(cfg)
    assert cfg.model.pts_backbone.type == 'SECOND'  # the rest comes from upstream

    # unset: the default is resolved against the config's folder (a sibling checkout)
    monkeypatch.delenv('MMDET3D_ROOT')
    default = osp.join(str(BEVFUSION.parent), '../../../mmdetection3d', UPSTREAM_CFG)
    if not osp.isfile(default):
        with pytest.raises(FileNotFoundError, match='/../../../mmdetection3d/projects/'):
            Config.fromfile(str(BEVFUSION), import_custom_modules=False)


@pytest.mark.parametrize('kind', ['written', 'checkout'])
def test_bevfusion_variant_parses_with_upstream(tmp_path, monkeypatch, kind):
    root = upstream_root(tmp_path, kind)
    cfg = parse_bevfusion(root, monkeypatch)
    vt = check_bevfusion_cfg(cfg)
    assert vt.type == 'DepthLSSTransform' and list(vt.feature_size) == [32, 88]
    assert list(vt.image_size) == [256, 704]
    assert cfg.model.pts_middle_encoder.type == 'BEVFusionSparseEncoder'
    assert cfg.model.fusion_layer.in_channels == [80, 256]
    assert [h.type for h in cfg.custom_hooks] == ['FusionLoadHook']
    assert cfg.default_scope == 'mmdet3d'


def test_bevfusion_variant_camera_features_fit_the_view_transform(tmp_path, monkeypatch):
    """EfficientViT + the variant's neck give what DepthLSSTransform concatenates with its
    stride-8 depth branch: ``view_transform.in_channels`` channels at ``feature_size``."""
    import mmdet3d.models  # noqa: F401  (registers SECONDFPN)
    import mmfusionload  # noqa: F401  (registers EfficientViT)
    from mmdet3d.registry import MODELS

    root = checkout() or write_tree(tmp_path / 'mmdet3d_tree')
    cfg = parse_bevfusion(root, monkeypatch)
    vt = check_bevfusion_cfg(cfg)
    backbone = MODELS.build(cfg.model.img_backbone).eval()
    neck = MODELS.build(cfg.model.img_neck).eval()
    with torch.no_grad():
        feats = neck(backbone(torch.randn(2, 3, *vt.image_size)))
    assert tuple(feats[0].shape) == (2, vt.in_channels, *vt.feature_size)
    assert bool(torch.isfinite(feats[0]).all())
