"""A BEVFusion-shaped model from real MMDetection3D/MMDetection modules, and the demo.

``python -m mmfusionload demo`` builds the model, writes a LiDAR checkpoint in
MMCV's sparse-kernel layout and a camera checkpoint with MMDetection's
``backbone.`` prefix, loads both per modality and prints the report.
"""
import os.path as osp
import shutil
import tempfile
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

from ..report import LoadReport

# BEVFusion's nuScenes config values (projects/BEVFusion/configs/*.py).
SPARSE_ENCODER = dict(
    type='BEVFusionSparseEncoder',
    in_channels=5,
    sparse_shape=[1440, 1440, 41],
    order=('conv', 'norm', 'act'),
    norm_cfg=dict(type='BN1d', eps=0.001, momentum=0.01),
    encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
    encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, (1, 1, 0)), (0, 0)),
    block_type='basicblock')
SECOND_CFG = dict(
    type='SECOND', in_channels=256, out_channels=[128, 256], layer_nums=[5, 5],
    layer_strides=[1, 2], norm_cfg=dict(type='BN', eps=0.001, momentum=0.01),
    conv_cfg=dict(type='Conv2d', bias=False))
SECONDFPN_CFG = dict(
    type='SECONDFPN', in_channels=[128, 256], out_channels=[256, 256],
    upsample_strides=[1, 2], norm_cfg=dict(type='BN', eps=0.001, momentum=0.01),
    upsample_cfg=dict(type='deconv', bias=False), use_conv_for_no_stride=True)
SWIN_T = dict(
    type='mmdet.SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True,
    qk_scale=None, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.2,
    patch_norm=True, out_indices=[1, 2, 3], with_cp=False, convert_weights=True)


def _bevfusion_sparse_encoder(**cfg) -> nn.Module:
    """MMDetection3D's ``SparseEncoder`` with the BEVFusion project's ``conv_out``.

    ``projects/BEVFusion``'s ``BEVFusionSparseEncoder`` (not in the mmdet3d
    wheel) works in (x, y, z) order, so its last sparse conv has kernel
    ``(1, 1, 3)`` and stride ``(1, 1, 2)``; every other layer is the parent's.
    """
    from mmdet3d.models.layers import make_sparse_convmodule
    from mmdet3d.models.middle_encoders import SparseEncoder
    enc = SparseEncoder(**cfg)
    enc.conv_out = make_sparse_convmodule(
        enc.conv_out[0].in_channels, enc.output_channels, kernel_size=(1, 1, 3),
        stride=(1, 1, 2), norm_cfg=cfg.get('norm_cfg', dict(type='BN1d', eps=1e-3, momentum=0.01)),
        padding=0, indice_key='spconv_down2', conv_type='SparseConv3d')
    return enc


def build(cfg: dict) -> nn.Module:
    """Build an MMDetection3D (or ``mmdet.``-scoped) module from its config."""
    from mmdet3d.registry import MODELS
    from mmdet3d.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = dict(cfg)
    if cfg['type'] == 'BEVFusionSparseEncoder':
        cfg.pop('type')
        return _bevfusion_sparse_encoder(**cfg)
    return MODELS.build(cfg)


class ViewTransform(nn.Module):
    """The tensors of BEVFusion's ``DepthLSSTransform`` that matter to loading:
    derived ``frustum``/``dx``/``bx``/``nx`` (frozen Parameters) and learned convs."""

    def __init__(self, image_size=(256, 704), feature_size=(32, 88), dbound=(1.0, 60.0, 0.5)):
        super().__init__()
        d = torch.arange(*dbound).view(-1, 1, 1).expand(-1, *feature_size)
        xs = torch.linspace(0, image_size[1] - 1, feature_size[1]).view(1, 1, -1).expand_as(d)
        ys = torch.linspace(0, image_size[0] - 1, feature_size[0]).view(1, -1, 1).expand_as(d)
        self.frustum = nn.Parameter(torch.stack((xs, ys, d), -1), requires_grad=False)
        self.dx = nn.Parameter(torch.tensor([0.3, 0.3, 20.0]), requires_grad=False)
        self.bx = nn.Parameter(torch.tensor([-53.85, -53.85, 0.0]), requires_grad=False)
        self.nx = nn.Parameter(torch.tensor([360, 360, 1]), requires_grad=False)
        self.dtransform = nn.Sequential(nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8), nn.ReLU(True))
        self.depthnet = nn.Conv2d(256 + 8, int((dbound[1] - dbound[0]) / dbound[2]) + 80, 1)
        self.downsample = nn.Sequential(nn.Conv2d(80, 80, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(80), nn.ReLU(True))


class BEVFusionLike(nn.Module):
    """A model with BEVFusion's attribute names built from real modules."""

    def __init__(self, camera: bool = True, lidar: bool = True, encoder_cfg: Optional[dict] = None):
        super().__init__()
        if camera:
            self.img_backbone = build(SWIN_T)
            self.img_neck = build(dict(type='mmdet.FPN', in_channels=[192, 384, 768],
                               out_channels=256, num_outs=3))
            self.view_transform = ViewTransform()
        if lidar:
            self.pts_voxel_encoder = build(dict(type='HardSimpleVFE', num_features=5))
            self.pts_middle_encoder = build(encoder_cfg or SPARSE_ENCODER)
            self.pts_backbone = build(SECOND_CFG)
            self.pts_neck = build(SECONDFPN_CFG)
        self.fusion_layer = nn.Sequential(nn.Conv2d(336, 256, 3, padding=1, bias=False),
                                          nn.BatchNorm2d(256), nn.ReLU(True))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every float tensor (parameters and BN statistics) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not name.endswith(('frustum', 'dx', 'bx', 'nx')):
                t.copy_(torch.rand(t.shape, generator=g) * 2 - 1 if 'running_var' not in name
                        else torch.rand(t.shape, generator=g) + 0.5)
    return model


def to_mmcv_layout(state: dict, model: nn.Module) -> 'OrderedDict':
    """A copy of ``state`` with the sparse kernels of ``model`` in MMCV's ``[*k, in, out]``."""
    from ..load.repairs import convert_kernel, module_layout
    out = OrderedDict(state)
    for name, m in model.named_modules():
        if module_layout(m) == 'spconv2' and f'{name}.weight' in out:
            out[f'{name}.weight'] = convert_kernel(out[f'{name}.weight'], 'spconv2', 'mmcv')
    return out


def run_demo(work_dir: Optional[str] = None, keep: bool = False) -> LoadReport:
    """Write mismatched checkpoints of a BEVFusion-shaped model and load them per modality.

    Args:
        work_dir (str, optional): Where to write the checkpoints (kept). By
            default a temporary folder, removed at the end.
        keep (bool): Keep the temporary folder (its path is printed).

    Returns:
        LoadReport: The report (also printed).
    """
    if work_dir is not None:
        return _run_demo(work_dir)
    tmp = tempfile.mkdtemp(prefix='mmfusionload_demo_')
    try:
        return _run_demo(tmp)
    finally:
        if keep:
            print(f'kept the demo checkpoints in {tmp}')
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_demo(work_dir: str) -> LoadReport:
    from .. import load_sources
    trained = randomize(BEVFusionLike(), seed=1)
    sd = trained.state_dict()
    lidar = to_mmcv_layout(OrderedDict((k, v) for k, v in sd.items() if k.startswith('pts_')),
                           trained)
    lidar_path = osp.join(work_dir, 'lidar_mmcv_layout.pth')
    torch.save({'state_dict': lidar, 'meta': {'epoch': 20}}, lidar_path)
    camera = OrderedDict(('backbone.' + k[len('img_backbone.'):], v) for k, v in sd.items()
                         if k.startswith('img_backbone.'))
    camera_path = osp.join(work_dir, 'swin_detector.pth')
    torch.save({'state_dict': camera, 'meta': {}}, camera_path)
    print(f'wrote {lidar_path} (sparse kernels [*k, in, out]) and {camera_path} '
          '(MMDetection backbone. prefix)')
    model = BEVFusionLike()
    report = load_sources(model, [dict(modality='lidar', checkpoint=lidar_path),
                                  dict(modality='camera', checkpoint=camera_path)],
                          logger=None, title='demo')
    print(report.format())
    loaded = model.state_dict()
    same = all(torch.equal(loaded[k], sd[k]) for k in loaded
               if k.startswith(('pts_', 'img_backbone.')))
    print(f'every loaded tensor equals the trained model\'s: {same}')
    return report
