"""Spatial axis order: a CenterPoint (z, y, x) SparseEncoder checkpoint into a BEVFusion
(x, y, z) encoder gives the same BEV features, with no option."""
import os

import pytest
import torch

from builders import build, randomize, snapshot
from mmfusionload import FusionLoadError, load_sources

pytest.importorskip('spconv')

SHAPE_ZYX = [41, 24, 24]
# MMDetection3D's CenterPoint nuScenes config (centerpoint_voxel0075_second_secfpn), small grid
CENTERPOINT = dict(
    type='SparseEncoder', in_channels=5, sparse_shape=SHAPE_ZYX, output_channels=128,
    order=('conv', 'norm', 'act'),
    encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
    encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, [0, 1, 1]), (0, 0)),
    block_type='basicblock')


def bevfusion_encoder():
    """BEVFusion's LiDAR encoder: the real class when ``MMDET3D_ROOT`` is set, else the
    same structure from mmdet3d's SparseEncoder (x, y, z sparse_shape, paddings (1, 1, 0),
    conv_out (1, 1, 3) stride (1, 1, 2)) with BEVFusion's output transpose."""
    cfg = dict(CENTERPOINT, sparse_shape=SHAPE_ZYX[::-1],
               encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, [1, 1, 0]), (0, 0)))
    root = os.environ.get('MMDET3D_ROOT')
    if root and os.path.isdir(os.path.join(root, 'projects', 'BEVFusion')):
        import sys
        sys.path.insert(0, root)
        from projects.BEVFusion.bevfusion.sparse_encoder import BEVFusionSparseEncoder
        cfg.pop('type')
        return BEVFusionSparseEncoder(**cfg)
    from mmfusionload.cli.demo import _bevfusion_sparse_encoder
    cfg.pop('type')
    enc = _bevfusion_sparse_encoder(**cfg)

    def forward(voxel_features, coors, batch_size):
        import spconv.pytorch as spconv
        x = spconv.SparseConvTensor(voxel_features, coors.int(), enc.sparse_shape, batch_size)
        x = enc.conv_input(x)
        for layer in enc.encoder_layers:
            x = layer(x)
        dense = enc.conv_out(x).dense()
        n, c, h, w, d = dense.shape  # (x, y, z): BEV is (C * D, X, Y)
        return dense.permute(0, 1, 4, 2, 3).contiguous().view(n, c * d, h, w)

    enc.forward = forward
    return enc


pytestmark = pytest.mark.usefixtures('one_thread')


def points(seed=0, n=500):
    g = torch.Generator().manual_seed(seed)
    zyx = torch.unique(torch.stack([torch.randint(0, s, (n, ), generator=g)
                                    for s in SHAPE_ZYX], 1), dim=0)
    coors = torch.cat([torch.zeros(len(zyx), 1, dtype=torch.long), zyx], 1).int()
    return torch.randn(len(zyx), 5, generator=g), coors


class Holder(torch.nn.Module):

    def __init__(self, enc):
        super().__init__()
        self.pts_middle_encoder = enc


@pytest.fixture(scope='module')
def centerpoint(tmp_path_factory):
    src = Holder(randomize(build(CENTERPOINT), seed=3)).eval()
    path = tmp_path_factory.mktemp('cp') / 'centerpoint.pth'
    torch.save({'state_dict': src.state_dict(), 'meta': {}}, path)
    return src, str(path)


def test_centerpoint_into_bevfusion_same_bev_features(centerpoint):
    src, path = centerpoint
    dst = Holder(randomize(bevfusion_encoder(), seed=4)).eval()
    report = load_sources(dst, [dict(modality='lidar', checkpoint=path)], logger=None)
    s = report.sources[0]
    assert len(s.adapted['axis_order']) == 21 and not s.mismatched
    assert s.verified == 21 and s.verify_error < 1e-5
    feats, coors = points()
    with torch.no_grad():
        a = src.pts_middle_encoder(feats, coors, 1)                    # (C*D, Y, X)
        b = dst.pts_middle_encoder(feats, coors[:, [0, 3, 2, 1]], 1)   # (C*D, X, Y)
    assert a.shape == b.transpose(-1, -2).shape and a.abs().sum() > 0
    # equal up to float32 summation order (kernel offsets are visited in another order)
    err = (b.transpose(-1, -2) - a).abs().max() / a.abs().max()
    assert err < 1e-5, err


def test_excluding_the_anisotropic_kernel_still_reorders(centerpoint):
    """exclude=['conv_out'] leaves only cube kernels to load; the file's conv_out still
    tells the order, so the cubes are reordered, not loaded the wrong way round."""
    src, path = centerpoint
    dst = Holder(bevfusion_encoder())
    report = load_sources(dst, [dict(modality='lidar', checkpoint=path,
                                     exclude=['conv_out'])], logger=None)
    assert len(report.sources[0].adapted['axis_order']) == 20
    w_src = src.pts_middle_encoder.conv_input[0].weight       # [16, z, y, x, 5]
    w_dst = dst.pts_middle_encoder.conv_input[0].weight       # [16, x, y, z, 5]
    assert torch.equal(w_dst, w_src.permute(0, 3, 2, 1, 4))


def test_explicit_order_contradicting_the_kernels_names_axis_order(centerpoint):
    _, path = centerpoint
    dst = Holder(bevfusion_encoder())
    before = snapshot(dst)
    with pytest.raises(FusionLoadError, match='spatial_order') as e:
        load_sources(dst, [dict(modality='lidar', checkpoint=path, spatial_order='xyz')],
                     logger=None)
    assert 'conv_out' in str(e.value) and 'centerpoint.pth' in str(e.value)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())


def test_order_undecidable_is_an_axis_order_error(tmp_path):
    """Cube kernels only, and a model whose order nothing tells: an explicit spatial_order
    cannot be applied."""
    import spconv.pytorch as spconv

    class Cube(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.enc = spconv.SubMConv3d(4, 8, 3)

    torch.save(Cube().state_dict(), tmp_path / 'cube.pth')
    with pytest.raises(FusionLoadError, match='axis order'):
        load_sources(Cube(), [dict(checkpoint=str(tmp_path / 'cube.pth'), spatial_order='zyx')],
                     logger=None)
    # without the option nothing says the orders differ: loaded as it is
    m = Cube()
    saved = torch.load(tmp_path / 'cube.pth', weights_only=True)
    report = load_sources(m, [dict(checkpoint=str(tmp_path / 'cube.pth'))], logger=None)
    assert 'axis_order' not in report.sources[0].adapted
    assert torch.equal(m.enc.weight.detach(), saved['enc.weight'])
    assert torch.equal(m.enc.bias.detach(), saved['enc.bias'])


def test_live_order_of_both_conventions():
    from mmfusionload.sparse.axis_order import live_order
    assert live_order(build(CENTERPOINT))[0] == 'zyx'
    assert live_order(bevfusion_encoder())[0] == 'xyz'


def test_order_from_the_checkpoint_config_when_kernels_cannot_tell(centerpoint, tmp_path):
    """Without conv_out in the file only cubes remain; the sparse_shape in the
    checkpoint's meta['cfg'] (what MMEngine's Runner saves) still tells (z, y, x)."""
    src, _ = centerpoint
    sd = {k: v for k, v in src.state_dict().items() if '.conv_out.' not in k}
    cfg = ("model = dict(pts_middle_encoder=dict(type='SparseEncoder', "
           "sparse_shape=[41, 1440, 1440]))")
    torch.save({'state_dict': sd, 'meta': {'cfg': cfg}}, tmp_path / 'cp.pth')
    dst = Holder(bevfusion_encoder())
    report = load_sources(dst, [dict(modality='lidar', checkpoint=str(tmp_path / 'cp.pth'),
                                     exclude=['conv_out'])], logger=None)
    assert len(report.sources[0].adapted['axis_order']) == 20
    w_src = src.pts_middle_encoder.conv_input[0].weight
    assert torch.equal(dst.pts_middle_encoder.conv_input[0].weight, w_src.permute(0, 3, 2, 1, 4))


@pytest.mark.parametrize('option', ['zyx', 'xyz'])
def test_explicit_order_decides_when_the_kernels_cannot_tell(centerpoint, tmp_path, option):
    """Cube kernels only (no conv_out in the file, no config in its meta): the user's
    spatial_order alone decides. 'zyx' into BEVFusion's x-y-z encoder reverses every
    kernel's spatial axes, and the loaded conv_input computes, on the reversed grid,
    what the CenterPoint one computes (both run by spconv); 'xyz' loads them as they are."""
    src, _ = centerpoint
    sd = {k: v for k, v in src.state_dict().items() if '.conv_out.' not in k}
    torch.save({'state_dict': sd, 'meta': {}}, tmp_path / 'cubes.pth')
    dst = Holder(bevfusion_encoder()).eval()
    report = load_sources(dst, [dict(modality='lidar', checkpoint=str(tmp_path / 'cubes.pth'),
                                     exclude=['conv_out'], spatial_order=option)],
                          logger=None)
    s = report.sources[0]
    kernels = [k for k in sd if k.endswith('.weight') and sd[k].dim() == 5]
    assert len(kernels) == 20
    got = dst.state_dict()
    if option == 'xyz':
        assert 'axis_order' not in s.adapted
        assert all(torch.equal(got[k], sd[k]) for k in kernels)
        return
    assert len(s.adapted['axis_order']) == 20
    assert all(torch.equal(got[k], sd[k].permute(0, 3, 2, 1, 4)) for k in kernels)
    import spconv.pytorch as spconv
    feats, coors = points()
    with torch.no_grad():
        a = src.pts_middle_encoder.conv_input(
            spconv.SparseConvTensor(feats, coors, SHAPE_ZYX, 1))
        b = dst.pts_middle_encoder.conv_input(
            spconv.SparseConvTensor(feats, coors[:, [0, 3, 2, 1]], SHAPE_ZYX[::-1], 1))
    assert torch.equal(a.indices[:, [0, 3, 2, 1]], b.indices) and a.features.abs().sum() > 0
    torch.testing.assert_close(b.features, a.features, rtol=1e-5, atol=1e-5)


def test_centerpoint_into_an_mmcv_bevfusion_encoder_is_verified_without_definitions(
        centerpoint):
    """z-y-x spconv 2.x kernels into MMCV x-y-z convs: layout and axis order both change;
    verify runs the CenterPoint kernels in spconv and reads MMCV's kernels densely, and the
    stored MMCV kernels are the spconv ones as [x, y, z, in, out]."""
    from builders import mmcv_sparse_copy
    src, path = centerpoint
    dst = mmcv_sparse_copy(Holder(bevfusion_encoder()))
    report = load_sources(dst, [dict(modality='lidar', checkpoint=path)], logger=None)
    s = report.sources[0]
    assert len(s.adapted['axis_order']) == len(s.adapted['spconv_layout']) == 21
    assert s.verified == 21 and s.verify_error < 1e-5
    w_src = src.pts_middle_encoder.conv_input[0].weight           # [16, z, y, x, 5]
    w_dst = dst.pts_middle_encoder.conv_input[0].weight           # [x, y, z, 5, 16]
    assert torch.equal(w_dst, w_src.permute(3, 2, 1, 4, 0))
