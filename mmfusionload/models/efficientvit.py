"""EfficientViT (Microsoft Cream, CVPR 2023) as an MMDetection 3.x backbone.

Module and parameter names follow Cream's classification model exactly, so its ImageNet
checkpoints (minus ``head.*``) and detector checkpoints map onto this backbone key by key.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Classification definitions of Cream (``classification/model/build.py``).
ARCH_SETTINGS: Dict[str, dict] = {
    'm0': dict(embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4),
               kernels=(5, 5, 5, 5)),
    'm1': dict(embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3),
               kernels=(7, 5, 3, 3)),
    'm2': dict(embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2),
               kernels=(7, 5, 3, 3)),
    'm3': dict(embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4),
               kernels=(5, 5, 5, 5)),
    'm4': dict(embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4),
               kernels=(7, 5, 3, 3)),
    'm5': dict(embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4),
               kernels=(7, 5, 3, 3)),
}
KEY_DIM = 16
WINDOW = 7
PATCH_SIZE = 16


def attention_bias_idxs(window: int) -> torch.LongTensor:
    """Index table of the relative-position attention biases of one window.

    Args:
        window (int): Window side ``w``.

    Returns:
        torch.LongTensor: ``[w*w, w*w]``; the entry of positions ``(y1, x1)`` and
        ``(y2, x2)`` (row-major) is ``|y1 - y2| * w + |x1 - x2|``.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return (dy * window + dx).long()


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class Conv2d_BN(nn.Sequential):
    """``Conv2d`` without bias followed by ``BatchNorm2d`` (names ``c``, ``bn``).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Kernel size. Defaults to 1.
        stride (int): Stride. Defaults to 1.
        padding (int): Padding. Defaults to 0.
        groups (int): Convolution groups. Defaults to 1.
        bn_weight_init (float): Initial BN weight (0 for residual branches). Defaults to 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, padding: int = 0, groups: int = 1,
                 bn_weight_init: float = 1.) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                           groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)


class Residual(nn.Module):
    """``x + m(x)``."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Tensor) -> Tensor:
        return x + self.m(x)


class FFN(nn.Module):
    """Pointwise feed-forward: Conv-BN 1×1 (ed → hidden), ReLU, Conv-BN 1×1 (→ ed)."""

    def __init__(self, ed: int, hidden: int) -> None:
        super().__init__()
        self.pw1 = Conv2d_BN(ed, hidden)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(hidden, ed, bn_weight_init=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-excite with hidden size ``make_divisible(channels / 4, 8)``."""

    def __init__(self, channels: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = make_divisible(channels * ratio, 8)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class PatchMerging(nn.Module):
    """Stride-2 downsampling ``in_dim → out_dim`` through an inverted residual with SE."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        hid = in_dim * 4
        self.conv1 = Conv2d_BN(in_dim, hid)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid)
        self.conv3 = Conv2d_BN(hid, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.conv3(self.se(x))


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over inputs of exactly ``window × window``.

    Args:
        dim (int): Channels ``ed``.
        num_heads (int): Heads ``h``; head ``i`` sees channel chunk ``i`` plus the output
            of head ``i - 1``.
        window (int): Window side ``w``; inputs must be ``w × w``.
        kernels (Sequence[int]): Depthwise kernel on the queries, per head.
        key_dim (int): Query/key channels per head. Defaults to 16.
    """

    def __init__(self, dim: int, num_heads: int, window: int, kernels: Sequence[int],
                 key_dim: int = KEY_DIM) -> None:
        super().__init__()
        self.key_dim = key_dim
        self.d = dim // num_heads
        self.scale = key_dim ** -0.5
        self.qkvs = nn.ModuleList(
            Conv2d_BN(dim // num_heads, 2 * key_dim + self.d) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            Conv2d_BN(key_dim, key_dim, k, 1, k // 2, groups=key_dim)
            for k in kernels[:num_heads])
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.d * num_heads, dim,
                                                       bn_weight_init=0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer('attention_bias_idxs', attention_bias_idxs(window))

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        biases = self.attention_biases[:, self.attention_bias_idxs]
        chunks = x.chunk(len(self.qkvs), dim=1)
        outs: List[Tensor] = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.d], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + biases[i]
            feat = (v @ attn.softmax(dim=-1).transpose(-2, -1)).view(B, self.d, H, W)
            outs.append(feat)
        return self.proj(torch.cat(outs, 1))


class LocalWindowAttention(nn.Module):
    """Attention in non-overlapping ``window × window`` windows.

    The map is padded on the bottom/right to a multiple of the window (a map smaller than
    the window becomes one padded window), partitioned, attended and cropped back. A map
    of exactly one window runs directly, as in Cream.
    """

    def __init__(self, dim: int, num_heads: int, window: int,
                 kernels: Sequence[int]) -> None:
        super().__init__()
        self.window = window
        self.attn = CascadedGroupAttention(dim, num_heads, window, kernels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        w = self.window
        if H == w and W == w:
            return self.attn(x)
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        x = F.pad(x, (0, pad_r, 0, pad_b))
        nH, nW = (H + pad_b) // w, (W + pad_r) // w
        # B C (nH w) (nW w) -> (B nH nW) C w w
        x = x.view(B, C, nH, w, nW, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, w, w)
        x = self.attn(x)
        x = x.view(B, nH, nW, C, w, w).permute(0, 3, 1, 4, 2, 5).reshape(
            B, C, nH * w, nW * w)
        return x[:, :, :H, :W].contiguous()


class EfficientViTBlock(nn.Module):
    """``dw0 → ffn0 → mixer → dw1 → ffn1``, each residual."""

    def __init__(self, ed: int, num_heads: int, window: int,
                 kernels: Sequence[int]) -> None:
        super().__init__()
        self.dw0 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0))
        self.ffn0 = Residual(FFN(ed, 2 * ed))
        self.mixer = Residual(LocalWindowAttention(ed, num_heads, window, kernels))
        self.dw1 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0))
        self.ffn1 = Residual(FFN(ed, 2 * ed))

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


def _dw_ffn(ed: int) -> nn.Sequential:
    """Residual depthwise 3×3 Conv-BN then residual FFN (around each PatchMerging)."""
    return nn.Sequential(Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed)),
                         Residual(FFN(ed, 2 * ed)))


@MODELS.register_module()
class EfficientViT(BaseModule):
    """EfficientViT M0–M5 backbone (Liu et al., CVPR 2023; Microsoft Cream).

    Parameter names equal Cream's classification model without ``head.*``. The variants
    use Cream's *classification* definitions; Cream's downstream M0 uses kernels
    ``(7, 5, 3, 3)`` instead of ``(5, 5, 5, 5)``, so the ImageNet M0 weights would not fit
    it, and we keep the classification values.

    Args:
        arch (str | dict): ``'m0'``–``'m5'`` (case-insensitive) or a dict with keys
            ``embed_dim``, ``depth``, ``num_heads`` (3 values each) and ``kernels``.
            Defaults to ``'m4'``.
        img_size (int, optional): ``224`` reproduces the classification model: stage
            windows are ``min(7, r)`` with stage resolutions ``r`` = 14, 7, 4 (stage-3
            ``attention_biases`` of shape ``[h, 16]``). ``None`` (detection): 7×7 windows
            in every stage, inputs of any size (padded to whole windows). Defaults to None.
        in_channels (int): Input channels. Defaults to 3.
        out_indices (Sequence[int]): Stages (0, 1, 2) whose outputs are returned; their
            strides are 16, 32, 64. Defaults to (0, 1, 2).
        frozen_stages (int): -1 freezes nothing, 0 ``patch_embed``, ``i`` also
            ``blocks1``..``blocks{i}``. Defaults to -1.
        norm_eval (bool): Keep BN layers in eval mode while training. Defaults to False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=...)`` loads
            through :func:`mmfusionload.load.pipeline.load_sources`. Defaults to None.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'm4',
                 img_size: Optional[int] = None,
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if isinstance(arch, str):
            if arch.lower() not in ARCH_SETTINGS:
                raise KeyError(f'Unknown EfficientViT arch {arch!r}; '
                               f'choose from {sorted(ARCH_SETTINGS)} or pass a dict')
            arch = ARCH_SETTINGS[arch.lower()]
        else:
            keys = {'embed_dim', 'depth', 'num_heads', 'kernels'}
            if set(arch) != keys:
                raise KeyError(f'arch dict needs exactly the keys {sorted(keys)}, '
                               f'got {sorted(arch)}')
        embed_dim, depth = tuple(arch['embed_dim']), tuple(arch['depth'])
        num_heads, kernels = tuple(arch['num_heads']), tuple(arch['kernels'])
        assert len(embed_dim) == len(depth) == len(num_heads) == 3
        assert all(len(kernels) >= h for h in num_heads)
        assert all(e % h == 0 for e, h in zip(embed_dim, num_heads))
        assert set(out_indices) <= {0, 1, 2}, f'bad out_indices {out_indices}'
        assert -1 <= frozen_stages <= 3, f'bad frozen_stages {frozen_stages}'
        self.arch = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         kernels=kernels)
        self.embed_dims = embed_dim
        self.img_size = img_size
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        if img_size is None:
            self.windows = (WINDOW,) * 3
        else:
            r, windows = img_size // PATCH_SIZE, []
            for _ in range(3):
                windows.append(min(WINDOW, r))
                r = (r - 1) // 2 + 1
            self.windows = tuple(windows)

        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_channels, e0 // 8, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 8, e0 // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 4, e0 // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 2, e0, 3, 2, 1))
        for i in range(3):
            layers: List[nn.Module] = []
            if i > 0:
                layers += [_dw_ffn(embed_dim[i - 1]),
                           PatchMerging(embed_dim[i - 1], embed_dim[i]),
                           _dw_ffn(embed_dim[i])]
            layers += [EfficientViTBlock(embed_dim[i], num_heads[i], self.windows[i], kernels)
                       for _ in range(depth[i])]
            self.add_module(f'blocks{i + 1}', nn.Sequential(*layers))
        self._freeze_stages()

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Args:
            x (Tensor): Images ``[N, C, H, W]``.

        Returns:
            tuple[Tensor]: The outputs of the stages in ``out_indices``, NCHW.
        """
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate((self.blocks1, self.blocks2, self.blocks3)):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _frozen_modules(self) -> List[nn.Module]:
        mods = [self.patch_embed] if self.frozen_stages >= 0 else []
        return mods + [getattr(self, f'blocks{i}') for i in range(1, self.frozen_stages + 1)]

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'EfficientViT':
        """Set train mode; frozen stages stay in eval, and with ``norm_eval`` all BN too."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=...)`` with the package
        loader (containers, prefixes and attention tables handled there); otherwise
        MMEngine's default initialisation.

        Other keys of the ``Pretrained`` dict are source options of
        :func:`~mmfusionload.load.pipeline.load_sources` (``prefer_ema=True``, ``strict``,
        ``exclude``...; unknown ones are an error). MMEngine's ``prefix='backbone.'``
        means: only the keys under that prefix, without it. ``map_location`` is
        accepted and ignored (tensors are read on CPU and copied into the live ones).
        """
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from mmfusionload.load.pipeline import load_sources
            load_sources(self, sources=[pretrained_source(cfg)])
            self._is_init = True
        else:
            super().init_weights()


def pretrained_source(init_cfg: dict) -> dict:
    """The :func:`~mmfusionload.load.pipeline.load_sources` source of a ``Pretrained`` init_cfg."""
    src = {k: v for k, v in init_cfg.items() if k not in ('type', 'map_location')}
    prefix = src.get('prefix')
    if isinstance(prefix, str) and prefix != 'auto':
        src['prefix'] = {prefix if prefix.endswith('.') else prefix + '.': ''}
    return src
