"""Export, judged by function: an MMDetection3D ``SparseEncoder`` + ``SECOND`` +
``SECONDFPN`` checkpoint written as OpenPCDet's ``backbone_3d``/``backbone_2d``
(``convert --to-format openpcdet``) loads into OpenPCDet's modules, which then compute the
BEV features the MMDetection3D modules computed. The OpenPCDet modules are OpenPCDet's own
(``VoxelBackBone8x``, ``VoxelResBackBone8x``, ``BaseBEVBackbone`` from the source tree at
``OPENPCDET_ROOT``) or, without it, the structured stand-ins of ``openpcdet_modules``."""
import importlib.util
import os
import os.path as osp
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mmfusionload import FusionLoadError
from mmfusionload.cli.commands import main

pytest.importorskip('spconv')
from openpcdet_modules import PcdetDetector, points, randomize_  # noqa
from test_openpcdet import SHAPE, Target  # noqa

OPENPCDET_ROOT = os.environ.get('OPENPCDET_ROOT')


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    from mmfusionload.sparse.compat import patch_spconv_cpu_stream
    patch_spconv_cpu_stream()
    yield


def _mmdet3d_file(tmp_path, res, xyz=False, seed=7):
    src = randomize_(Target(res, xyz=xyz), seed=seed).eval()
    path = str(tmp_path / f'mmdet3d_{"res" if res else "plain"}_{"xyz" if xyz else "zyx"}.pth')
    torch.save(dict(state_dict=src.state_dict(), meta=dict(mmengine_version='0.10.7')), path)
    return src, path


def _export(path, tmp_path, *extra):
    dst = str(tmp_path / 'pcdet.pth')
    assert main(['convert', path, dst, '--to-format', 'openpcdet', *extra]) == 0
    return torch.load(dst, map_location='cpu', weights_only=False)


def _load_strict(module, state, prefix):
    """``load_state_dict(strict=True)`` of the keys under ``prefix``, with the file's
    ``_metadata`` (MMDetection3D's spconv override, imported in this process, permutes
    kernels of modules without version 2)."""
    own = OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
    own._metadata = OrderedDict((k[len(prefix):], v) for k, v in state._metadata.items()
                                if k.startswith(prefix))
    module.load_state_dict(own, strict=True)


@pytest.mark.parametrize('res', [False, True], ids=['VoxelBackBone8x', 'VoxelResBackBone8x'])
def test_export_loads_into_openpcdet_structure_same_bev_features(res, tmp_path):
    src, path = _mmdet3d_file(tmp_path, res)
    ckpt = _export(path, tmp_path)
    assert ckpt['version'] == 'pcdet+0.6.0' and set(ckpt) >= {'model_state', 'version'}
    state = ckpt['model_state']
    assert all(k.startswith(('backbone_3d.', 'backbone_2d.')) for k in state)
    det = PcdetDetector(SHAPE, res=res).eval()
    _load_strict(det.backbone_3d, state, 'backbone_3d.')
    _load_strict(det.backbone_2d, state, 'backbone_2d.')
    if res:  # OpenPCDet's SparseBasicBlock convs carry a bias: written as zeros
        assert torch.equal(state['backbone_3d.conv1.0.conv1.bias'], torch.zeros(16))
    feats, coords = points(SHAPE)
    with torch.no_grad():
        bev, want = src(feats, coords, 2)
        got_bev = det.backbone_3d(feats, coords, 2)
        got = det.backbone_2d(got_bev)
    torch.testing.assert_close(got_bev, bev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.abs().sum() > 0


def test_export_of_an_xyz_encoder_writes_openpcdet_order(tmp_path):
    # BEVFusion's x-y-z encoder: OpenPCDet's z-y-x modules compute the transposed BEV map
    src, path = _mmdet3d_file(tmp_path, False, xyz=True)
    ckpt = _export(path, tmp_path)
    det = PcdetDetector(SHAPE, res=False).eval()
    _load_strict(det.backbone_3d, ckpt['model_state'], 'backbone_3d.')
    _load_strict(det.backbone_2d, ckpt['model_state'], 'backbone_2d.')
    feats, coords = points(SHAPE)
    with torch.no_grad():
        bev, want = src(feats, coords[:, [0, 3, 2, 1]], 2)
        got_bev = det.backbone_3d(feats, coords, 2)
        got = det.backbone_2d(got_bev)
    torch.testing.assert_close(got_bev, bev.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want.transpose(-1, -2), rtol=1e-5, atol=1e-5)


def test_export_leaves_out_what_openpcdet_has_no_place_for(tmp_path, capsys):
    src = randomize_(Target(False), seed=3)
    sd = dict(src.state_dict())
    sd['pts_bbox_head.heatmap.weight'] = torch.zeros(2, 2)
    path = str(tmp_path / 'full.pth')
    torch.save(dict(state_dict=sd), path)
    dst = str(tmp_path / 'pcdet.pth')
    assert main(['convert', path, dst, '--to-format', 'openpcdet']) == 0
    assert 'left out, no place in openpcdet: pts_bbox_head. (1)' in capsys.readouterr().out
    assert not any('heatmap' in k for k in torch.load(dst, weights_only=False)['model_state'])


def test_export_of_a_model_without_openpcdet_structure_is_refused(tmp_path, capsys):
    sd = {'pts_middle_encoder.conv_input.0.weight': torch.zeros(16, 3, 3, 3, 4),
          'pts_middle_encoder.conv_out.0.weight': torch.zeros(128, 3, 1, 1, 64)}
    path = str(tmp_path / 'x.pth')
    torch.save(dict(state_dict=sd), path)
    assert main(['convert', path, str(tmp_path / 'y.pth'), '--to-format', 'openpcdet']) != 0
    assert (f"{path}: pts_middle_encoder. needs conv_input, encoder_layers and conv_out"
            in capsys.readouterr().out.replace('\n', ''))
    assert not osp.exists(tmp_path / 'y.pth')
    with pytest.raises(FusionLoadError, match="preset 'swin-original' states no reverse"):
        from mmfusionload.cli.convert import convert_checkpoint
        convert_checkpoint(path, str(tmp_path / 'y.pth'), to_format='swin-original')


# ---------------------------------------------------------------- OpenPCDet's own modules

def _load_openpcdet(root):
    """OpenPCDet's backbone modules from its source tree, without running
    ``pcdet/__init__`` or ``pcdet/models/__init__`` (they need its compiled ops)."""
    pkgs = ['pcdet', 'pcdet.utils', 'pcdet.models', 'pcdet.models.backbones_3d',
            'pcdet.models.backbones_2d']
    saved = {n: sys.modules.get(n) for n in pkgs + ['pcdet.utils.spconv_utils']}
    for name in pkgs:
        mod = types.ModuleType(name)
        mod.__path__ = [osp.join(root, *name.split('.'))]
        sys.modules[name] = mod
    out = {}
    try:
        for name in ('pcdet.utils.spconv_utils', 'pcdet.models.backbones_3d.spconv_backbone',
                     'pcdet.models.backbones_2d.base_bev_backbone'):
            spec = importlib.util.spec_from_file_location(
                name, osp.join(root, *name.split('.')) + '.py')
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            out[name.rsplit('.', 1)[1]] = mod
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return out


class _Cfg(dict):
    __getattr__ = dict.__getitem__


@pytest.mark.skipif(not OPENPCDET_ROOT, reason='OPENPCDET_ROOT (an OpenPCDet source tree) '
                    'not set')
@pytest.mark.parametrize('res', [False, True], ids=['VoxelBackBone8x', 'VoxelResBackBone8x'])
def test_export_loads_into_openpcdets_own_modules(res, tmp_path):
    import spconv
    table = spconv.constants.SPCONV_USE_DIRECT_TABLE
    try:
        mods = _load_openpcdet(OPENPCDET_ROOT)
    finally:  # OpenPCDet's spconv_utils sets it at import
        spconv.constants.SPCONV_USE_DIRECT_TABLE = table
    cls = (mods['spconv_backbone'].VoxelResBackBone8x if res
           else mods['spconv_backbone'].VoxelBackBone8x)
    grid = np.array(SHAPE[::-1]) - np.array([0, 0, 1])  # sparse_shape = grid[::-1] + [1, 0, 0]
    enc = cls(_Cfg(), 4, grid).eval()
    assert list(enc.sparse_shape) == SHAPE
    bev_cfg = _Cfg(LAYER_NUMS=[1, 1], LAYER_STRIDES=[1, 2], NUM_FILTERS=[16, 32],
                   UPSAMPLE_STRIDES=[1, 2], NUM_UPSAMPLE_FILTERS=[16, 16])
    bev_net = mods['base_bev_backbone'].BaseBEVBackbone(bev_cfg, 256).eval()
    src, path = _mmdet3d_file(tmp_path, res)
    state = _export(path, tmp_path)['model_state']
    _load_strict(enc, state, 'backbone_3d.')
    _load_strict(bev_net, state, 'backbone_2d.')
    if res:
        # the exported block biases are zeros; spconv 2.3.8 refuses a conv bias on CPU in
        # eval mode, so the (zero) biases are taken off before running
        for m in enc.modules():
            if isinstance(getattr(m, 'bias', None), torch.Tensor) and m.bias.dim() == 1 \
                    and hasattr(m, 'indice_key'):
                assert torch.equal(m.bias, torch.zeros_like(m.bias))
                m.bias = None
    feats, coords = points(SHAPE)
    with torch.no_grad():
        bev, want = src(feats, coords, 2)
        out = enc(dict(voxel_features=feats, voxel_coords=coords, batch_size=2))
        dense = out['encoded_spconv_tensor'].dense()
        n, c, d, h, w = dense.shape
        got_bev = dense.view(n, c * d, h, w)  # HeightCompression
        got = bev_net(dict(spatial_features=got_bev))['spatial_features_2d']
    torch.testing.assert_close(got_bev, bev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- mit-han-lab BEVFusion

def test_export_to_mit_bevfusion_names_and_spconv1_kernels(tmp_path, capsys):
    """mit-han-lab's encoder is spconv 1.x code: a kernel is ``K[*k, in, out]`` itself.
    The written kernel, read that way in a dense ``F.conv3d``, computes at the active
    sites what the live spconv 2.x submanifold conv computes."""
    import spconv.pytorch as spconv
    from mmfusionload.checkpoint.identify import identify
    src = randomize_(Target(False, xyz=True), seed=11).eval()
    sd = OrderedDict(src.state_dict())
    sd._metadata = src.state_dict()._metadata
    extra = {'bbox_head.decoder.0.self_attn.attn.in_proj_weight': torch.randn(6, 2),
             'bbox_head.decoder.0.cross_attn.attn.out_proj.weight': torch.randn(2, 2),
             'bbox_head.decoder.0.ffn.layers.0.0.weight': torch.randn(4, 2),
             'bbox_head.decoder.0.ffn.layers.1.weight': torch.randn(2, 4),
             'bbox_head.decoder.0.norms.2.weight': torch.randn(2),
             'pts_voxel_encoder.num_points': torch.zeros(1)}
    sd.update(extra)
    path = str(tmp_path / 'bevfusion.pth')
    torch.save(dict(state_dict=sd), path)
    dst = str(tmp_path / 'mit.pth')
    assert main(['convert', path, dst, '--to-format', 'mit-bevfusion']) == 0
    assert 'left out, no place in mit-bevfusion: pts_voxel_encoder. (1)' in \
        capsys.readouterr().out.replace('\n', '')
    out = torch.load(dst, weights_only=False)['state_dict']
    for old, new in [('bbox_head.decoder.0.self_attn.attn.in_proj_weight',
                      'heads.object.decoder.0.self_attn.in_proj_weight'),
                     ('bbox_head.decoder.0.cross_attn.attn.out_proj.weight',
                      'heads.object.decoder.0.multihead_attn.out_proj.weight'),
                     ('bbox_head.decoder.0.ffn.layers.0.0.weight',
                      'heads.object.decoder.0.linear1.weight'),
                     ('bbox_head.decoder.0.ffn.layers.1.weight',
                      'heads.object.decoder.0.linear2.weight'),
                     ('bbox_head.decoder.0.norms.2.weight', 'heads.object.decoder.0.norm3.weight'),
                     ('pts_backbone.blocks.0.0.weight', 'decoder.backbone.blocks.0.0.weight'),
                     ('pts_neck.deblocks.1.0.weight', 'decoder.neck.deblocks.1.0.weight')]:
        assert torch.equal(out[new], sd[old]), new
    kernel = out['encoders.lidar.backbone.conv_input.0.weight']
    assert tuple(kernel.shape) == (3, 3, 3, 4, 16)  # [*k, in, out]
    ident = identify(dst)
    assert ident.format == 'mit-han-lab BEVFusion' and ident.layout == 'mmcv'
    conv = src.pts_middle_encoder.conv_input[0]
    feats, coords = points(SHAPE[::-1], n=150)
    with torch.no_grad():
        live = conv(spconv.SparseConvTensor(feats, coords, SHAPE[::-1], 2))
        dense = torch.zeros(2, 4, *SHAPE[::-1])
        c = coords.long()
        dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
        ref = torch.nn.functional.conv3d(dense, kernel.permute(4, 3, 0, 1, 2), padding=1)
    oc = live.indices.long()
    torch.testing.assert_close(live.features, ref[oc[:, 0], :, oc[:, 1], oc[:, 2], oc[:, 3]],
                               rtol=1e-5, atol=1e-5)


def test_export_layout_follows_to_layout_and_spatial_order_needs_to_format(tmp_path):
    src, path = _mmdet3d_file(tmp_path, False)
    ckpt = _export(path, tmp_path, '--to-layout', 'mmcv')  # spconv 1.x OpenPCDet
    state = ckpt['model_state']
    assert tuple(state['backbone_3d.conv_out.0.weight'].shape) == (3, 1, 1, 64, 128)
    torch.testing.assert_close(state['backbone_3d.conv_out.0.weight'],
                               src.state_dict()['pts_middle_encoder.conv_out.0.weight']
                               .permute(1, 2, 3, 4, 0))
    assert state._metadata['backbone_3d.conv_out.0'] == {'version': 1}
    with pytest.raises(FusionLoadError, match='--spatial-order goes with --to-format'):
        from mmfusionload.cli.convert import convert_checkpoint
        convert_checkpoint(path, str(tmp_path / 'z.pth'), spatial_order='zyx')
