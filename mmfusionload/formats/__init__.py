"""Key-mapping presets for checkpoints in foreign formats.

Importing this package registers, in ``KEY_PRESETS``:

- ``'mit-bevfusion'``: the original mit-han-lab BEVFusion release -> MMDetection3D's
  ``projects/BEVFusion`` names, sparse kernels in MMCV's ``[*k, in, out]`` layout.
- ``'swin-original'``: Microsoft's Swin Transformer release -> MMDetection's
  ``SwinTransformer`` (through ``mmdet.models.backbones.swin.swin_converter``).
- ``'cream-efficientvit'``: Microsoft Cream EfficientViT classification/detection
  files -> :class:`mmfusionload.models.EfficientViT`.
- ``'openpcdet'``: OpenPCDet ``VoxelBackBone8x``/``VoxelResBackBone8x`` and
  ``BaseBEVBackbone`` -> MMDetection3D ``SparseEncoder``, ``SECOND``, ``SECONDFPN``.
"""
from .cream import CREAM_EFFICIENTVIT, cream_to_backbone
from .mit_bevfusion import MIT_BEVFUSION, MIT_BEVFUSION_RULES
from .openpcdet import OPENPCDET, openpcdet_to_mmdet3d
from .swin import SWIN_ORIGINAL, swin_original_to_mmdet

__all__ = [
    'CREAM_EFFICIENTVIT', 'MIT_BEVFUSION', 'MIT_BEVFUSION_RULES', 'OPENPCDET', 'SWIN_ORIGINAL',
    'cream_to_backbone', 'openpcdet_to_mmdet3d', 'swin_original_to_mmdet'
]
