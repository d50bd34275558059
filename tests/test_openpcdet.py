"""The ``openpcdet`` preset, judged by function: the loaded MMDetection3D modules compute
what the OpenPCDet-structured modules computed on the same point cloud."""
import pytest
import torch
import torch.nn as nn

from mmfusionload import FusionLoadError, load_sources
from mmfusionload.checkpoint.identify import identify

pytest.importorskip('spconv')
from openpcdet_modules import PcdetDetector, points, randomize_, save_like_openpcdet  # noqa

SHAPE = [41, 16, 16]  # z, y, x: the 41-high grid of OpenPCDet's KITTI/nuScenes configs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    from mmfusionload.sparse.compat import patch_spconv_cpu_stream
    patch_spconv_cpu_stream()
    yield


def _xyz(padding):
    return tuple(p[::-1] if isinstance(p, (tuple, list)) else p for p in padding)


class Target(nn.Module):
    """An MMDetection3D LiDAR branch: SparseEncoder, SECOND, SECONDFPN.

    ``xyz=True``: BEVFusion's encoder convention instead (``sparse_shape`` x-y-z,
    paddings reversed, ``conv_out`` (1, 1, 3) stride (1, 1, 2)), whose BEV map is
    ``(X, Y)``: the transpose of the z-y-x encoder's ``(Y, X)``."""

    def __init__(self, res: bool, xyz: bool = False, encoder: bool = True):
        super().__init__()
        self.xyz = xyz
        from mmdet3d.registry import MODELS
        from mmdet3d.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        norm = dict(type='BN1d', eps=1e-3, momentum=0.01)
        if res:
            enc = dict(encoder_channels=((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128)),
                       encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, (0, 1, 1)), (0, 0)),
                       block_type='basicblock')
        else:
            enc = dict(encoder_channels=((16, ), (32, 32, 32), (64, 64, 64), (64, 64, 64)),
                       encoder_paddings=((1, ), (1, 1, 1), (1, 1, 1), ((0, 1, 1), 1, 1)),
                       block_type='conv_module')
        cfg = dict(in_channels=4, sparse_shape=SHAPE, output_channels=128,
                   order=('conv', 'norm', 'act'), norm_cfg=norm, **enc)
        if xyz:
            from mmfusionload.cli.demo import _bevfusion_sparse_encoder
            cfg.update(sparse_shape=SHAPE[::-1], encoder_paddings=tuple(
                _xyz(p) for p in enc['encoder_paddings']))
            self.pts_middle_encoder = _bevfusion_sparse_encoder(**cfg)
        elif encoder:
            self.pts_middle_encoder = MODELS.build(dict(type='SparseEncoder', **cfg))
        bn2d = dict(type='BN', eps=1e-3, momentum=0.01)
        self.pts_backbone = MODELS.build(dict(
            type='SECOND', in_channels=256, out_channels=[16, 32], layer_nums=[1, 1],
            layer_strides=[1, 2], norm_cfg=bn2d, conv_cfg=dict(type='Conv2d', bias=False)))
        self.pts_neck = MODELS.build(dict(
            type='SECONDFPN', in_channels=[16, 32], out_channels=[16, 16],
            upsample_strides=[1, 2], norm_cfg=bn2d,
            upsample_cfg=dict(type='deconv', bias=False), use_conv_for_no_stride=False))

    def forward(self, feats, coords, batch_size):
        if not self.xyz:
            bev = self.pts_middle_encoder(feats, coords, batch_size)
            bev = bev[0] if isinstance(bev, (tuple, list)) else bev
            return bev, self.pts_neck(self.pts_backbone(bev))[0]
        import spconv.pytorch as spconv
        enc = self.pts_middle_encoder  # BEVFusionSparseEncoder.forward: (C * D, X, Y)
        x = enc.conv_input(spconv.SparseConvTensor(feats, coords.int(), enc.sparse_shape,
                                                   batch_size))
        for layer in enc.encoder_layers:
            x = layer(x)
        dense = enc.conv_out(x).dense()
        n, c, h, w, d = dense.shape
        bev = dense.permute(0, 1, 4, 2, 3).contiguous().view(n, c * d, h, w)
        return bev, self.pts_neck(self.pts_backbone(bev))[0]


@pytest.fixture(scope='module', params=[False, True], ids=['VoxelBackBone8x', 'VoxelResBackBone8x'])
def pcdet(request, tmp_path_factory):
    torch.set_num_threads(1)
    res = request.param
    src = randomize_(PcdetDetector(SHAPE, res=res), seed=5).eval()
    path = str(tmp_path_factory.mktemp('pcdet') / 'checkpoint_epoch_80.pth')
    save_like_openpcdet(src, path)
    return dict(src=src, path=path, res=res)


def _run_source(src, feats, coords):
    with torch.no_grad():
        bev = src.backbone_3d(feats, coords, 2)
        return bev, src.backbone_2d(bev)


@pytest.mark.parametrize('preset', ['openpcdet', 'auto'])
def test_loaded_encoder_and_bev_backbone_compute_the_same(pcdet, preset):
    with open(pcdet['path'], 'rb') as f:
        assert f.read(2) != b'PK'  # the legacy, non-zip format OpenPCDet writes
    target = Target(pcdet['res']).eval()
    report = load_sources(target, [dict(checkpoint=pcdet['path'], preset=preset,
                                        modality='lidar')], logger=None)
    src = report.sources[0]
    assert src.family == 'OpenPCDet' and src.weights.startswith('model_state')
    assert not src.missing and not src.mismatched
    feats, coords = points(SHAPE)
    want_bev, want = _run_source(pcdet['src'], feats, coords)
    with torch.no_grad():
        bev, got = target(feats, coords, 2)
    assert bev.shape == want_bev.shape and got.shape == want.shape
    torch.testing.assert_close(bev, want_bev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert bev.abs().sum() > 0


def test_identify_names_openpcdet(pcdet):
    ident = identify(pcdet['path'])
    assert ident.family.startswith('OpenPCDet pcdet+0.6.0')
    assert ident.format == 'OpenPCDet' and ident.preset == 'openpcdet'
    # spconv 2.x modules record _metadata version 1 (torch's default) unless MMDetection3D's
    # override, which sets 2, was imported before the file was saved: either way spconv2
    assert ident.layout == 'spconv2'
    assert ('fit only the spconv2' in ident.layout_evidence
            or ident.layout_evidence.startswith('_metadata version 2'))
    assert ident.axes == 'z-y-x' and 'backbone_3d.conv_out.0.weight' in ident.axes_evidence
    assert ident.options['preset'] == 'openpcdet' and ident.options['modality'] == 'lidar'
    assert any('dense_head.' in n and 'not converted' in n for n in ident.notes)


def test_block_bias_without_a_following_norm_is_an_error(pcdet, tmp_path):
    if not pcdet['res']:
        pytest.skip('plain blocks have no bias')
    ckpt = torch.load(pcdet['path'], weights_only=False)
    for k in [k for k in ckpt['model_state'] if k.startswith('backbone_3d.conv1.0.bn1.')]:
        del ckpt['model_state'][k]
    torch.save(ckpt, tmp_path / 'cut.pth')
    target = Target(True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FusionLoadError, match=r'conv1\.0\.conv1\.bias \[16\] has no following '
                       'BatchNorm'):
        load_sources(target, [dict(checkpoint=str(tmp_path / 'cut.pth'), preset='openpcdet',
                                   modality='lidar')], logger=None)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_structure_without_a_place_is_an_error():
    from mmfusionload.formats.openpcdet import openpcdet_to_mmdet3d
    src = PcdetDetector(SHAPE, res=True).state_dict()
    src['backbone_3d.conv2.1.downsample.0.weight'] = torch.zeros(32, 1, 1, 1, 16)
    with pytest.raises(FusionLoadError, match=r'no place in a SparseEncoder: '
                       r'conv2\.1\.downsample\.0\.weight'):
        openpcdet_to_mmdet3d(src)
    src = PcdetDetector(SHAPE, res=True).state_dict()
    for k in [k for k in src if k.startswith('backbone_3d.conv3.0.')]:
        del src[k]
    with pytest.raises(FusionLoadError, match=r'conv3 items \[1, 2\] are not 0\.\.1'):
        openpcdet_to_mmdet3d(src)


def _load(target, path, **options):
    return load_sources(target, [dict(checkpoint=path, preset='openpcdet', modality='lidar',
                                      **options)], logger=None).sources[0]


def test_into_bevfusion_xyz_encoder_same_bev_features_transposed(pcdet):
    """backbone_3d (z-y-x) into BEVFusion's x-y-z encoder and backbone_2d behind it: the
    encoder's kernels are reordered (conv_out's (3, 1, 1) kernel tells z-y-x), the 2-D
    kernels transposed; the same point cloud gives the transposed BEV map and neck output."""
    target = Target(pcdet['res'], xyz=True).eval()
    src = _load(target, pcdet['path'])
    sparse = 21 if pcdet['res'] else 12
    assert len(src.adapted['axis_order']) == sparse and src.verified == sparse
    assert sorted(src.adapted['bev_transpose']) == sorted(
        k for k in target.state_dict() if k.endswith('weight') and
        target.state_dict()[k].dim() == 4)
    assert not src.missing and not src.mismatched
    feats, coords = points(SHAPE)
    want_bev, want = _run_source(pcdet['src'], feats, coords)            # (.., Y, X)
    with torch.no_grad():
        bev, got = target(feats, coords[:, [0, 3, 2, 1]], 2)              # (.., X, Y)
    assert bev.transpose(-1, -2).shape == want_bev.shape and want_bev.abs().sum() > 0
    # equal up to float32 summation order (kernel offsets are visited in another order)
    torch.testing.assert_close(bev.transpose(-1, -2), want_bev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.transpose(-1, -2), want, rtol=1e-5, atol=1e-5)


def test_encoder_without_conv_out_still_reordered(pcdet):
    """Only conv_input and the stages targeted: every kernel left is a cube, and the
    file's conv_out (not loaded) still tells z-y-x, so the cubes are reordered."""
    target = Target(pcdet['res'], xyz=True)
    load_sources(target, [dict(checkpoint=pcdet['path'], preset='openpcdet', modules=[
        'pts_middle_encoder.conv_input', 'pts_middle_encoder.encoder_layers'])], logger=None)
    w = pcdet['src'].backbone_3d.conv_input[0].weight                    # [16, z, y, x, 4]
    assert torch.equal(target.pts_middle_encoder.conv_input[0].weight, w.permute(0, 3, 2, 1, 4))


def _bev_only(pcdet, tmp_path):
    ckpt = torch.load(pcdet['path'], weights_only=False)
    ckpt['model_state'] = {k: v for k, v in ckpt['model_state'].items()
                           if not k.startswith('backbone_3d.')}
    path = str(tmp_path / 'bev_only.pth')
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    return path


def _bev_run(backbone, neck, bev):
    with torch.no_grad():
        return neck(backbone(bev))[0]


@pytest.mark.parametrize('only', ['file', 'modules'])
def test_bev_backbone_alone_into_transposed_bev_map(pcdet, tmp_path, only):
    """backbone_2d alone (a file without backbone_3d, or the 2-D modules targeted) into a
    model whose encoder is x-y-z: the kernels are transposed, decided from the live
    encoder's order, and the neck computes the transpose on the transposed map."""
    if pcdet['res']:
        pytest.skip('the 2-D backbone is the same for both 3-D backbones')
    target = Target(False, xyz=True).eval()
    if only == 'file':
        src = _load(target, _bev_only(pcdet, tmp_path), strict=False)
    else:
        src = load_sources(target, [dict(checkpoint=pcdet['path'], preset='openpcdet',
                                         modules=['pts_backbone', 'pts_neck'])],
                           logger=None).sources[0]
    assert len(src.adapted['bev_transpose']) == 6 and 'axis_order' not in src.adapted
    bev = torch.randn(2, 256, 8, 6, generator=torch.Generator().manual_seed(1))  # (Y, X)
    with torch.no_grad():
        want = pcdet['src'].backbone_2d(bev)
    got = _bev_run(target.pts_backbone, target.pts_neck, bev.transpose(-1, -2).contiguous())
    assert want.abs().sum() > 0
    torch.testing.assert_close(got.transpose(-1, -2), want, rtol=1e-5, atol=1e-5)


def test_bev_backbone_explicit_order_loads_as_it_is(pcdet, tmp_path):
    """spatial_order='xyz' says the file's BEV layers read an x-y-z map: no transpose."""
    if pcdet['res']:
        pytest.skip('the 2-D backbone is the same for both 3-D backbones')
    target = Target(False, xyz=True)
    src = _load(target, _bev_only(pcdet, tmp_path), strict=False, spatial_order='xyz')
    assert 'bev_transpose' not in src.adapted
    assert torch.equal(target.pts_neck.deblocks[1][0].weight,
                       pcdet['src'].backbone_2d.deblocks[1][0].weight)


def test_bev_backbone_into_model_of_unknown_orientation_is_an_error(pcdet, tmp_path):
    """No sparse encoder in the model: the BEV orientation cannot be decided, so the
    2-D layers are refused (never loaded on a guess), the model unchanged."""
    if pcdet['res']:
        pytest.skip('the 2-D backbone is the same for both 3-D backbones')
    target = Target(False, encoder=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FusionLoadError, match=r'BEV orientation of the model cannot be '
                       r'decided.*no sparse encoder') as e:
        _load(target, _bev_only(pcdet, tmp_path), strict=False)
    assert 'bev_only.pth' in str(e.value) and 'pts_backbone.blocks.0.0.weight' in str(e.value)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bev_backbone_into_pillar_model_loads_as_it_is(pcdet, tmp_path):
    """MMDetection3D's PointPillarsScatter lays its canvas out (y, x), as OpenPCDet does:
    the 2-D layers load unchanged and compute the same on the same map."""
    if pcdet['res']:
        pytest.skip('the 2-D backbone is the same for both 3-D backbones')
    from mmdet3d.registry import MODELS
    target = Target(False, encoder=False).eval()
    target.pts_middle_encoder = MODELS.build(dict(type='PointPillarsScatter', in_channels=256,
                                                  output_shape=[8, 6]))
    src = _load(target, _bev_only(pcdet, tmp_path), strict=False)
    assert 'bev_transpose' not in src.adapted and len(src.loaded) > 0
    bev = torch.randn(2, 256, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pcdet['src'].backbone_2d(bev)
    torch.testing.assert_close(_bev_run(target.pts_backbone, target.pts_neck, bev), want,
                               rtol=1e-5, atol=1e-5)


def test_transposed_bev_map_and_asymmetric_conv_is_an_error(pcdet, tmp_path):
    """A conv whose padding differs between the axes does not compute the transposed
    function with a transposed kernel: refused, naming the module and the padding."""
    if pcdet['res']:
        pytest.skip('the 2-D backbone is the same for both 3-D backbones')
    target = Target(False, xyz=True)
    target.pts_backbone.blocks[0][0] = nn.Conv2d(256, 16, 3, padding=(1, 0), bias=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FusionLoadError, match=r'pts_backbone\.blocks\.0\.0\.weight: the BEV '
                       r'map is transposed.*padding \(1, 0\)'):
        _load(target, _bev_only(pcdet, tmp_path), strict=False)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_spconv1_file_into_xyz_encoder_same_bev_features(pcdet, tmp_path):
    """An OpenPCDet file from spconv 1.x holds ``[*k, in, out]`` kernels (spconv 1.x's
    layout, none of volume 1 here): its conv_out still tells z-y-x, and the loaded x-y-z
    encoder computes the transposed BEV map; with conv_out not targeted, the cubes are
    still reordered."""
    ckpt = torch.load(pcdet['path'], weights_only=False)
    ckpt['model_state'] = {k: v.permute(1, 2, 3, 4, 0).contiguous() if v.dim() == 5 else v
                           for k, v in ckpt['model_state'].items()}
    path = str(tmp_path / 'spconv1.pth')
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    target = Target(pcdet['res'], xyz=True).eval()
    src = _load(target, path)
    assert not src.mismatched and src.verified == (21 if pcdet['res'] else 12)
    feats, coords = points(SHAPE)
    want_bev, want = _run_source(pcdet['src'], feats, coords)
    with torch.no_grad():
        bev, got = target(feats, coords[:, [0, 3, 2, 1]], 2)
    torch.testing.assert_close(bev.transpose(-1, -2), want_bev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.transpose(-1, -2), want, rtol=1e-5, atol=1e-5)
    cubes = Target(pcdet['res'], xyz=True)
    load_sources(cubes, [dict(checkpoint=path, preset='openpcdet', modules=[
        'pts_middle_encoder.conv_input', 'pts_middle_encoder.encoder_layers'])], logger=None)
    w = pcdet['src'].backbone_3d.conv_input[0].weight                    # [16, z, y, x, 4]
    assert torch.equal(cubes.pts_middle_encoder.conv_input[0].weight, w.permute(0, 3, 2, 1, 4))
