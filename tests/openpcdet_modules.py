"""OpenPCDet-structured LiDAR backbones on spconv 2.x, built from OpenPCDet's published
structure (names, order, strides, paddings), for the preset's function tests."""
from functools import partial

import torch
import torch.nn as nn


def _spconv():
    import spconv.pytorch as spconv
    return spconv


def conv_block(cin, cout, k, indice_key, stride=1, padding=0, conv_type='subm', norm_fn=None):
    """``SparseSequential(conv, BN, ReLU)``: keys ``.0`` (conv, no bias) and ``.1`` (BN)."""
    sp = _spconv()
    if conv_type == 'subm':
        conv = sp.SubMConv3d(cin, cout, k, bias=False, indice_key=indice_key)
    else:
        conv = sp.SparseConv3d(cin, cout, k, stride=stride, padding=padding, bias=False,
                               indice_key=indice_key)
    return sp.SparseSequential(conv, norm_fn(cout), nn.ReLU())


def _subm_with_bias(conv, x):
    """``conv(x) + bias``: spconv 2.x on CPU refuses a bias inside the conv itself."""
    bias = conv.bias
    conv.bias = None
    try:
        out = conv(x)
    finally:
        conv.bias = bias
    return out.replace_feature(out.features + bias)


def basic_block_cls():
    sp = _spconv()

    class PcdetBasicBlock(sp.SparseModule):
        """Residual block; its SubM convs carry a bias (OpenPCDet's ``SparseBasicBlock``)."""

        def __init__(self, planes, norm_fn, indice_key):
            super().__init__()
            self.conv1 = sp.SubMConv3d(planes, planes, 3, padding=1, bias=True,
                                       indice_key=indice_key)
            self.bn1 = norm_fn(planes)
            self.relu = nn.ReLU()
            self.conv2 = sp.SubMConv3d(planes, planes, 3, padding=1, bias=True,
                                       indice_key=indice_key)
            self.bn2 = norm_fn(planes)

        def forward(self, x):
            out = _subm_with_bias(self.conv1, x)
            out = out.replace_feature(self.relu(self.bn1(out.features)))
            out = _subm_with_bias(self.conv2, out)
            out = out.replace_feature(self.bn2(out.features))
            return out.replace_feature(self.relu(out.features + x.features))

    return PcdetBasicBlock


class VoxelBackBone(nn.Module):
    """``VoxelBackBone8x`` (``res=False``) or ``VoxelResBackBone8x`` (``res=True``)."""

    def __init__(self, in_channels, sparse_shape, res=False):
        super().__init__()
        sp = _spconv()
        norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
        self.sparse_shape = sparse_shape
        self.conv_input = sp.SparseSequential(
            sp.SubMConv3d(in_channels, 16, 3, padding=1, bias=False, indice_key='subm1'),
            norm_fn(16), nn.ReLU())
        blk = partial(conv_block, norm_fn=norm_fn)
        c4 = 128 if res else 64
        if res:
            bb = basic_block_cls()
            self.conv1 = sp.SparseSequential(bb(16, norm_fn, 'res1'), bb(16, norm_fn, 'res1'))
            rest = [(16, 32, 1, 'res2'), (32, 64, 1, 'res3'), (64, c4, (0, 1, 1), 'res4')]
        else:
            self.conv1 = sp.SparseSequential(blk(16, 16, 3, padding=1, indice_key='subm1'))
            rest = [(16, 32, 1, 'subm2'), (32, 64, 1, 'subm3'), (64, c4, (0, 1, 1), 'subm4')]
        for n, (cin, cout, pad, key) in enumerate(rest, start=2):
            down = blk(cin, cout, 3, stride=2, padding=pad, indice_key=f'spconv{n}',
                       conv_type='spconv')
            if res:
                tail = [bb(cout, norm_fn, key), bb(cout, norm_fn, key)]
            else:
                tail = [blk(cout, cout, 3, padding=1, indice_key=key) for _ in range(2)]
            setattr(self, f'conv{n}', sp.SparseSequential(down, *tail))
        self.conv_out = sp.SparseSequential(
            sp.SparseConv3d(c4, 128, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                            indice_key='spconv_down2'),
            norm_fn(128), nn.ReLU())

    def forward(self, features, coords, batch_size):
        """Coordinates ``(batch, z, y, x)``; returns the height-compressed BEV map."""
        sp = _spconv()
        x = sp.SparseConvTensor(features, coords.int(), self.sparse_shape, batch_size)
        x = self.conv_input(x)
        for n in (1, 2, 3, 4):
            x = getattr(self, f'conv{n}')(x)
        dense = self.conv_out(x).dense()
        n, c, d, h, w = dense.shape
        return dense.view(n, c * d, h, w)


class BaseBEVBackbone(nn.Module):
    """``BaseBEVBackbone``: ZeroPad2d + conv(padding 0) per level, deconv per level."""

    def __init__(self, in_channels, layer_nums, layer_strides, num_filters,
                 upsample_strides, num_upsample_filters):
        super().__init__()
        bn = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
        c_in = [in_channels, *num_filters[:-1]]
        self.blocks, self.deblocks = nn.ModuleList(), nn.ModuleList()
        for i, n in enumerate(layer_nums):
            layers = [nn.ZeroPad2d(1), nn.Conv2d(c_in[i], num_filters[i], 3,
                                                 stride=layer_strides[i], padding=0,
                                                 bias=False), bn(num_filters[i]), nn.ReLU()]
            for _ in range(n):
                layers += [nn.Conv2d(num_filters[i], num_filters[i], 3, padding=1, bias=False),
                           bn(num_filters[i]), nn.ReLU()]
            self.blocks.append(nn.Sequential(*layers))
            s = upsample_strides[i]
            self.deblocks.append(nn.Sequential(
                nn.ConvTranspose2d(num_filters[i], num_upsample_filters[i], s, stride=s,
                                   bias=False), bn(num_upsample_filters[i]), nn.ReLU()))

    def forward(self, x):
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            ups.append(deblock(x))
        return torch.cat(ups, dim=1)


class PcdetDetector(nn.Module):
    """The parts of an OpenPCDet detector the preset reads, plus a dense head."""

    def __init__(self, sparse_shape, res=False):
        super().__init__()
        self.backbone_3d = VoxelBackBone(4, sparse_shape, res=res)
        d = 2  # height after conv_out for a 41-high grid
        self.backbone_2d = BaseBEVBackbone(128 * d, [1, 1], [1, 2], [16, 32], [1, 2], [16, 16])
        self.dense_head = nn.Module()
        self.dense_head.conv_cls = nn.Conv2d(32, 2, 1)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics (so that every tensor matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith('.weight') and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() > 1:  # conv kernels: unit gain over their fan-in
                fan_in = t.numel() // max(t.shape[0], t.shape[-1])
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model


def points(sparse_shape, n=300, seed=0):
    """Unique voxel coordinates ``(batch, z, y, x)`` and 4-channel features, 2 samples."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(0, 2, (n, ), generator=g)] +
                         [torch.randint(0, s, (n, ), generator=g) for s in sparse_shape], 1)
    coords = torch.unique(coords, dim=0)
    feats = torch.randn(len(coords), 4, generator=g)
    return feats, coords.int()


def save_like_openpcdet(model: nn.Module, path: str) -> None:
    """What OpenPCDet's ``save_checkpoint`` writes: the legacy (non-zip) format."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = dict(epoch=80, it=1234, model_state=model.state_dict(),
                 optimizer_state=opt.state_dict(), version='pcdet+0.6.0')
    torch.save(state, path, _use_new_zipfile_serialization=False)
