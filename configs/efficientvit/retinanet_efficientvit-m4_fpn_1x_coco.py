# RetinaNet with an EfficientViT-M4 backbone (Microsoft Cream, CVPR 2023) on COCO, 1x.
#
# The backbone's `init_cfg` takes the ImageNet release file of Cream as it is
# ({'model', 'model_ema', 'optimizer', ..., 'args'}, `head.*` dropped), an MMDetection
# detector checkpoint (`backbone.*` keys) or a bare state dict; stage-3 attention biases
# of the 224-px classification model (4x4 window) are resized bicubically to this
# backbone's 7x7 windows, and the load report is printed to the log.
#
#   python tools/train.py configs/efficientvit/retinanet_efficientvit-m4_fpn_1x_coco.py \
#       --cfg-options model.backbone.init_cfg.checkpoint=/path/to/efficientvit_m4.pth
#
# The RetinaNet, COCO, 1x schedule and runtime settings are MMDetection's own, inherited
# from the installed mmdet package through MMEngine's package scope (`mmdet::`).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmfusionload'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='EfficientViT',
        arch='m4',
        img_size=None,  # detection: 7x7 windows in every stage, any input size
        out_indices=(0, 1, 2),  # strides 16, 32, 64; channels 128, 256, 384
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained', checkpoint='pretrained/efficientvit_m4.pth')),
    neck=dict(
        in_channels=[128, 256, 384],
        out_channels=256,
        start_level=0,
        add_extra_convs='on_input',
        num_outs=5),  # P3'..P7' at strides 16, 32, 64, 128, 256
    bbox_head=dict(
        # The FPN levels are at strides 16..256 (not 8..128 as with ResNet), so the anchor
        # strides follow them; octave_base_scale 2 keeps RetinaNet's anchor sizes
        # (32 .. 512 px base sizes, as 4 x 8 .. 4 x 128 with ResNet-50).
        anchor_generator=dict(
            octave_base_scale=2, strides=[16, 32, 64, 128, 256])))

# Optimizer of Cream's EfficientViT detection configs: AdamW, lr 1e-4, weight decay
# 0.05, no weight decay on the attention biases (MMDetection 3.x syntax).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'attention_biases': dict(decay_mult=0.)}))
