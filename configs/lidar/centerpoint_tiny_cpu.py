# A CenterPoint small enough to train on a CPU in seconds: MMDetection3D's own
# modules (CPU hard voxelization in ``Det3DDataPreprocessor``, ``HardSimpleVFE``,
# spconv 2.x ``SparseEncoder``, ``SECOND``, ``SECONDFPN``, ``CenterHead``) on a
# 25.6 m x 25.6 m x 4 m grid (128 x 128 x 40 voxels), read by MMDetection3D's
# ``NuScenesDataset`` from nuScenes-style info files (``data_list`` of
# ``lidar_points`` + ``instances``; 4-feature ``.bin`` point clouds).
#
# It is the CPU smoke test of the train -> checkpoint -> test workflow
# (tests/test_lidar_train_test.py); run it like any MMDetection3D config:
#   python tools/train.py configs/lidar/centerpoint_tiny_cpu.py \
#       --cfg-options data_root=... (or edit data_root below)
# On a CPU-only machine run with OMP_NUM_THREADS=1: spconv 2.3.8's CPU kernels
# race with several threads.
_base_ = ['mmdet3d::_base_/default_runtime.py']

point_cloud_range = [-12.8, -12.8, -3.0, 12.8, 12.8, 1.0]
voxel_size = [0.2, 0.2, 0.1]
grid_size = [128, 128, 40]  # (x, y, z) = range / voxel
class_names = ['car', 'pedestrian']
metainfo = dict(classes=class_names)
dataset_type = 'NuScenesDataset'
data_root = 'data/tiny_lidar/'
data_prefix = dict(pts='points', img='', sweeps='')
input_modality = dict(use_lidar=True, use_camera=False)
backend_args = None

model = dict(
    type='CenterPoint',
    data_preprocessor=dict(
        type='Det3DDataPreprocessor',
        voxel=True,
        voxel_type='hard',  # MMCV's Voxelization, which has a CPU kernel
        voxel_layer=dict(
            max_num_points=10,
            point_cloud_range=point_cloud_range,
            voxel_size=voxel_size,
            max_voxels=(16000, 16000))),
    pts_voxel_encoder=dict(type='HardSimpleVFE', num_features=4),
    pts_middle_encoder=dict(
        type='SparseEncoder',
        in_channels=4,
        sparse_shape=[41, 128, 128],  # (z, y, x), MMDetection3D's order
        output_channels=64,
        order=('conv', 'norm', 'act'),
        encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 64), (64, 64)),
        encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, [0, 1, 1]), (0, 0)),
        block_type='basicblock'),
    pts_backbone=dict(
        type='SECOND',
        in_channels=128,  # 64 channels x 2 height cells
        out_channels=[64, 128],
        layer_nums=[1, 1],
        layer_strides=[1, 2],
        norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01),
        conv_cfg=dict(type='Conv2d', bias=False)),
    pts_neck=dict(
        type='SECONDFPN',
        in_channels=[64, 128],
        out_channels=[64, 64],
        upsample_strides=[1, 2],
        norm_cfg=dict(type='BN', eps=1e-3, momentum=0.01),
        upsample_cfg=dict(type='deconv', bias=False),
        use_conv_for_no_stride=True),
    pts_bbox_head=dict(
        type='CenterHead',
        in_channels=128,
        tasks=[dict(num_class=2, class_names=class_names)],
        common_heads=dict(
            reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2), vel=(2, 2)),
        share_conv_channel=32,
        bbox_coder=dict(
            type='CenterPointBBoxCoder',
            pc_range=point_cloud_range[:2],
            post_center_range=[-15.0, -15.0, -5.0, 15.0, 15.0, 3.0],
            max_num=100,
            score_threshold=0.0,
            out_size_factor=8,
            voxel_size=voxel_size[:2],
            code_size=9),
        separate_head=dict(
            type='SeparateHead', init_bias=-2.19, final_kernel=3),
        loss_cls=dict(type='mmdet.GaussianFocalLoss', reduction='mean'),
        loss_bbox=dict(
            type='mmdet.L1Loss', reduction='mean', loss_weight=0.25),
        norm_bbox=True),
    train_cfg=dict(
        pts=dict(
            point_cloud_range=point_cloud_range,
            grid_size=grid_size,
            voxel_size=voxel_size,
            out_size_factor=8,
            dense_reg=1,
            gaussian_overlap=0.1,
            max_objs=50,
            min_radius=2,
            code_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2])),
    test_cfg=dict(
        pts=dict(
            pc_range=point_cloud_range[:2],
            post_center_limit_range=[-15.0, -15.0, -5.0, 15.0, 15.0, 3.0],
            max_per_img=50,
            max_pool_nms=False,
            min_radius=[4, 0.175],
            score_threshold=0.0,
            out_size_factor=8,
            voxel_size=voxel_size[:2],
            nms_type='rotate',
            pre_max_size=200,
            post_max_size=50,
            nms_thr=0.2)))

train_pipeline = [
    dict(
        type='LoadPointsFromFile',
        coord_type='LIDAR',
        load_dim=4,
        use_dim=4,
        backend_args=backend_args),
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    dict(type='PointShuffle'),
    dict(
        type='Pack3DDetInputs',
        keys=['points', 'gt_bboxes_3d', 'gt_labels_3d'])
]
test_pipeline = [
    dict(
        type='LoadPointsFromFile',
        coord_type='LIDAR',
        load_dim=4,
        use_dim=4,
        backend_args=backend_args),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='Pack3DDetInputs', keys=['points'])
]

train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='tiny_infos_train.pkl',
        pipeline=train_pipeline,
        metainfo=metainfo,
        modality=input_modality,
        data_prefix=data_prefix,
        test_mode=False,
        box_type_3d='LiDAR',
        backend_args=backend_args))
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='tiny_infos_val.pkl',
        pipeline=test_pipeline,
        metainfo=metainfo,
        modality=input_modality,
        data_prefix=data_prefix,
        test_mode=True,
        box_type_3d='LiDAR',
        backend_args=backend_args))
# MMDetection3D's nuScenes/KITTI metrics need the nuScenes database or KITTI's
# calibration files, and its IndoorMetric takes 7-parameter boxes only (CenterPoint
# predicts 9: with velocity). This config dumps the predictions with MMEngine's
# DumpResults; tests/test_lidar_train_test.py adds a 3-D AP metric.
test_evaluator = dict(
    type='DumpResults',
    out_file_path='work_dirs/centerpoint_tiny_cpu/predictions.pkl')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01),
    clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = []
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2)  # no validation during training
test_cfg = dict()

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False))
log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='Det3DLocalVisualizer', vis_backends=vis_backends, name='visualizer')
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
