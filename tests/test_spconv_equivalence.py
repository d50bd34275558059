"""spconv layout repair proven by forward equivalence on a real spconv 2.x SparseEncoder.

The MMCV-layout checkpoints here are written without this package: every kernel of the
encoder is turned into MMCV's ``[*k, in, out]`` by a plain permute, and that MMCV kernel
is proven, module by module, to compute what spconv computes with the original weight
(spconv's own forward against a dense ``torch.nn.functional.conv3d`` of the MMCV kernel
read as MMCV 2.1.0 reads it: ``weight[k]`` is the ``[in, out]`` matrix of offset ``k``).
"""
import copy
import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from builders import build, mmcv_sparse_copy, randomize, sparse_conv_names
from mmfusionload import load_sources

pytest.importorskip('spconv')

ENCODER = dict(type='SparseEncoder', in_channels=5, sparse_shape=[41, 48, 48],
               order=('conv', 'norm', 'act'),
               encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
               encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, (1, 1, 0)), (0, 0)),
               block_type='basicblock')


class Lidar(nn.Module):

    def __init__(self):
        super().__init__()
        self.pts_middle_encoder = build(ENCODER)


def voxels(seed=0, n=400, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    zyx = torch.stack([torch.randint(0, s, (n, ), generator=g) for s in (41, 48, 48)], 1)
    zyx = torch.unique(zyx, dim=0)
    coors = torch.cat([torch.zeros(len(zyx), 1, dtype=torch.long), zyx], 1).int()
    feats = torch.randn(len(zyx), 5, generator=g)
    return feats.to(device), coors.to(device)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def src():
    return randomize(Lidar(), seed=5).eval()


def _dense_check(module, kmm: torch.Tensor) -> None:
    """spconv's forward of ``module`` equals a dense F.conv3d with the MMCV kernel ``kmm``
    ``[*k, in, out]`` (as ``[out, in, *k]``), read at spconv's output sites."""
    import spconv.pytorch as spconv
    g = torch.Generator().manual_seed(11)
    grid = [7, 7, 7]
    allc = torch.tensor(list(itertools.product(*[range(e) for e in grid])))
    coords = allc[torch.rand(len(allc), generator=g) < 0.4]
    feats = torch.randn(len(coords), module.in_channels, generator=g, dtype=torch.float64)
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    with torch.no_grad():
        out = module(spconv.SparseConvTensor(feats.float(), idx, grid, 1))
    dense = torch.zeros(1, module.in_channels, *grid, dtype=torch.float64)
    dense[(0, slice(None), *coords.t())] = feats.t()
    tw = kmm.double().permute(4, 3, 0, 1, 2)
    if module.subm:
        pad = [k // 2 * d for k, d in zip(module.kernel_size, module.dilation)]
        y = F.conv3d(dense, tw, padding=pad, dilation=list(module.dilation))
    else:
        y = F.conv3d(dense, tw, stride=list(module.stride), padding=list(module.padding),
                     dilation=list(module.dilation))
    oc = out.indices[:, 1:].long()
    assert len(oc) > 0
    ref = y[(0, slice(None), *oc.t())].t()
    err = float((out.features.double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, (module, err)  # float32 rounding; a wrong kernel reading gives ~1


def mmcv_state(src: nn.Module) -> 'OrderedDict':
    """``src``'s state dict with its sparse kernels in MMCV's layout, by a plain permute
    ``[out, *k, in] -> [*k, in, out]`` each proven by :func:`_dense_check`."""
    from spconv.pytorch.conv import SparseConvolution
    sd = OrderedDict(src.state_dict())
    n = 0
    for name, m in src.named_modules():
        if isinstance(m, SparseConvolution):
            assert not m.conv1x1  # every kernel of this encoder takes the general path
            kmm = m.weight.detach().permute(1, 2, 3, 4, 0).contiguous()
            _dense_check(m, kmm)
            sd[f'{name}.weight'] = kmm
            n += 1
    assert n == 21
    return sd


def _ckpt(src, tmp_path, metadata):
    sd = mmcv_state(src)
    if metadata:
        sd._metadata = OrderedDict((n, {'version': 1}) for n in sparse_conv_names(src))
    path = tmp_path / f'mmcv_{metadata}.pth'
    torch.save({'state_dict': sd}, path)
    return str(path)


@pytest.mark.parametrize('metadata', [True, False])
def test_spconv2_encoder_from_mmcv_checkpoint_same_output(src, tmp_path, device, metadata):
    path = _ckpt(src, tmp_path, metadata)
    dst = randomize(Lidar(), seed=6).eval().to(device)
    report = load_sources(dst, [dict(modality='lidar', checkpoint=path)], logger=None)
    assert len(report.sources[0].adapted['spconv_layout']) == 21
    feats, coors = voxels(device=device)
    ref = copy.deepcopy(src).to(device)
    with torch.no_grad():
        a = ref.pts_middle_encoder(feats, coors, 1)
        b = dst.pts_middle_encoder(feats, coors, 1)
    assert a.abs().sum() > 0
    assert torch.equal(a, b)
    for k, v in dst.state_dict().items():
        assert v.device.type == torch.device(device).type
        assert v.is_contiguous()


def test_mmcv_model_gets_exactly_permuted_tensors(src, tmp_path, device):
    torch.save({'state_dict': src.state_dict()}, tmp_path / 'spconv2.pth')
    mm = mmcv_sparse_copy(Lidar()).to(device)
    names = sparse_conv_names(mm)
    assert len(names) == 21
    assert tuple(mm.state_dict()[names[0] + '.weight'].shape) == (3, 3, 3, 5, 16)
    load_sources(mm, [dict(modality='lidar', checkpoint=str(tmp_path / 'spconv2.pth'))],
                 logger=None)
    want = mmcv_state(src)
    got = mm.state_dict()
    for k in got:
        assert torch.equal(got[k].cpu(), want[k]), k


def test_ambiguous_layout_needs_option(tmp_path):
    import spconv.pytorch as spconv
    from mmfusionload import FusionLoadError

    class Cube(nn.Module):

        def __init__(self):
            super().__init__()
            self.pts_middle_encoder = spconv.SubMConv3d(3, 3, 3, bias=False)

    m, w = Cube(), torch.randn(3, 3, 3, 3, 3)
    torch.save({'pts_middle_encoder.weight': w}, tmp_path / 'cube.pth')
    before = m.pts_middle_encoder.weight.detach().clone()
    with pytest.raises(FusionLoadError, match="spconv_layout='spconv2' or 'mmcv'") as e:
        load_sources(m, [dict(modality='lidar', checkpoint=str(tmp_path / 'cube.pth'))],
                     logger=None)
    assert 'cube.pth' in str(e.value) and '[3, 3, 3, 3, 3]' in str(e.value)
    assert torch.equal(m.pts_middle_encoder.weight, before)
    load_sources(m, [dict(modality='lidar', checkpoint=str(tmp_path / 'cube.pth'),
                          spconv_layout='mmcv')], logger=None)
    assert torch.equal(m.pts_middle_encoder.weight, w.permute(4, 0, 1, 2, 3))
    load_sources(m, [dict(modality='lidar', checkpoint=str(tmp_path / 'cube.pth'),
                          spconv_layout='spconv2')], logger=None)
    assert torch.equal(m.pts_middle_encoder.weight, w)
