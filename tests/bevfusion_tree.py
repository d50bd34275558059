"""An MMDetection3D-structured tree with a BEVFusion project, written by the tests.

``configs/bevfusion/*.py`` inherit MMDetection3D's BEVFusion configs from the user's
source tree through ``{{$MMDET3D_ROOT:...}}``. The tests need such a tree; this module
writes one holding only what they check, with the values of MMDetection3D 1.4's
BEVFusion configs as ``shared/BEVFUSION.md`` records them (model and module types, the
camera branch's sizes, the schedules). ``configs/`` is linked to the installed mmdet3d's
own configs: the LiDAR config's ``_base_`` is ``../../../configs/_base_/default_runtime.py``
there too.

With ``package=True`` it also writes a ``projects.BEVFusion.bevfusion`` package shaped
like upstream's: its ``bev_pool`` op imports the compiled extension ``bev_pool_ext``,
whose C++/CUDA sources are there and whose ``setup.py`` names it, but which is not
built, so importing the package fails as it does on a machine without the built ops.

A real checkout is used instead when ``MMDET3D_ROOT`` names one (:func:`checkout`).
"""
import os
import os.path as osp
import textwrap
from pathlib import Path
from typing import Optional

LIDAR_CFG = 'bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'
LIDAR_CAM_CFG = 'bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'
CONFIGS = Path('projects') / 'BEVFusion' / 'configs'

LIDAR = '''\
_base_ = ['../../../configs/_base_/default_runtime.py']
custom_imports = dict(
    imports=['projects.BEVFusion.bevfusion'], allow_failed_imports=False)
model = dict(
    type='BEVFusion',
    pts_voxel_encoder=dict(type='HardSimpleVFE', num_features=5),
    pts_middle_encoder=dict(
        type='BEVFusionSparseEncoder', in_channels=5,
        sparse_shape=[1440, 1440, 41], output_channels=128),
    pts_backbone=dict(type='SECOND', in_channels=256, out_channels=[128, 256]),
    pts_neck=dict(type='SECONDFPN', in_channels=[128, 256], out_channels=[256, 256]),
    bbox_head=dict(type='TransFusionHead', num_classes=10))
train_cfg = dict(by_epoch=True, max_epochs=20, val_interval=5)
custom_hooks = [dict(type='DisableObjectSampleHook', disable_after_epoch=15)]
'''

LIDAR_CAM = f'''\
_base_ = ['./{LIDAR_CFG}']
model = dict(
    type='BEVFusion',
    img_backbone=dict(
        type='mmdet.SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24], window_size=7, out_indices=[1, 2, 3],
        init_cfg=dict(type='Pretrained', checkpoint='swin_tiny_patch4_window7_224.pth')),
    img_neck=dict(
        type='GeneralizedLSSFPN', in_channels=[192, 384, 768], out_channels=256,
        start_level=0, num_outs=3),
    view_transform=dict(
        type='DepthLSSTransform', in_channels=256, out_channels=80,
        image_size=[256, 704], feature_size=[32, 88]),
    fusion_layer=dict(type='ConvFuser', in_channels=[80, 256], out_channels=256))
train_cfg = dict(by_epoch=True, max_epochs=6, val_interval=1)
del _base_.custom_hooks
'''

# The package: a model whose structure builds without the compiled op, which only
# its forward would call (as BEVFusion's DepthLSSTransform calls bev_pool).
PACKAGE = {
    '__init__.py': '''\
        from .bevfusion import BEVFusion
        from .bev_pool import bev_pool

        __all__ = ['BEVFusion', 'bev_pool']
        ''',
    'bev_pool/__init__.py': '''\
        from .bev_pool import bev_pool

        __all__ = ['bev_pool']
        ''',
    'bev_pool/bev_pool.py': '''\
        from . import bev_pool_ext


        def bev_pool(feats, coords, batch, depth, height, width):
            return bev_pool_ext.bev_pool_forward(feats, coords, batch, depth, height, width)
        ''',
    'bev_pool/src/bev_pool.cpp': '// the op a real checkout compiles; not built here\n',
    'bev_pool/src/bev_pool_cuda.cu': '// the CUDA kernel of the op; not built here\n',
    'bevfusion.py': '''\
        import torch.nn as nn
        from mmdet3d.registry import MODELS
        from mmengine.model import BaseModel


        @MODELS.register_module(force=True)
        class BEVFusion(BaseModel):

            def __init__(self, pts_backbone, pts_neck, camera_channels=8, init_cfg=None,
                         **kwargs):
                super().__init__(init_cfg=init_cfg)
                self.pts_backbone = MODELS.build(pts_backbone)
                self.pts_neck = MODELS.build(pts_neck)
                self.img_backbone = nn.Conv2d(3, camera_channels, 3, padding=1)

            def forward(self, inputs, data_samples=None, mode='tensor'):
                from .bev_pool import bev_pool
                return bev_pool(inputs, None, 1, 1, 1, 1)
        ''',
}
SETUP = '''\
# builds the compiled ops of projects/BEVFusion (python projects/BEVFusion/setup.py develop)
EXTENSIONS = [dict(name='bev_pool_ext', module='projects.BEVFusion.bevfusion.bev_pool',
                   sources=['src/bev_pool.cpp', 'src/bev_pool_cuda.cu'])]
'''


def write_tree(root: Path, package: bool = False) -> Path:
    """Write the tree under ``root`` and return ``root``.

    Args:
        root (Path): An empty or missing folder.
        package (bool): Also write the ``projects.BEVFusion.bevfusion`` package
            with its unbuilt compiled op.
    """
    import mmdet3d
    configs = root / CONFIGS
    configs.mkdir(parents=True, exist_ok=True)
    (configs / LIDAR_CFG).write_text(LIDAR)
    (configs / LIDAR_CAM_CFG).write_text(LIDAR_CAM)
    link = root / 'configs'
    if not link.exists():
        os.symlink(osp.join(osp.dirname(mmdet3d.__file__), '.mim', 'configs'), link)
    if package:
        pkg = root / 'projects' / 'BEVFusion' / 'bevfusion'
        for name, text in PACKAGE.items():
            (pkg / name).parent.mkdir(parents=True, exist_ok=True)
            (pkg / name).write_text(textwrap.dedent(text))
        (root / 'projects' / 'BEVFusion' / 'setup.py').write_text(SETUP)
    return root


def checkout() -> Optional[Path]:
    """The MMDetection3D checkout ``MMDET3D_ROOT`` names, or None."""
    root = os.environ.get('MMDET3D_ROOT')
    if root and (Path(root) / CONFIGS / LIDAR_CAM_CFG).is_file():
        return Path(root).resolve()
    return None
