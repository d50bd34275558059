# The tiny CPU CenterPoint started from a LiDAR checkpoint through FusionLoadHook:
# the LiDAR branch (pts_voxel_encoder, pts_middle_encoder, pts_backbone, pts_neck)
# is loaded from the checkpoint at run start (after init_weights and load_from),
# whatever its spconv kernel layout (spconv 2.x [out, *k, in] or MMCV/spconv 1.x
# [*k, in, out]) and with or without `_metadata`; the head keeps its initial weights.
# Point it at another file with
#   --cfg-options custom_hooks.0.sources.0.checkpoint=PATH
_base_ = ['./centerpoint_tiny_cpu.py']

custom_imports = dict(imports=['mmfusionload'], allow_failed_imports=False)
load_from = None
custom_hooks = [
    dict(
        type='FusionLoadHook',
        sources=[
            dict(
                modality='lidar',
                checkpoint='work_dirs/lidar_pretrained/lidar.pth'),
        ])
]
