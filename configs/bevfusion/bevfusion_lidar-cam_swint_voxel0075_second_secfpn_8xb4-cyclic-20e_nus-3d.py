# BEVFusion (LiDAR + camera, Swin-T) with MMDetection3D's published two-checkpoint
# recipe as one FusionLoadHook, instead of
#   --cfg-options load_from=<LiDAR run> model.img_backbone.init_cfg.checkpoint=<Swin-T>
# At run start (after init_weights, before the first iteration) the hook loads
#   - the LiDAR-only BEVFusion checkpoint into the LiDAR branch (pts_voxel_encoder,
#     pts_middle_encoder, pts_backbone, pts_neck) and the TransFusion head (bbox_head),
#     which is what `load_from` gave (the LiDAR run has no camera branch or fuser);
#   - the nuImages Swin-T checkpoint into the camera branch: the key prefix is detected
#     (e.g. a detector's `backbone.` -> `img_backbone.`); what matches no camera module
#     (a detector's FPN, heads) is left out, and img_neck / view_transform keep their
#     initial weights unless the file has them. If the file turns out to have Microsoft's
#     original Swin names, add preset='swin-original' to that source.
# Sparse-conv kernels are repaired whatever their layout (spconv 2.x or MMCV/spconv 1.x,
# with or without `_metadata`); nothing is reported missing for the camera branch; the
# report goes to the log and to <work_dir>/fusionload_report.json; a bad file, key or
# shape stops the run before the first iteration with the model untouched.
#
# Inherits MMDetection3D's own BEVFusion config from your MMDetection3D source tree
# (`projects/` is not in the mmdet3d wheel). Set MMDET3D_ROOT to that tree as an
# ABSOLUTE path: MMEngine substitutes `{{$VAR:default}}` before it reads `_base_` and
# joins a relative result to the folder of *this file*, not to the working directory;
# the default, `../../../mmdetection3d`, is a checkout next to this repository.
# Run from the MMDetection3D root (its `projects.BEVFusion` must be importable):
#
#   cd /path/to/mmdetection3d
#   MMDET3D_ROOT=$PWD python /path/to/mmfusionload/tools/train.py \
#       /path/to/mmfusionload/configs/bevfusion/<this file>
#
# Other checkpoint files:
#   --cfg-options custom_hooks.0.sources.0.checkpoint=LIDAR.pth \
#                 custom_hooks.0.sources.1.checkpoint=SWINT.pth
_base_ = [
    '{{$MMDET3D_ROOT:../../../mmdetection3d}}/projects/BEVFusion/configs/'
    'bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py'
]
custom_imports = dict(
    imports=['projects.BEVFusion.bevfusion', 'mmfusionload'],
    allow_failed_imports=False)

# Both checkpoints come from the hook below, not from `load_from` or `init_cfg`.
load_from = None
model = dict(img_backbone=dict(init_cfg=None))

custom_hooks = [
    dict(
        type='FusionLoadHook',
        sources=[
            # the LiDAR-only run's last checkpoint (tools/train.py's default
            # work_dir for the upstream LiDAR config), or MMDetection3D's release
            # bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d-2628f933.pth
            dict(
                modality=['lidar', 'head'],
                checkpoint='work_dirs/bevfusion_lidar_voxel0075_second_secfpn_'
                '8xb4-cyclic-20e_nus-3d/epoch_20.pth'),
            # https://download.openmmlab.com/mmdetection3d/v1.1.0_models/bevfusion/
            # swint-nuimages-pretrained.pth
            dict(
                modality='camera',
                checkpoint='pretrained/swint-nuimages-pretrained.pth'),
        ])
]
