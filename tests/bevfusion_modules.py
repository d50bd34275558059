"""Modules of MMDetection3D's ``projects/BEVFusion`` read from a checkout, without its package.

The project's package imports its compiled ops (``bev_pool``, voxelization) on import;
its ``transformer.py``, ``transfusion_head.py`` and ``sparse_encoder.py`` import only the
installed MMDetection/MMDetection3D. They are loaded here from their files (once per
process: they register into MMDetection3D's ``MODELS``) when ``MMDET3D_ROOT`` names a
checkout holding ``projects/BEVFusion``; otherwise the tests that need them skip.
"""
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import pytest

FILES = ('transformer', 'sparse_encoder', 'transfusion_head')
PACKAGE = 'bevfusion_project_files'


def project_dir() -> Optional[Path]:
    """``$MMDET3D_ROOT/projects/BEVFusion/bevfusion``, when it holds the files."""
    root = os.environ.get('MMDET3D_ROOT')
    if not root:
        return None
    d = Path(root) / 'projects' / 'BEVFusion' / 'bevfusion'
    return d if all((d / f'{f}.py').is_file() for f in FILES) else None


def project_module(name: str) -> ModuleType:
    """One of :data:`FILES` as a module, or skip the test without a checkout."""
    d = project_dir()
    if d is None:
        pytest.skip('needs MMDET3D_ROOT naming an MMDetection3D checkout with '
                    'projects/BEVFusion (TransFusionHead is not in the pip package)')
    from mmdet3d.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    full = f'{PACKAGE}.{name}'
    if full not in sys.modules:
        if PACKAGE not in sys.modules:
            pkg = ModuleType(PACKAGE)
            pkg.__path__ = [str(d)]
            sys.modules[PACKAGE] = pkg
        spec = importlib.util.spec_from_file_location(full, d / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def transfusion_head(num_classes: int, hidden: int = 8, layers: int = 2, proposals: int = 6,
                     in_channels: int = 8, grid: int = 32, factor: int = 4):
    """BEVFusion's real ``TransFusionHead`` with tiny sizes (an ``grid/factor`` square BEV)."""
    project_module('transformer')
    head_mod = project_module('transfusion_head')
    return head_mod.TransFusionHead(
        num_proposals=proposals, auxiliary=True, in_channels=in_channels,
        hidden_channel=hidden, num_classes=num_classes, num_decoder_layers=layers,
        nms_kernel_size=3,
        decoder_layer=dict(
            type='TransformerDecoderLayer',
            self_attn_cfg=dict(embed_dims=hidden, num_heads=2, dropout=0.0),
            cross_attn_cfg=dict(embed_dims=hidden, num_heads=2, dropout=0.0),
            ffn_cfg=dict(embed_dims=hidden, feedforward_channels=2 * hidden, num_fcs=2,
                         ffn_drop=0.0, act_cfg=dict(type='ReLU', inplace=True)),
            norm_cfg=dict(type='LN'),
            pos_encoding_cfg=dict(input_channel=2, num_pos_feats=hidden)),
        test_cfg=dict(dataset='other', grid_size=[grid, grid, 1], out_size_factor=factor,
                      voxel_size=[0.5, 0.5], pc_range=[-8.0, -8.0], nms_type=None),
        common_heads=dict(center=[2, 2], height=[1, 2], dim=[3, 2], rot=[2, 2], vel=[2, 2]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder'),
        loss_cls=dict(type='mmdet.FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      reduction='mean', loss_weight=1.0),
        loss_heatmap=dict(type='mmdet.GaussianFocalLoss', reduction='mean', loss_weight=1.0),
        loss_bbox=dict(type='mmdet.L1Loss', reduction='mean', loss_weight=0.25))
