"""Test oracle: Cream's EfficientViT *classification* network, written from EFFICIENTVIT.md.

Independent of ``mmfusionload`` on purpose. It keeps the structure of Cream's
``classification/model/efficientvit.py``: every module knows its resolution, the attention
bias table is built from an offset dictionary, the window attention asserts its input size
and runs directly when ``H, W <= 7``, and ``forward_features`` returns the stage outputs.
"""
import itertools

import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = {
    'm0': dict(embed_dim=[64, 128, 192], depth=[1, 2, 3], num_heads=[4, 4, 4],
               kernels=[5, 5, 5, 5]),
    'm1': dict(embed_dim=[128, 144, 192], depth=[1, 2, 3], num_heads=[2, 3, 3],
               kernels=[7, 5, 3, 3]),
    'm2': dict(embed_dim=[128, 192, 224], depth=[1, 2, 3], num_heads=[4, 3, 2],
               kernels=[7, 5, 3, 3]),
    'm3': dict(embed_dim=[128, 240, 320], depth=[1, 2, 3], num_heads=[4, 3, 4],
               kernels=[5, 5, 5, 5]),
    'm4': dict(embed_dim=[128, 256, 384], depth=[1, 2, 3], num_heads=[4, 4, 4],
               kernels=[7, 5, 3, 3]),
    'm5': dict(embed_dim=[192, 288, 384], depth=[1, 3, 4], num_heads=[3, 3, 4],
               kernels=[7, 5, 3, 3]),
}


class Conv2d_BN(nn.Sequential):

    def __init__(self, a, b, ks=1, stride=1, pad=0, groups=1, bn_weight_init=1.):
        super().__init__()
        self.add_module('c', nn.Conv2d(a, b, ks, stride, pad, 1, groups, bias=False))
        self.add_module('bn', nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)


class BN_Linear(nn.Sequential):

    def __init__(self, a, b):
        super().__init__()
        self.add_module('bn', nn.BatchNorm1d(a))
        self.add_module('l', nn.Linear(a, b))
        nn.init.trunc_normal_(self.l.weight, std=.02)
        nn.init.constant_(self.l.bias, 0)


class Residual(nn.Module):

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class SE(nn.Module):
    """timm ``SEModule(channels, rd_ratio=0.25)``: hidden = make_divisible(C/4, 8)."""

    def __init__(self, channels):
        super().__init__()
        v = channels * 0.25
        rd = max(8, int(v + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.act = nn.ReLU(inplace=False)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.fc1(s)))
        return x * torch.sigmoid(s)


class PatchMerging(nn.Module):

    def __init__(self, dim, out_dim):
        super().__init__()
        hid = dim * 4
        self.conv1 = Conv2d_BN(dim, hid, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SE(hid)
        self.conv3 = Conv2d_BN(hid, out_dim, 1, 1, 0)

    def forward(self, x):
        x = self.conv1(x)
        x = self.act(x)
        x = self.conv2(x)
        x = self.act(x)
        x = self.se(x)
        return self.conv3(x)


class FFN(nn.Module):

    def __init__(self, ed, h):
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0.)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


class CascadedGroupAttention(nn.Module):

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution, kernels):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        qkvs, dws = [], []
        for i in range(num_heads):
            qkvs.append(Conv2d_BN(dim // num_heads, key_dim * 2 + self.d))
            dws.append(Conv2d_BN(key_dim, key_dim, kernels[i], 1, kernels[i] // 2,
                                 groups=key_dim))
        self.qkvs = nn.ModuleList(qkvs)
        self.dws = nn.ModuleList(dws)
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.d * num_heads, dim,
                                                       bn_weight_init=0.))
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets, idxs = {}, []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                if off not in offsets:
                    offsets[off] = len(offsets)
                idxs.append(offsets[off])
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer('attention_bias_idxs',
                             torch.LongTensor(idxs).view(len(points), len(points)))

    def forward(self, x):
        B, C, H, W = x.shape
        ab = self.attention_biases[:, self.attention_bias_idxs]
        feats_in = x.chunk(len(self.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        for i, qkv in enumerate(self.qkvs):
            if i > 0:
                feat = feat + feats_in[i]
            feat = qkv(feat)
            q, k, v = feat.view(B, -1, H, W).split([self.key_dim, self.key_dim, self.d], dim=1)
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + ab[i]
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.d, H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


class LocalWindowAttention(nn.Module):

    def __init__(self, dim, key_dim, num_heads, attn_ratio, resolution,
                 window_resolution, kernels):
        super().__init__()
        self.resolution = resolution
        self.window_resolution = window_resolution
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio,
                                           min(window_resolution, resolution), kernels)

    def forward(self, x):
        H = W = self.resolution
        B, C, H_, W_ = x.shape
        assert (H, W) == (H_, W_), f'expected {(H, W)}, got {(H_, W_)}'
        wr = self.window_resolution
        if H <= wr and W <= wr:
            return self.attn(x)
        x = x.permute(0, 2, 3, 1)
        pad_b = (wr - H % wr) % wr
        pad_r = (wr - W % wr) % wr
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // wr, pW // wr
        x = x.view(B, nH, wr, nW, wr, C).transpose(2, 3).reshape(B * nH * nW, wr, wr, C)
        x = self.attn(x.permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).view(B, nH, nW, wr, wr, C).transpose(2, 3)
        x = x.reshape(B, pH, pW, C)[:, :H, :W].contiguous()
        return x.permute(0, 3, 1, 2)


class EfficientViTBlock(nn.Module):

    def __init__(self, ed, kd, nh, ar, resolution, window_resolution, kernels):
        super().__init__()
        self.dw0 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.))
        self.ffn0 = Residual(FFN(ed, int(ed * 2)))
        self.mixer = Residual(LocalWindowAttention(ed, kd, nh, ar, resolution,
                                                   window_resolution, kernels))
        self.dw1 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.))
        self.ffn1 = Residual(FFN(ed, int(ed * 2)))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class CreamEfficientViT(nn.Module):
    """Classification EfficientViT (``img_size`` 224, ``patch_size`` 16, 1000 classes)."""

    def __init__(self, embed_dim, depth, num_heads, kernels, img_size=224, patch_size=16,
                 in_chans=3, num_classes=1000, key_dim=(16, 16, 16),
                 window_size=(7, 7, 7)):
        super().__init__()
        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, e0 // 8, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 8, e0 // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 4, e0 // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 2, e0, 3, 2, 1))
        resolution = img_size // patch_size
        attn_ratio = [embed_dim[i] / (key_dim[i] * num_heads[i]) for i in range(3)]
        stages = [[], [], []]
        for i in range(3):
            for _ in range(depth[i]):
                stages[i].append(EfficientViTBlock(embed_dim[i], key_dim[i], num_heads[i],
                                                   attn_ratio[i], resolution,
                                                   window_size[i], kernels))
            if i < 2:
                a, b = embed_dim[i], embed_dim[i + 1]
                stages[i + 1].append(nn.Sequential(
                    Residual(Conv2d_BN(a, a, 3, 1, 1, groups=a)),
                    Residual(FFN(a, int(a * 2)))))
                stages[i + 1].append(PatchMerging(a, b))
                resolution = (resolution - 1) // 2 + 1
                stages[i + 1].append(nn.Sequential(
                    Residual(Conv2d_BN(b, b, 3, 1, 1, groups=b)),
                    Residual(FFN(b, int(b * 2)))))
        self.blocks1 = nn.Sequential(*stages[0])
        self.blocks2 = nn.Sequential(*stages[1])
        self.blocks3 = nn.Sequential(*stages[2])
        self.head = BN_Linear(embed_dim[-1], num_classes)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x1 = self.blocks1(x)
        x2 = self.blocks2(x1)
        x3 = self.blocks3(x2)
        return x1, x2, x3

    def forward(self, x):
        x = self.forward_features(x)[-1]
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def build(arch):
    """Reference classification model of variant ``'m0'``..``'m5'``."""
    return CreamEfficientViT(**CONFIGS[arch])
