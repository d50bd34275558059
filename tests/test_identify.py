"""``identify``: family, containers, format, sparse layout, axis order and source options."""
import json
import os.path as osp
from collections import OrderedDict

import pytest
import torch

from mmfusionload import FusionLoadError, load_sources
from mmfusionload.cli.commands import main
from mmfusionload.checkpoint.identify import auto_preset, identify


def _zeros(entries, prefix_filter=None, limit=None):
    out = OrderedDict()
    for e in entries:
        if prefix_filter and not e['key'].startswith(prefix_filter):
            continue
        out[e['key']] = torch.zeros(e['shape'], dtype=getattr(torch, e['dtype']))
        if limit and len(out) >= limit:
            break
    return out


def _save(tmp_path, name, obj):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def test_mmdet3d_bevfusion_layout_from_metadata_and_axes(tmp_path, manifest):
    m = manifest('mmdet3d_bevfusion_lidar_spconv2')
    sd = _zeros(m['tensors'], 'pts_middle_encoder.')
    sd.update(_zeros(m['tensors'], 'bbox_head.', limit=4))
    sd._metadata = OrderedDict((k, {'version': v}) for k, v in m['sparse_conv_modules'].items())
    path = _save(tmp_path, 'bevfusion.pth',
                 {'state_dict': sd, 'meta': {'mmengine_version': '0.10.7'}})
    ident = identify(path)
    assert ident.format == 'MMDetection3D BEVFusion' and ident.preset is None
    assert ident.family == 'MMEngine Runner 0.10.7'
    assert ident.layout == 'spconv2' and ident.layout_evidence == (
        '21 of 21 sparse kernels fit only the spconv2 layout [out, *k, in], e.g. '
        'pts_middle_encoder.conv_input.0.weight [16, 3, 3, 3, 5]')
    # BEVFusion's encoder reduces the last axis alone: x-y-z
    assert ident.axes == 'x-y-z' and '(1, 1, 3)' in ident.axes_evidence
    assert ident.options == {'checkpoint': path}


def test_mit_bevfusion_shape_evidence(tmp_path):
    sd = OrderedDict([('encoders.lidar.backbone.conv_input.0.weight', torch.zeros(3, 3, 3, 5, 16)),
                      ('encoders.lidar.backbone.conv_out.0.weight', torch.zeros(3, 1, 1, 64, 128)),
                      ('heads.object.heatmap_head.0.weight', torch.zeros(4, 4, 3, 3))])
    path = _save(tmp_path, 'mit.pth', {'state_dict': sd})
    ident = identify(path)
    assert ident.format == 'mit-han-lab BEVFusion' and ident.preset == 'mit-bevfusion'
    # [3, 3, 3, 5, 16] reads as mmcv [*k, in, out] and spconv2_rskc [*k, out, in] alike:
    # the format's preset says which
    assert ident.layout == 'mmcv'
    assert ident.layout_evidence == "preset 'mit-bevfusion': spconv_layout='mmcv'"
    assert ident.axes == 'z-y-x'
    assert ident.options['spconv_layout'] == 'mmcv'
    assert auto_preset(list(sd), path) == 'mit-bevfusion'


def test_backbone_formats_and_their_containers(tmp_path, manifest):
    table = 'layers.0.blocks.0.attn.relative_position_bias_table'
    swin = OrderedDict([(table, torch.zeros(169, 3)),
                        ('patch_embed.proj.weight', torch.zeros(96, 3, 4, 4)),
                        ('head.weight', torch.zeros(10, 768))])
    ident = identify(_save(tmp_path, 'swin.pth', {'model': swin}))
    assert ident.format == 'Microsoft Swin' and ident.preset == 'swin-original'
    assert ident.options['modality'] == 'camera' and ident.layout is None

    cream = _zeros(manifest('cream_efficientvit_m0_cls')['tensors'])
    ident = identify(_save(tmp_path, 'cream.pth', {'model': cream, 'model_ema': cream}))
    assert ident.format == 'Cream EfficientViT' and ident.preset == 'cream-efficientvit'
    assert ident.copies == [('model', 'raw weights (auto)'), ('model_ema', 'EMA weights')]
    # Cream's detection file: backbone.-prefixed next to a neck; still Cream, not "detector"
    det = OrderedDict(('backbone.' + k, v) for k, v in cream.items())
    det['neck.fpn_convs.0.conv.weight'] = torch.zeros(4, 4, 3, 3)
    assert identify(_save(tmp_path, 'cream_det.pth', {'state_dict': det})).preset == \
        'cream-efficientvit'

    timm = OrderedDict([('conv1.weight', torch.zeros(4, 3, 3, 3)),
                        ('layer1.0.conv1.weight', torch.zeros(4, 4, 3, 3))])
    ident = identify(_save(tmp_path, 'timm.pth', dict(arch='resnet18', state_dict=timm,
                                                       state_dict_ema=timm, version=2)))
    assert ident.format == 'timm' and ident.family == 'timm 2'
    assert ident.copies == [('state_dict', 'raw weights'),
                            ('state_dict_ema', 'EMA weights (auto)')]

    mmdet = OrderedDict([('backbone.stages.0.blocks.0.w', torch.zeros(2)),
                         ('neck.lateral_convs.0.conv.weight', torch.zeros(2, 2, 1, 1)),
                         ('bbox_head.cls.weight', torch.zeros(2, 2))])
    ident = identify(_save(tmp_path, 'det.pth', {'state_dict': mmdet,
                                                  'meta': {'mmengine_version': '0.10.7'}}))
    assert ident.format == 'MMDetection detector' and ident.preset is None

    plain = OrderedDict([('conv1.weight', torch.zeros(4, 3, 3, 3)),
                         ('layer1.0.bn1.weight', torch.zeros(4))])
    assert identify(_save(tmp_path, 'plain.pth', plain)).format == 'plain backbone'


def test_sharded_safetensors_index(tmp_path):
    from safetensors.torch import save_file
    save_file({'pts_middle_encoder.conv_input.0.weight': torch.zeros(16, 3, 3, 3, 5)},
              str(tmp_path / 'a.safetensors'))
    save_file({'pts_backbone.blocks.0.0.weight': torch.zeros(8, 8, 3, 3)},
              str(tmp_path / 'b.safetensors'))
    index = tmp_path / 'model.safetensors.index.json'
    index.write_text(json.dumps(dict(weight_map={
        'pts_middle_encoder.conv_input.0.weight': 'a.safetensors',
        'pts_backbone.blocks.0.0.weight': 'b.safetensors'})))
    ident = identify(str(index))
    assert ident.family == 'safetensors (sharded)' and ident.format == 'MMDetection3D detector'
    assert ident.layout == 'spconv2' and 'fit only the spconv2' in ident.layout_evidence


def test_unknown_format_lists_groups_and_auto_refuses(tmp_path, capsys):
    sd = OrderedDict([('foo.a.weight', torch.zeros(2)), ('foo.b.weight', torch.zeros(2)),
                      ('bar.c', torch.zeros(1))])
    path = _save(tmp_path, 'odd.pth', sd)
    ident = identify(path)
    assert ident.format == 'unknown format' and ident.preset is None and not ident.options
    assert ident.groups == ['foo. (2)', 'bar. (1)']
    assert main(['identify', path, '--json', str(tmp_path / 'id.json')]) == 0
    out = capsys.readouterr().out
    assert 'format: unknown format; top-level key groups: foo. (2), bar. (1)' in out
    assert json.loads((tmp_path / 'id.json').read_text())['format'] == 'unknown format'
    model = torch.nn.Module()
    model.foo = torch.nn.Module()
    with pytest.raises(FusionLoadError, match="preset='auto' cannot name the format"):
        load_sources(model, [dict(checkpoint=path, preset='auto')], logger=None)


def test_auto_refuses_an_ambiguous_file_naming_the_candidates(tmp_path):
    sd = OrderedDict([('encoders.lidar.backbone.conv1.0.weight', torch.zeros(3, 3, 3, 16, 32)),
                      ('backbone_3d.conv1.0.0.weight', torch.zeros(32, 3, 3, 3, 16))])
    path = _save(tmp_path, 'mixed.pth', sd)
    with pytest.raises(FusionLoadError, match=r"ambiguous.*mit-han-lab BEVFusion \(preset "
                       r"mit-bevfusion.*OpenPCDet \(preset openpcdet"):
        auto_preset(list(sd), path)
    ident = identify(path)
    assert ident.ambiguous and ident.preset is None and ident.layout is None
    assert ident.layout_evidence == (
        'the sparse kernels disagree on their layout: encoders.lidar.backbone.conv1.0.weight '
        '[3, 3, 3, 16, 32] reads as mmcv or spconv2_rskc, but backbone_3d.conv1.0.0.weight '
        '[32, 3, 3, 3, 16] reads only as spconv2')
    assert not ident.options


def test_cli_identify_with_config_and_report_header(tmp_path, capsys):
    from builders import randomize
    from mmfusionload.cli.config import build_model, load_config
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    cfg = osp.join(root, 'configs', 'lidar', 'centerpoint_tiny_cpu_fusionload.py')
    if not osp.exists(cfg):
        pytest.skip('configs/lidar/centerpoint_tiny_cpu_fusionload.py not in this tree')
    model = randomize(build_model(load_config(cfg)), seed=1)
    path = str(tmp_path / 'cp.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {'mmengine_version': '0.10.7'}}, path)
    assert main(['identify', path, '--config', cfg, '-q']) == 0
    out = capsys.readouterr().out
    assert 'family: MMEngine Runner 0.10.7' in out and 'format: MMDetection3D detector' in out
    assert 'spatial axis order: z-y-x' in out and 'these options load it' in out
    assert '[model] weights: state_dict: weights, MMEngine Runner (auto: the only copy)' in out
    report = load_sources(build_model(load_config(cfg)), [dict(checkpoint=path)], logger=None)
    assert report.sources[0].identity.startswith('MMDetection3D detector; sparse kernels spconv2')
    assert 'format: MMDetection3D detector' in report.format()


def test_literal_head_is_a_prefix_of_every_match():
    """The fingerprint prefilter skips a pattern only when no key can start its match."""
    import random
    import re

    from mmfusionload.checkpoint.identify import literal_head
    cases = {r'^pts_middle_encoder\.': 'pts_middle_encoder.', r'^blocks\d\.\d+\.': 'blocks',
             r'^ab?c': 'a', r'^a\.*b': 'a', r'^abc|^x': '', r'^(ab|cd)\.': '', r'a\.b': '',
             r'^ab{2}': 'a', r'^[ab]c': '', r'^a(?:b|c)': 'a', r'^a\d': 'a', r'^a\\.b': 'a'}
    for pattern, head in cases.items():
        assert literal_head(pattern) == head, pattern
    rng = random.Random(0)
    alphabet = 'ab.c\\d|()?*+{}2^$'
    for _ in range(3000):
        pattern = '^' + ''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        try:
            r = re.compile(pattern)
        except re.error:
            continue
        head = literal_head(pattern)
        for _ in range(20):
            key = ''.join(rng.choice('ab.c2') for _ in range(rng.randint(0, 8)))
            if r.search(key):
                assert key.startswith(head), (pattern, head, key)


def test_int_key_names_the_file_and_the_key(tmp_path, capsys):
    """A state dict with an int key: ``identify`` reports the file and the key (it printed
    an ``AttributeError`` without the file)."""
    for i, obj in enumerate(({'state_dict': OrderedDict([('a.weight', torch.ones(2)),
                                                         (3, torch.ones(2))])},
                             OrderedDict([('a.weight', torch.ones(2)), (3, torch.ones(2))]))):
        path = str(tmp_path / f'intkey{i}.pth')
        torch.save(obj, path)
        with pytest.raises(FusionLoadError, match='state dict key 3 is not a string') as e:
            identify(path)
        assert path in str(e.value)
        assert main(['identify', path]) == 1
        got = capsys.readouterr()
        text = ' '.join((got.out + got.err).split())
        assert path in text and 'key 3' in text and 'AttributeError' not in text
