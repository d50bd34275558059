"""load_sources on a BEVFusion-shaped model of real modules: every layout, prefix and bad input."""
import os
import re
from collections import OrderedDict

import pytest
import torch

from builders import (BEVFusionLike, assert_same, manifest, randomize, snapshot,
                      sparse_conv_names, to_mmcv_layout)
from mmfusionload import FusionLoadError, load_sources
from mmfusionload.load.repairs import convert_kernel

pytest.importorskip('spconv')

LIDAR = ('pts_voxel_encoder', 'pts_middle_encoder', 'pts_backbone', 'pts_neck')
CAMERA = ('img_backbone', 'img_neck', 'view_transform')


@pytest.fixture(scope='module')
def source_model():
    """The model checkpoints are made from (random weights, seed 1)."""
    return randomize(BEVFusionLike(), seed=1).eval()


@pytest.fixture
def model():
    """A fresh target model (random weights, seed 2)."""
    return randomize(BEVFusionLike(), seed=2).eval()


def lidar_ckpt(src, tmp_path, layout='spconv2', metadata=True, name='lidar.pth'):
    sd = src.state_dict()
    lidar = OrderedDict((k, v) for k, v in sd.items() if k.startswith('pts_'))
    if layout == 'mmcv':
        lidar = to_mmcv_layout(lidar, src)
    if metadata:
        meta = OrderedDict((k, dict(v)) for k, v in sd._metadata.items()
                           if k.startswith('pts_') or k == '')
        if layout == 'mmcv':
            for n in sparse_conv_names(src):
                meta[n] = {'version': 1}
        lidar._metadata = meta
    path = tmp_path / name
    torch.save({'state_dict': lidar, 'meta': {'epoch': 20}}, path)
    return str(path)


def camera_detector_ckpt(src, tmp_path, name='swin_det.pth'):
    """An MMDetection detector checkpoint: backbone./neck./rpn_head. keys."""
    sd = OrderedDict(('backbone.' + k[len('img_backbone.'):], v)
                     for k, v in src.state_dict().items() if k.startswith('img_backbone.'))
    sd['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 96, 1, 1)
    sd['rpn_head.rpn_conv.weight'] = torch.randn(256, 256, 3, 3)
    path = tmp_path / name
    torch.save({'state_dict': sd, 'meta': {}}, path)
    return str(path)


def test_model_matches_bevfusion_manifest(source_model):
    man = {t['key']: t['shape'] for t in manifest('mmdet3d_bevfusion_lidar-cam_spconv2')['tensors']}
    ours = {k: list(v.shape) for k, v in source_model.state_dict().items()}
    for prefix in ('pts_middle_encoder.', 'pts_backbone.', 'pts_neck.', 'img_backbone.'):
        want = {k: s for k, s in man.items() if k.startswith(prefix)}
        got = {k: s for k, s in ours.items() if k.startswith(prefix)}
        assert got == want, prefix


@pytest.mark.parametrize('layout,metadata', [('spconv2', True), ('spconv2', False),
                                             ('mmcv', True), ('mmcv', False)])
def test_lidar_every_layout(source_model, model, tmp_path, layout, metadata):
    path = lidar_ckpt(source_model, tmp_path, layout, metadata)
    before = snapshot(model)
    report = load_sources(model, [dict(modality='lidar', checkpoint=path)], logger=None)
    src, got = source_model.state_dict(), model.state_dict()
    lidar_keys = [k for k in got if k.startswith('pts_')]
    assert_same(src, got, lidar_keys)
    assert_same(before, got, [k for k in got if not k.startswith('pts_')])
    (s, ) = report.sources
    assert len(s.loaded) == len(lidar_keys) == 210
    assert len(s.adapted.get('spconv_layout', [])) == (21 if layout == 'mmcv' else 0)
    assert s.missing == [] and s.targets == list(LIDAR)


def test_camera_from_detector_checkpoint(source_model, model, tmp_path):
    path = camera_detector_ckpt(source_model, tmp_path)
    before = snapshot(model)
    report = load_sources(model, [dict(modality='camera', checkpoint=path)], logger=None)
    got = model.state_dict()
    keys = [k for k in got if k.startswith('img_backbone.')]
    assert_same(source_model.state_dict(), got, keys)
    assert_same(before, got, [k for k in got if not k.startswith('img_backbone.')])
    s = report.sources[0]
    assert s.prefix == 'backbone. -> img_backbone.'
    assert s.kept == ['img_neck', 'view_transform']
    assert s.ignored == 2 and s.missing == []
    assert len(s.regenerated) == 12  # relative_position_index of 12 blocks


def test_camera_from_bare_backbone(source_model, model, tmp_path):
    sd = {k[len('img_backbone.'):]: v for k, v in source_model.state_dict().items()
          if k.startswith('img_backbone.')}
    torch.save(sd, tmp_path / 'bare.pth')
    report = load_sources(model, [dict(modality='camera', checkpoint=str(tmp_path / 'bare.pth'))],
                          logger=None)
    assert report.sources[0].prefix == '<none> -> img_backbone.'
    assert_same(source_model.state_dict(), model.state_dict(),
                [k for k in model.state_dict() if k.startswith('img_backbone.')])


def test_two_sources_and_module_prefix(source_model, model, tmp_path):
    lidar = lidar_ckpt(source_model, tmp_path, 'mmcv', metadata=False)
    cam = {'module.' + k: v for k, v in source_model.state_dict().items()}
    torch.save({'model': cam}, tmp_path / 'ddp.pth')
    report = load_sources(model, [
        dict(modality='lidar', checkpoint=lidar),
        dict(modality=['camera', 'fusion'], checkpoint=str(tmp_path / 'ddp.pth'),
             exclude=[r'^view_transform\.']),
    ], logger=None)
    assert_same(source_model.state_dict(), model.state_dict(),
                [k for k in model.state_dict() if not k.startswith('view_transform.')])
    assert report.sources[1].stripped == ['module.']
    assert report.sources[1].container == 'model'
    assert len(report.sources[1].excluded) == 19
    assert report.sources[1].kept == ["view_transform"]


def test_half_precision_is_cast(source_model, model, tmp_path):
    sd = OrderedDict((k, v.half() if v.is_floating_point() else v)
                     for k, v in source_model.state_dict().items() if k.startswith('pts_'))
    torch.save(sd, tmp_path / 'half.pth')
    report = load_sources(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'half.pth'))],
                          logger=None)
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k
    assert len(report.sources[0].adapted['cast']) == sum(v.is_floating_point() for v in sd.values())


def test_ema_preferred_and_rename(source_model, model, tmp_path):
    sd = {k: v for k, v in source_model.state_dict().items() if k.startswith('pts_backbone.')}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({'model': {'old.' + k[13:]: v for k, v in sd.items()},
                'model_ema': {'old.' + k[13:]: v for k, v in ema.items()}}, tmp_path / 'e.pth')
    load_sources(model, [dict(modules=['pts_backbone'], checkpoint=str(tmp_path / 'e.pth'),
                              rename=[(r'^old\.', 'pts_backbone.')], prefer_ema=True)],
                 logger=None)
    assert_same(ema, model.state_dict(), ema)


def test_strict_missing_exclude_and_all(source_model, model, tmp_path):
    sd = {k: v for k, v in source_model.state_dict().items() if k.startswith('pts_')}
    del sd['pts_neck.deblocks.0.0.weight']
    torch.save(sd, tmp_path / 'm.pth')
    path = str(tmp_path / 'm.pth')
    before = snapshot(model)
    with pytest.raises(FusionLoadError, match=re.escape('pts_neck.deblocks.0.0.weight')) as e:
        load_sources(model, [dict(modality='lidar', checkpoint=path)], logger=None)
    assert path in str(e.value)
    assert_same(before, model.state_dict())
    r = load_sources(model, [dict(modality='lidar', checkpoint=path, strict=False)], logger=None)
    assert r.sources[0].missing == ['pts_neck.deblocks.0.0.weight']
    assert torch.equal(model.state_dict()['pts_neck.deblocks.0.0.weight'],
                       before['pts_neck.deblocks.0.0.weight'])
    load_sources(model, [dict(modality='lidar', checkpoint=path, exclude=[r'deblocks\.0\.0'])],
                 logger=None)
    with pytest.raises(FusionLoadError, match='strict="all"'):
        load_sources(model, [dict(modality=['lidar', 'camera'], checkpoint=path,
                                  exclude=[r'deblocks\.0\.0'], strict='all')], logger=None)


def test_dry_run_leaves_model(source_model, model, tmp_path):
    path = lidar_ckpt(source_model, tmp_path, 'mmcv')
    before = snapshot(model)
    report = load_sources(model, [dict(modality='lidar', checkpoint=path)], dry_run=True,
                          logger=None)
    assert_same(before, model.state_dict())
    assert report.dry_run and not report.applied and report.ok
    assert len(report.sources[0].loaded) == 210
    d = report.to_dict()
    assert d['sources'][0]['counts']['repaired:spconv_layout'] == 21
    assert d['sources'][0]['repaired']['spconv_layout'] == [
        'pts_middle_encoder.conv_input.0.weight', 'pts_middle_encoder.conv_out.0.weight',
        'pts_middle_encoder.encoder_layers.encoder_layer{1..3}.2.0.weight',
        'pts_middle_encoder.encoder_layers.encoder_layer{1..4}.{0,1}.conv{1,2}.weight']
    text = report.format()
    assert 'lidar' in text and 'spconv_layout 21' in text


def test_auto_prefix_tie_and_poor_match(model, tmp_path):
    sd = {k: v for k, v in model.state_dict().items() if k.startswith('img_backbone.')}
    both = dict(sd)
    both.update({'backbone.' + k[len('img_backbone.'):]: v for k, v in sd.items()})
    torch.save(both, tmp_path / 'tie.pth')
    with pytest.raises(FusionLoadError, match='tie'):
        load_sources(model, [dict(modality='camera', checkpoint=str(tmp_path / 'tie.pth'))],
                     logger=None)
    load_sources(model, [dict(modality='camera', checkpoint=str(tmp_path / 'tie.pth'),
                              prefix={'backbone.': 'img_backbone.'})], logger=None)
    few = dict(list(sd.items())[:20])
    torch.save(few, tmp_path / 'few.pth')
    # only 20 tensors: a poor match against 187 backbone tensors is fine when the
    # checkpoint itself is small (20 of 20 placed) but strict reports the rest missing
    with pytest.raises(FusionLoadError, match='get nothing'):
        load_sources(model, [dict(modality='camera', checkpoint=str(tmp_path / 'few.pth'))],
                     logger=None)


# ---------------------------------------------------------------- bad input
def _fails(model, sources, *needles, **kw):
    before = snapshot(model)
    with pytest.raises(FusionLoadError) as e:
        load_sources(model, sources, logger=None, **kw)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert_same(before, model.state_dict())
    return str(e.value)


def test_bad_files(model, source_model, tmp_path):
    good = lidar_ckpt(source_model, tmp_path)
    missing = str(tmp_path / 'nope.pth')
    _fails(model, [dict(modality='lidar', checkpoint=good),
                   dict(modality='camera', checkpoint=missing)], missing, 'no such file')
    (tmp_path / 'empty.pth').write_bytes(b'')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'empty.pth'))], 'empty')
    data = open(good, 'rb').read()
    (tmp_path / 'trunc.pth').write_bytes(data[:len(data) // 2])
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'trunc.pth'))],
           'trunc.pth', 'truncated or corrupt')
    (tmp_path / 'rand.pth').write_bytes(os.urandom(4096))
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'rand.pth'))], 'rand.pth')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'list.pth'))],
           'list.pth', 'not a checkpoint')
    torch.save({'epoch': 3, 'lr': 0.1}, tmp_path / 'nodict.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'nodict.pth'))],
           'no state dict found', 'epoch, lr')


class _Evil:

    def __reduce__(self):
        return (os.system, ('echo owned > /dev/null', ))


def test_code_executing_pickle_is_refused(model, tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'pts_backbone.x': torch.zeros(1)}, 'payload': _Evil()}, path)
    msg = _fails(model, [dict(modality='lidar', checkpoint=str(path))], 'evil.pth',
                 'trust_checkpoint=True')
    assert 'system' in msg


def test_unrelated_and_empty_modality(model, tmp_path):
    torch.save({'state_dict': {'fc.weight': torch.zeros(10, 5), 'fc.bias': torch.zeros(10)}},
               tmp_path / 'cls.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'cls.pth'))],
           'cls.pth', 'no checkpoint tensor lands')
    sd = {k: v for k, v in model.state_dict().items() if k.startswith('pts_')}
    torch.save(sd, tmp_path / 'l.pth')
    _fails(model, [dict(modality='camera', checkpoint=str(tmp_path / 'l.pth'))],
           'l.pth', 'no checkpoint tensor lands')
    _fails(model, [dict(modality='sonar', checkpoint=str(tmp_path / 'l.pth'))],
           "unknown modality 'sonar'", 'camera')
    _fails(model, [dict(modules=['pts_bbox_head'], checkpoint=str(tmp_path / 'l.pth'))],
           "no submodule 'pts_bbox_head'", 'img_backbone, img_neck')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'l.pth'), stict=True)],
           "unknown source option(s) ['stict']", 'allowed: checkpoint')


def test_collision_after_rename(model, tmp_path):
    sd = {k: v for k, v in model.state_dict().items() if k.startswith('pts_neck.')}
    torch.save(sd, tmp_path / 'n.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'n.pth'),
                        rename=[(r'deblocks\.\d', 'deblocks.0')])],
           'n.pth', 'both become', 'pts_neck.deblocks.0')


def test_nonfinite_values(source_model, model, tmp_path):
    sd = {k: v.clone() for k, v in source_model.state_dict().items() if k.startswith('pts_')}
    sd['pts_backbone.blocks.0.0.weight'][0, 0, 0, 0] = float('nan')
    sd['pts_neck.deblocks.1.0.weight'][0, 0, 0, 0] = float('inf')
    torch.save(sd, tmp_path / 'nan.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'nan.pth'))],
           'nan.pth', 'pts_backbone.blocks.0.0.weight holds 1 NaN/Inf',
           'pts_neck.deblocks.1.0.weight holds 1 NaN/Inf')
    load_sources(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'nan.pth'),
                              allow_nonfinite=True)], logger=None)
    assert torch.isnan(model.state_dict()['pts_backbone.blocks.0.0.weight'][0, 0, 0, 0])


def test_overlapping_sources(source_model, model, tmp_path):
    a = lidar_ckpt(source_model, tmp_path, name='a.pth')
    b = lidar_ckpt(source_model, tmp_path, 'mmcv', name='b.pth')
    _fails(model, [dict(modality='lidar', checkpoint=a), dict(modules=['pts_neck'], checkpoint=b)],
           '12 tensors (', 'are written by both', 'pts_neck.deblocks.{0,1}.{0,1}.weight')
    before = snapshot(model)
    other = randomize(BEVFusionLike(), seed=3).eval()  # b's neck differs from a's
    b = lidar_ckpt(other, tmp_path, 'mmcv', name='b.pth')
    report = load_sources(model, [dict(modality='lidar', checkpoint=a),
                                  dict(modules=['pts_neck'], checkpoint=b)],
                          allow_overlap=True, logger=None)
    got, first, second = model.state_dict(), source_model.state_dict(), other.state_dict()
    neck = [k for k in got if k.startswith('pts_neck.')]
    lidar = [k for k in got if k.startswith('pts_') and not k.startswith('pts_neck.')]
    assert len(neck) == 12 and not torch.equal(first[neck[0]], second[neck[0]])
    assert_same(second, got, neck)   # the later source wins where both write
    assert_same(first, got, lidar)
    assert_same(before, got, [k for k in got if not k.startswith('pts_')])
    assert len(report.sources[1].loaded) == len(neck)


def test_mismatched_shape_names_both(source_model, model, tmp_path):
    sd = {k: v for k, v in source_model.state_dict().items() if k.startswith('pts_')}
    sd['pts_backbone.blocks.0.0.weight'] = torch.zeros(128, 256, 1, 1)
    torch.save(sd, tmp_path / 'mis.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'mis.pth'))],
           'mis.pth', 'pts_backbone.blocks.0.0.weight', '[128, 256, 1, 1]', '[128, 256, 3, 3]')


def test_kernel_conversion_both_directions():
    w = torch.arange(16 * 27 * 5).float().view(16, 3, 3, 3, 5)
    m = convert_kernel(w, 'spconv2', 'mmcv')
    assert m.shape == (3, 3, 3, 5, 16) and m.is_contiguous()
    assert m[1, 2, 0, 4, 7] == w[7, 1, 2, 0, 4]
    assert torch.equal(convert_kernel(m, 'mmcv', 'spconv2'), w)
    w2 = torch.randn(8, 3, 3, 4)
    m2 = convert_kernel(w2, 'spconv2', 'mmcv')
    assert m2.shape == (3, 3, 4, 8) and m2[2, 1, 3, 5] == w2[5, 2, 1, 3]


@pytest.mark.parametrize('bad', [
    dict(rename=[('(', 'x')]), dict(exclude=['[']), dict(exclude=[3]),
    dict(prefix={'img_backbone.': None}), dict(modality=3), dict(modality=['camera', 3]),
    dict(preset=['a']), dict(spconv_layout='SPCONV2'), dict(strict='yes'),
    dict(rename='pts_'), dict(modules='nope')])
def test_bad_option_values_are_fusion_load_errors(model, tmp_path, bad):
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith('pts_neck.')},
               tmp_path / 'n.pth')
    _fails(model, [dict(checkpoint=str(tmp_path / 'n.pth'), **bad)], 'n.pth')


def test_bad_replacement_and_int_keys_are_fusion_load_errors(model, tmp_path):
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith('pts_neck.')},
               tmp_path / 'n.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'n.pth'),
                        rename=[('pts', r'\3')])], 'n.pth')
    torch.save({1: torch.zeros(1), 2: torch.zeros(2)}, tmp_path / 'ints.pth')
    _fails(model, [dict(modality='lidar', checkpoint=str(tmp_path / 'ints.pth'))], 'ints.pth')


def test_target_that_cannot_take_a_copy_is_found_before_writing(tmp_path):
    import torch.nn as nn
    model = nn.Module()
    model.a = nn.Linear(2, 2)
    model.a.register_buffer('shared', torch.zeros(1).expand(4))
    sd = {'a.weight': torch.ones(2, 2), 'a.bias': torch.ones(2), 'a.shared': torch.ones(4)}
    torch.save(sd, tmp_path / 'x.pth')
    _fails(model, [dict(checkpoint=str(tmp_path / 'x.pth'))], 'a.shared', 'shares memory')
