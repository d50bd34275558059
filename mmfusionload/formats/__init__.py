"""Key-mapping presets for checkpoints in foreign formats.

Importing this package registers, in ``KEY_PRESETS``:

- ``'mit-bevfusion'``: the original mit-han-lab BEVFusion release -> MMDetection3D's
  ``projects/BEVFusion`` names, sparse kernels in MMCV's ``[*k, in, out]`` layout.
- ``'swin-original'``: Microsoft's Swin Transformer release -> MMDetection's
  ``SwinTransformer`` (through ``mmdet.models.backbones.swin.swin_converter``).
- ``'cream-efficientvit'``: Microsoft Cream EfficientViT classification/detection
  files -> :class:`mmfusionload.models.EfficientViT`.
"""
from .cream import CREAM_EFFICIENTVIT, cream_to_backbone
from .mit_bevfusion import MIT_BEVFUSION, MIT_BEVFUSION_RULES
from .swin import SWIN_ORIGINAL, swin_original_to_mmdet

__all__ = [
    'CREAM_EFFICIENTVIT', 'MIT_BEVFUSION', 'MIT_BEVFUSION_RULES', 'SWIN_ORIGINAL',
    'cream_to_backbone', 'swin_original_to_mmdet'
]
