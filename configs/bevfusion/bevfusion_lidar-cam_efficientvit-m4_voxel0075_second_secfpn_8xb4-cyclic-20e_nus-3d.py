# BEVFusion (LiDAR + camera) with an EfficientViT-M4 image backbone instead of Swin-T.
#
# Inherits the Swin-T fusion config next to it (and through it MMDetection3D's own BEVFusion
# config from your source tree: set MMDET3D_ROOT as explained there), and runs the same way:
#
#   cd /path/to/mmdetection3d
#   MMDET3D_ROOT=$PWD python /path/to/mmfusionload/tools/train.py \
#       /path/to/mmfusionload/configs/bevfusion/<this file>
#
# Weights: FusionLoadHook loads the LiDAR-only BEVFusion checkpoint into the LiDAR branch
# and its TransFusion head (what upstream's `load_from` gives), and Cream's ImageNet release
# file `efficientvit_m4.pth` into the image backbone (`head.*` dropped, stage-3 attention
# biases resized 4x4 -> 7x7, index tables rebuilt); the report goes to the log and to
# <work_dir>/fusionload_report.json.
_base_ = ['./bevfusion_lidar-cam_swint_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py']

model = dict(
    img_backbone=dict(
        _delete_=True,
        type='mmdet.EfficientViT',
        arch='m4',
        img_size=None,  # 7x7 windows in every stage; 256x704 -> 16x44, 8x22, 4x11
        out_indices=(0, 1, 2),  # strides 16, 32, 64; channels 128, 256, 384
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),  # loaded by FusionLoadHook below
    # DepthLSSTransform concatenates the image features with its depth branch, which is at
    # stride 8 of the image (feature_size [32, 88] for 256x704); Swin-T's first output is at
    # stride 8, EfficientViT's at 16. GeneralizedLSSFPN keeps the stride of its first input,
    # so the neck here is SECONDFPN: each level is upsampled to stride 8 by a transposed
    # conv (as Cream's EfficientViTFPN adds transposed convs) and the levels are
    # concatenated: 128 + 64 + 64 = 256 channels = view_transform.in_channels.
    img_neck=dict(
        _delete_=True,
        type='SECONDFPN',
        in_channels=[128, 256, 384],
        out_channels=[128, 64, 64],
        upsample_strides=[2, 4, 8],
        norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01),
        upsample_cfg=dict(type='deconv', bias=False),
        use_conv_for_no_stride=True))

custom_hooks = [
    dict(
        type='FusionLoadHook',
        sources=[
            dict(
                modality=['lidar', 'head'],
                checkpoint='work_dirs/bevfusion_lidar_voxel0075_second_secfpn_'
                '8xb4-cyclic-20e_nus-3d/epoch_20.pth'),
            dict(modality='camera', checkpoint='pretrained/efficientvit_m4.pth'),
        ])
]
