"""A small trainable BEVFusion-style model of real MMDetection3D/MMDetection/MMCV modules.

LiDAR: MMCV's CPU hard voxelization -> ``HardSimpleVFE`` -> spconv 2.x
``SparseEncoder`` -> ``SECOND`` -> ``SECONDFPN``; camera: MMDetection's
``ResNet``; ``fusion_layer``: Conv-BN-ReLU like BEVFusion's ``ConvFuser``.
The grid is small so a train step takes well under a second on CPU.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel

from builders import build

POINT_RANGE = [0, -6.4, -3, 12.8, 6.4, 5.2]
VOXEL = [0.2, 0.2, 0.2]
SPARSE_SHAPE = [41, 64, 64]  # (z, y, x), MMDetection3D's order


class TinyFusion(BaseModel):
    """BEVFusion's attribute names over a tiny grid."""

    def __init__(self):
        super().__init__()
        from mmcv.ops import Voxelization
        self.voxel_layer = Voxelization(VOXEL, POINT_RANGE, max_num_points=5, max_voxels=4000)
        self.pts_voxel_encoder = build(dict(type='HardSimpleVFE', num_features=4))
        self.pts_middle_encoder = build(dict(type='SparseEncoder', in_channels=4,
                                             sparse_shape=SPARSE_SHAPE, output_channels=64))
        self.pts_backbone = build(dict(type='SECOND', in_channels=128, out_channels=[32, 64],
                                       layer_nums=[1, 1], layer_strides=[1, 2]))
        self.pts_neck = build(dict(type='SECONDFPN', in_channels=[32, 64],
                                   out_channels=[32, 32], upsample_strides=[1, 2]))
        self.img_backbone = build(dict(type='mmdet.ResNet', depth=18, num_stages=4,
                                           out_indices=(3, ), norm_eval=False))
        self.fusion_layer = nn.Sequential(nn.Conv2d(64 + 512, 32, 1, bias=False),
                                          nn.BatchNorm2d(32), nn.ReLU(True))

    def extract(self, inputs: dict) -> torch.Tensor:
        voxels, coors, nums = [], [], []
        for i, pts in enumerate(inputs['points']):
            v, c, n = self.voxel_layer(pts)
            voxels.append(v)
            coors.append(F.pad(c, (1, 0), value=i))
            nums.append(n)
        voxels, coors, nums = torch.cat(voxels), torch.cat(coors), torch.cat(nums)
        feats = self.pts_voxel_encoder(voxels, nums, coors)
        bev = self.pts_middle_encoder(feats, coors, len(inputs['points']))
        bev = self.pts_neck(self.pts_backbone(bev))[0]
        img = self.img_backbone(torch.stack(inputs['img']))[-1]
        img = F.adaptive_avg_pool2d(img, bev.shape[-2:])
        return self.fusion_layer(torch.cat([bev, img], 1))

    def forward(self, inputs: dict, data_samples=None, mode: str = 'tensor'):
        x = self.extract(inputs)
        if mode == 'loss':
            return dict(loss=x.pow(2).mean())
        if mode == 'predict':
            return [dict(score=float(s)) for s in x.mean(dim=(1, 2, 3))]
        return x


class PointsDataset(torch.utils.data.Dataset):
    """Random points in the grid's range and a small image, fixed by seed."""

    def __init__(self, n: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        lo, hi = torch.tensor(POINT_RANGE[:3]), torch.tensor(POINT_RANGE[3:])
        self.items = []
        for _ in range(n):
            xyz = lo + torch.rand(600, 3, generator=g) * (hi - lo - 1e-3)
            pts = torch.cat([xyz, torch.rand(600, 1, generator=g)], 1)
            self.items.append(dict(inputs=dict(points=pts, img=torch.rand(3, 64, 64, generator=g)),
                                   data_samples=None))
        self.metainfo = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
