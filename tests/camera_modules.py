"""Small camera detectors for the 2-D backbone formats' tests: MMDetection3D's own FCOS3D
and nuImages Mask / Cascade R-CNN configs with few channels, and a VoVNet structured as
detectron2 / DD3D names it (``stem.stem_1/conv``, ``stage2.OSA2_1.layers.0.OSA2_1_0/conv``,
``concat.OSA2_1_concat/conv``, ``ese.fc``)."""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

MIM = 'mmdet3d/.mim/configs/'


def _configs() -> str:
    import os.path as osp

    import mmdet3d
    return osp.join(osp.dirname(osp.dirname(mmdet3d.__file__)), MIM)


def build_detector(name: str) -> nn.Module:
    """``'fcos3d'``, ``'mask-rcnn'`` or ``'cascade-mask-rcnn'`` from MMDetection3D's configs,
    backbone and heads shrunk (ResNet-50, 8 base channels, 32-channel FPN and heads)."""
    from mmengine import Config
    from mmdet3d.registry import MODELS
    from mmdet3d.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    root = _configs()
    files = dict(fcos3d='fcos3d/fcos3d_r101-caffe-dcn_fpn_head-gn_8xb2-1x_nus-mono3d.py',
                 **{'mask-rcnn': 'nuimages/mask-rcnn_r50_fpn_1x_nuim.py',
                    'cascade-mask-rcnn': 'nuimages/cascade-mask-rcnn_r50_fpn_1x_nuim.py'})
    cfg = Config.fromfile(root + files[name]).model
    cfg.pop('pretrained', None)
    cfg.backbone.update(depth=50, base_channels=8, init_cfg=None)
    cfg.neck.update(in_channels=[32, 64, 128, 256], out_channels=32)
    if name == 'fcos3d':
        cfg.bbox_head.update(in_channels=32, feat_channels=32)
    else:
        cfg.rpn_head.update(in_channels=32, feat_channels=32)
        roi = cfg.roi_head
        roi.bbox_roi_extractor.out_channels = 32
        roi.mask_roi_extractor.out_channels = 32
        heads = roi.bbox_head if isinstance(roi.bbox_head, list) else [roi.bbox_head]
        for h in heads:
            h.update(in_channels=32, fc_out_channels=32)
        roi.mask_head.update(in_channels=32, conv_out_channels=32)
    return MODELS.build(cfg)


def backbone_cfg(name: str) -> dict:
    """The shrunk detector's backbone config (for an ``img_backbone``)."""
    from mmengine import Config
    files = dict(fcos3d='fcos3d/fcos3d_r101-caffe-dcn_fpn_head-gn_8xb2-1x_nus-mono3d.py',
                 **{'mask-rcnn': 'nuimages/mask-rcnn_r50_fpn_1x_nuim.py'})
    cfg = Config.fromfile(_configs() + files[name]).model.backbone
    cfg.update(depth=50, base_channels=8, init_cfg=None)
    if '.' not in cfg.type:
        cfg.type = 'mmdet.' + cfg.type
    return cfg.to_dict()


class _ConvNormRelu(nn.Sequential):
    def __init__(self, prefix: str, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__(OrderedDict([
            (f'{prefix}/conv', nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)),
            (f'{prefix}/norm', nn.BatchNorm2d(cout)), (f'{prefix}/relu', nn.ReLU())]))


class _OSA(nn.Module):
    def __init__(self, cin: int, stage: int, ch: int, cout: int, block: int, layers: int = 3):
        super().__init__()
        name = f'OSA{stage}_{block}'
        self.layers = nn.ModuleList()
        c = cin
        for i in range(layers):
            self.layers.append(_ConvNormRelu(f'{name}_{i}', c, ch))
            c = ch
        self.concat = _ConvNormRelu(f'{name}_concat', cin + layers * ch, cout, k=1)
        self.ese = nn.Module()
        self.ese.fc = nn.Conv2d(cout, cout, 1)

    def forward(self, x):
        outs = [x]
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        x = self.concat(torch.cat(outs, 1))
        return x * F.hardsigmoid(self.ese.fc(F.adaptive_avg_pool2d(x, 1)))


class VoVNet(nn.Module):
    """A VoVNet (two OSA stages) under detectron2 / DD3D's module names."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ('stem_1', _ConvNormRelu('stem_1', 3, 8, stride=2)),
            ('stem_2', _ConvNormRelu('stem_2', 8, 8)),
            ('stem_3', _ConvNormRelu('stem_3', 8, 16, stride=2))]))
        self.stage2 = nn.Sequential(OrderedDict([('OSA2_1', _OSA(16, 2, 8, 16, 1))]))
        self.stage3 = nn.Sequential(OrderedDict([
            ('Pooling', nn.MaxPool2d(3, 2, ceil_mode=True)), ('OSA3_1', _OSA(16, 3, 8, 24, 1)),
            ('OSA3_2', _OSA(24, 3, 8, 24, 2))]))

    def forward(self, x):
        x = self.stem(x)
        c2 = self.stage2(x)
        return c2, self.stage3(c2)


class DD3D(nn.Module):
    """What a DD3D file holds: ``backbone.bottom_up`` in an FPN, and its heads."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = VoVNet()
        self.backbone.fpn_lateral3 = nn.Conv2d(24, 16, 1)
        self.backbone.fpn_output3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fcos2d_head = nn.Module()
        self.fcos2d_head.cls_logits = nn.Conv2d(16, 10, 3, padding=1)
        self.fcos3d_head = nn.Module()
        self.fcos3d_head.box3d_quat = nn.Conv2d(16, 4, 3, padding=1)
        self.register_buffer('pixel_mean', torch.tensor([103.5, 116.3, 123.7]))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, so that every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith('running_var') or (name.endswith('.weight') and t.dim() == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / (t[0].numel()) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model
