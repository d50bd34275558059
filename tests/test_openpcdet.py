"""The ``openpcdet`` preset, judged by function: the loaded MMDetection3D modules compute
what the OpenPCDet-structured modules computed on the same point cloud."""
import pytest
import torch
import torch.nn as nn

from mmfusionload import FusionLoadError, load_sources
from mmfusionload.identify import identify

pytest.importorskip('spconv')
from openpcdet_modules import PcdetDetector, points, randomize_, save_like_openpcdet  # noqa

SHAPE = [41, 16, 16]  # z, y, x: the 41-high grid of OpenPCDet's KITTI/nuScenes configs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    from mmfusionload.compat import patch_spconv_cpu_stream
    patch_spconv_cpu_stream()
    yield


class Target(nn.Module):
    """An MMDetection3D LiDAR branch: SparseEncoder, SECOND, SECONDFPN."""

    def __init__(self, res: bool):
        super().__init__()
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
        self.pts_middle_encoder = MODELS.build(dict(
            type='SparseEncoder', in_channels=4, sparse_shape=SHAPE, output_channels=128,
            order=('conv', 'norm', 'act'), norm_cfg=norm, **enc))
        bn2d = dict(type='BN', eps=1e-3, momentum=0.01)
        self.pts_backbone = MODELS.build(dict(
            type='SECOND', in_channels=256, out_channels=[16, 32], layer_nums=[1, 1],
            layer_strides=[1, 2], norm_cfg=bn2d, conv_cfg=dict(type='Conv2d', bias=False)))
        self.pts_neck = MODELS.build(dict(
            type='SECONDFPN', in_channels=[16, 32], out_channels=[16, 16],
            upsample_strides=[1, 2], norm_cfg=bn2d,
            upsample_cfg=dict(type='deconv', bias=False), use_conv_for_no_stride=False))

    def forward(self, feats, coords, batch_size):
        bev = self.pts_middle_encoder(feats, coords, batch_size)
        bev = bev[0] if isinstance(bev, (tuple, list)) else bev
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
