"""Point features by name, proven by function against the module that saved the checkpoint.

A KITTI-style 4-feature (x, y, z, intensity) checkpoint into a 5-feature nuScenes-style
(..., time) model: the loaded module computes the source's output for any value of
time. The reverse: the loaded 4-feature module computes the 5-feature source's output on
points whose time is 0. Real modules: MMDetection3D's ``SparseEncoder`` (BEVFusion's
subclass when ``MMDET3D_ROOT`` names a checkout), ``PillarFeatureNet``, ``HardVFE``.
"""
import pytest
import torch

from builders import build, randomize, to_mmcv_layout
from mmfusionload import FusionLoadError, load_sources
from mmfusionload.load.features import adapt_columns, describe, feature_pair

pytest.importorskip('spconv')
pytestmark = pytest.mark.usefixtures('one_thread')

KITTI, NUSCENES = 'kitti', 'nuscenes'
SHAPE = [41, 16, 16]


class Holder(torch.nn.Module):

    def __init__(self, **parts):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)


def encoder(n):
    return build(dict(type='SparseEncoder', in_channels=n, sparse_shape=SHAPE,
                      output_channels=8, order=('conv', 'norm', 'act'),
                      encoder_channels=((4, ), (8, 8), (8, 8), (8, 8)),
                      encoder_paddings=((0, ), (0, 0), (0, 0), ((0, 1, 1), 0)),
                      block_type='conv_module')).eval()


def voxels(n_features, seed=0, n=120):
    g = torch.Generator().manual_seed(seed)
    zyx = torch.unique(torch.stack([torch.randint(0, s, (n, ), generator=g) for s in SHAPE],
                                   1), dim=0)
    coors = torch.cat([torch.zeros(len(zyx), 1, dtype=torch.long), zyx], 1).int()
    return torch.randn(len(zyx), n_features, generator=g), coors


def save(tmp_path, model, name='src.pth', mmcv=False):
    state = model.state_dict()
    if mmcv:
        state = to_mmcv_layout(state, model)
    path = tmp_path / name
    torch.save({'state_dict': state, 'meta': {}}, path)
    return str(path)


@pytest.mark.parametrize('mmcv', [False, True], ids=['spconv2-file', 'mmcv-file'])
def test_sparse_encoder_kitti_into_nuscenes_any_time(tmp_path, mmcv):
    src = Holder(pts_middle_encoder=randomize(encoder(4), seed=1)).eval()
    dst = Holder(pts_middle_encoder=randomize(encoder(5), seed=2)).eval()
    report = load_sources(dst, [dict(checkpoint=save(tmp_path, src, mmcv=mmcv),
                                     modules=['pts_middle_encoder'],
                                     point_features=dict(checkpoint=KITTI, model=NUSCENES))],
                          logger=None)
    s = report.sources[0]
    assert s.adapted['point_features'] == ['pts_middle_encoder.conv_input.0.weight']
    assert 'added time: zero weights' in s.features[0], s.features
    feats, coors = voxels(4)
    with torch.no_grad():
        want = src.pts_middle_encoder(feats, coors, 1)
        for time in (torch.zeros(len(feats), 1), torch.randn(len(feats), 1) * 5):
            got = dst.pts_middle_encoder(torch.cat([feats, time], 1), coors, 1)
            assert want.abs().sum() > 0
            assert torch.allclose(got, want, atol=1e-5), \
                f'conv_input: output depends on the added feature time ({(got - want).abs().max()})'


def test_sparse_encoder_nuscenes_into_kitti_equal_where_time_is_zero(tmp_path):
    src = Holder(pts_middle_encoder=randomize(encoder(5), seed=3)).eval()
    dst = Holder(pts_middle_encoder=randomize(encoder(4), seed=4)).eval()
    report = load_sources(dst, [dict(checkpoint=save(tmp_path, src),
                                     modules=['pts_middle_encoder'],
                                     point_features=(NUSCENES, KITTI))], logger=None)
    assert 'dropped time: equal on points whose time is 0' in report.sources[0].features[0]
    feats, coors = voxels(4, seed=1)
    with torch.no_grad():
        want = src.pts_middle_encoder(torch.cat([feats, torch.zeros(len(feats), 1)], 1),
                                      coors, 1)
        got = dst.pts_middle_encoder(feats, coors, 1)
    assert torch.allclose(got, want, atol=1e-5), 'conv_input: differs where time is 0'


@pytest.mark.parametrize('ckpt,model', [(KITTI, NUSCENES), (NUSCENES, KITTI)])
def test_bevfusion_sparse_encoder_kitti_and_nuscenes(tmp_path, ckpt, model):
    """BEVFusion's own LiDAR encoder class (from an MMDetection3D checkout): a 4-feature
    checkpoint into its 5-feature branch (any time), and the reverse (where time is 0)."""
    from bevfusion_modules import project_module
    cls = project_module('sparse_encoder').BEVFusionSparseEncoder

    def bev(n):
        return cls(in_channels=n, sparse_shape=SHAPE[::-1], output_channels=8,
                   order=('conv', 'norm', 'act'),
                   encoder_channels=((4, ), (8, 8), (8, 8), (8, 8)),
                   encoder_paddings=((0, ), (0, 0), (0, 0), ((1, 1, 0), 0)),
                   block_type='conv_module').eval()
    n_src, n_dst = (4, 5) if ckpt == KITTI else (5, 4)
    src = Holder(pts_middle_encoder=randomize(bev(n_src), seed=5)).eval()
    dst = Holder(pts_middle_encoder=randomize(bev(n_dst), seed=6)).eval()
    load_sources(dst, [dict(checkpoint=save(tmp_path, src), modules=['pts_middle_encoder'],
                            point_features=dict(checkpoint=ckpt, model=model))],
                 logger=None)
    feats, coors = voxels(4, seed=2)
    coors = coors[:, [0, 3, 2, 1]]  # BEVFusion's encoder takes (x, y, z)
    time = torch.rand(len(feats), 1)
    with torch.no_grad():
        if ckpt == KITTI:  # any time
            want = src.pts_middle_encoder(feats, coors, 1)
            got = dst.pts_middle_encoder(torch.cat([feats, time], 1), coors, 1)
        else:  # where time is 0
            want = src.pts_middle_encoder(torch.cat([feats, 0 * time], 1), coors, 1)
            got = dst.pts_middle_encoder(feats, coors, 1)
    assert want.abs().sum() > 0
    assert torch.allclose(got, want, atol=1e-5), f'{ckpt} -> {model}: conv_input'


VFE = dict(
    PillarFeatureNet=dict(type='PillarFeatureNet', feat_channels=(8, ), with_distance=True,
                          voxel_size=(0.5, 0.5, 4), point_cloud_range=(0, 0, -2, 8, 8, 2)),
    HardVFE=dict(type='HardVFE', feat_channels=(8, 8), with_distance=True,
                 with_cluster_center=True, with_voxel_center=True, voxel_size=(0.5, 0.5, 4),
                 point_cloud_range=(0, 0, -2, 8, 8, 2), norm_cfg=dict(type='BN1d')),
)


def pillars(n_features, seed=0, n=10, m=6):
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(1, m + 1, (n, ), generator=g)
    feats = torch.rand(n, m, n_features, generator=g) * 8
    feats *= (torch.arange(m)[None, :] < num[:, None])[..., None]
    coors = torch.stack([torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                         torch.randint(0, 16, (n, ), generator=g),
                         torch.randint(0, 16, (n, ), generator=g)], 1).int()
    return feats, num, coors


@pytest.mark.parametrize('kind', sorted(VFE))
@pytest.mark.parametrize('ckpt,model', [(KITTI, NUSCENES), (NUSCENES, KITTI),
                                        (KITTI, 'waymo')])
def test_point_feature_layers_by_name(tmp_path, kind, ckpt, model):
    names = feature_pair((ckpt, model))
    src_n, dst_n = len(names['checkpoint']), len(names['model'])
    src = Holder(pts_voxel_encoder=randomize(build(dict(VFE[kind], in_channels=src_n)),
                                             seed=7)).eval()
    dst = Holder(pts_voxel_encoder=randomize(build(dict(VFE[kind], in_channels=dst_n)),
                                             seed=8)).eval()
    report = load_sources(dst, [dict(checkpoint=save(tmp_path, src), modules=['pts_voxel_encoder'],
                                     point_features=dict(checkpoint=ckpt, model=model))],
                          logger=None)
    assert report.sources[0].adapted['point_features'], report.sources[0].adapted
    feats, num, coors = pillars(4)
    extra = torch.rand(*feats.shape[:2], 1) * 3 * (feats[..., :1] != 0)
    src_in = torch.cat([feats, torch.zeros_like(extra)], -1) if src_n == 5 else feats
    dst_in = torch.cat([feats, extra], -1) if dst_n == 5 else feats
    with torch.no_grad():
        want = src.pts_voxel_encoder(src_in.clone(), num, coors)
        got = dst.pts_voxel_encoder(dst_in.clone(), num, coors)
    assert want.abs().sum() > 0
    assert torch.allclose(got, want, atol=1e-5), \
        f'{kind} first layer: {describe(names["checkpoint"], names["model"])} does not hold'


def test_adapt_columns_moves_named_columns_and_keeps_decorations():
    w = torch.arange(2 * 7, dtype=torch.float32).view(2, 7)  # 4 raw + 3 decorations
    out = adapt_columns(w, 1, ['x', 'y', 'z', 'intensity'], ['x', 'y', 'z', 'time', 'intensity'])
    assert out.tolist() == [[0, 1, 2, 0, 3, 4, 5, 6], [7, 8, 9, 0, 10, 11, 12, 13]]


def test_bad_point_features_are_named_errors(tmp_path):
    src = Holder(pts_middle_encoder=encoder(4))
    with pytest.raises(FusionLoadError, match="unknown preset 'lidar5'"):
        load_sources(Holder(pts_middle_encoder=encoder(5)),
                     [dict(checkpoint=save(tmp_path, src), point_features=('lidar5', KITTI))],
                     logger=None)
    dst = Holder(pts_middle_encoder=encoder(5))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(FusionLoadError, match='conv_input.0.weight') as e:  # wrong names
        load_sources(dst, [dict(checkpoint=save(tmp_path, src),
                                point_features=(NUSCENES, NUSCENES))], logger=None)
    assert 'src.pth' in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
