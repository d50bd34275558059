# BEVFusion (LiDAR + camera, Swin-T) started from an original mit-han-lab BEVFusion
# checkpoint (e.g. their `bevfusion-det.pth`), loaded as it is: the `mit-bevfusion`
# preset renames its modules (encoders.camera.* -> img_backbone/img_neck/
# view_transform, encoders.lidar.backbone -> pts_middle_encoder, fuser ->
# fusion_layer, decoder.* -> pts_backbone/pts_neck, heads.object -> bbox_head, the
# TransFusion decoder's PyTorch attention/FFN/norm names -> MMCV's) and its spconv 1.x
# sparse kernels ([*k, in, out]) are permuted for spconv 2.x. The whole model is loaded;
# the report goes to the log and to <work_dir>/fusionload_report.json.
# Use it to fine-tune from the original weights; to only evaluate them, convert the
# file once (`mmfusionload convert ... --preset mit-bevfusion`) and test the upstream
# config with the converted checkpoint.
#
# Inherits the Swin-T fusion config next to it (and through it MMDetection3D's own BEVFusion
# config from your source tree: set MMDET3D_ROOT as explained there) and replaces its hook:
#
#   cd /path/to/mmdetection3d
#   MMDET3D_ROOT=$PWD python /path/to/mmfusionload/tools/train.py \
#       /path/to/mmfusionload/configs/bevfusion/<this file>
#
# Another file: --cfg-options custom_hooks.0.sources.0.checkpoint=PATH
_base_ = ['./bevfusion_lidar-cam_swint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py']

custom_hooks = [
    dict(
        type='FusionLoadHook',
        sources=[
            dict(checkpoint='pretrained/bevfusion-det.pth', preset='mit-bevfusion'),
        ])
]
