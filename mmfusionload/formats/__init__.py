"""Key-mapping presets for checkpoints in foreign formats.

Each module registers one format: its key preset (``KEY_PRESETS``) and its fingerprint
(what :func:`~mmfusionload.checkpoint.identify.identify` recognises it by). Importing
this package registers:

- ``'mit-bevfusion'``: the original mit-han-lab BEVFusion release -> MMDetection3D's
  ``projects/BEVFusion`` names, sparse kernels in MMCV's ``[*k, in, out]`` layout.
- ``'swin-original'``: Microsoft's Swin Transformer release -> MMDetection's
  ``SwinTransformer`` (through ``mmdet.models.backbones.swin.swin_converter``).
- ``'cream-efficientvit'``: Microsoft Cream EfficientViT classification/detection
  files -> :class:`mmfusionload.models.EfficientViT`.
- ``'openpcdet'``: OpenPCDet ``VoxelBackBone8x``/``VoxelResBackBone8x`` and
  ``BaseBEVBackbone`` -> MMDetection3D ``SparseEncoder``, ``SECOND``, ``SECONDFPN``.

and the fingerprints (no preset: the names load as they are, the camera backbone found
by ``prefix='auto'``) of detectron2 / DD3D files (``backbone.bottom_up.``), MMDetection3D
FCOS3D files and MMDetection Mask / Cascade R-CNN files (e.g. the nuImages ones).
"""
# The import order is the order in which identify tries the formats' fingerprints.
from .mit_bevfusion import MIT_BEVFUSION, MIT_BEVFUSION_RULES  # isort: skip
from .openpcdet import OPENPCDET, openpcdet_to_mmdet3d  # isort: skip
from .swin import SWIN_ORIGINAL, swin_original_to_mmdet  # isort: skip
from .cream import CREAM_EFFICIENTVIT, cream_to_backbone  # isort: skip
from .detectron2 import DETECTRON2_FINGERPRINT  # isort: skip
from .fcos3d import FCOS3D_FINGERPRINT  # isort: skip
from .rcnn import CASCADE_RCNN_FINGERPRINT, MASK_RCNN_FINGERPRINT  # isort: skip

__all__ = [
    'CREAM_EFFICIENTVIT', 'MIT_BEVFUSION', 'MIT_BEVFUSION_RULES', 'OPENPCDET', 'SWIN_ORIGINAL',
    'cream_to_backbone', 'openpcdet_to_mmdet3d', 'swin_original_to_mmdet'
]
