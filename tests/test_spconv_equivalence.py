"""spconv layout repair proven by forward equivalence on a real spconv 2.x SparseEncoder."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from builders import build, mmcv_sparse_copy, randomize, sparse_conv_names, to_mmcv_layout
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


def _ckpt(src, tmp_path, metadata):
    sd = to_mmcv_layout(src.state_dict(), src)
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
    want = to_mmcv_layout(src.state_dict(), src)
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
