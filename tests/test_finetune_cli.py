"""Classes by name, point features by name and freezing on the command line: ``inspect``
shows all three before a run, ``merge`` and ``convert --config`` load by name, the
model's classes taken from the config's dataset ``metainfo``.

The model: the repository's tiny CPU CenterPoint (4 point features; one task ``car``,
``pedestrian``). The checkpoint: the same model built for 5 point features and one
task ``car``, ``truck``, ``pedestrian`` (its classes in ``meta['dataset_meta']``).
"""
import json
import os.path as osp

import pytest
import torch

from builders import randomize
from mmfusionload.cli.commands import main, parse_source_arg
from mmfusionload.cli.config import build_model, config_classes, load_config
from mmfusionload.files.reader import read_checkpoint

pytest.importorskip('spconv')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'lidar', 'centerpoint_tiny_cpu.py')
SOURCE_CLASSES = ['car', 'truck', 'pedestrian']
LIDAR = 'pts_middle_encoder+pts_backbone+pts_neck+pts_bbox_head'


@pytest.fixture(scope='module')
def five_feature_checkpoint(tmp_path_factory):
    cfg = load_config(CONFIG, {
        'model.pts_voxel_encoder.num_features': 5, 'model.pts_middle_encoder.in_channels': 5,
        'model.pts_bbox_head.tasks': [dict(num_class=3, class_names=SOURCE_CLASSES)]})
    src = randomize(build_model(cfg), seed=3)
    path = tmp_path_factory.mktemp('ft_cli') / 'nus5.pth'
    torch.save({'state_dict': src.state_dict(),
                'meta': {'dataset_meta': {'classes': SOURCE_CLASSES}}}, path)
    return src, str(path)


def source_arg(path, **extra):
    opts = dict(checkpoint=path, modules=LIDAR, point_features='nuscenes:kitti', **extra)
    return ','.join(f'{k}={v}' for k, v in opts.items())


def test_parse_finetune_options():
    src = parse_source_arg('checkpoint=a.pth,classes=car+bicycle,class_map=bicycle:cyclist,'
                           'point_features=kitti:x+y+z+intensity+time,freeze=true')
    assert src == dict(checkpoint='a.pth', classes=['car', 'bicycle'],
                       class_map={'bicycle': 'cyclist'},
                       point_features=dict(checkpoint='kitti',
                                           model=['x', 'y', 'z', 'intensity', 'time']),
                       freeze=True)
    assert config_classes(load_config(CONFIG)) == ['car', 'pedestrian']


def test_inspect_shows_classes_features_and_freezing(five_feature_checkpoint, tmp_path, capsys):
    _, path = five_feature_checkpoint
    js = tmp_path / 'inspect.json'
    assert main(['inspect', CONFIG, '-q', '--json', str(js),
                 '--source', source_arg(path, freeze='true')]) == 0
    out = ' '.join(capsys.readouterr().out.split())  # rich wraps long lines
    assert 'new classes: -; dropped classes: truck' in out, out
    assert ('point features: pts_middle_encoder.conv_input.0.weight: checkpoint (x, y, z, '
            'intensity, time) -> model (x, y, z, intensity); dropped time: equal on points '
            'whose time is 0') in out, out
    assert 'frozen (74 modules, norm layers kept in eval mode): pts_backbone.blocks' in out, out
    (group, ) = json.load(open(js))['groups']
    (src, ) = group['sources']
    assert src['dropped_classes'] == ['truck'] and src['new_classes'] == []
    assert 'pts_bbox_head.task_heads.0.heatmap.1.weight' in src['repaired']['classes']
    assert src['frozen'] and src['features']
    # without point_features the first layer does not fit (the classes still load by
    # name: the checkpoint's meta and the config's dataset name them)
    assert main(['inspect', CONFIG, '-q', '--source',
                 f'checkpoint={path},modules={LIDAR}']) == 1
    out = ' '.join(capsys.readouterr().out.split())
    assert 'dropped classes: truck' in out and 'heatmap.1.weight: checkpoint' not in out
    assert 'pts_middle_encoder.conv_input.0.weight: shape [16, 3, 3, 3, 5]' in out, out


def test_merge_and_convert_load_by_name(five_feature_checkpoint, tmp_path, capsys):
    src, path = five_feature_checkpoint
    out = tmp_path / 'merged.pth'
    assert main(['merge', '--config', CONFIG, '-o', str(out), '-q', source_arg(path)]) == 0
    merged = read_checkpoint(str(out))
    assert merged['meta']['dataset_meta'] == {'classes': ['car', 'pedestrian']}
    state, saved = merged['state_dict'], src.state_dict()
    head = 'pts_bbox_head.task_heads.0.heatmap.1.'
    for p in ('weight', 'bias'):  # car and pedestrian rows, truck dropped
        assert torch.equal(state[head + p], saved[head + p][[0, 2]]), head + p
    w, w_src = state['pts_middle_encoder.conv_input.0.weight'], \
        saved['pts_middle_encoder.conv_input.0.weight']
    assert torch.equal(w, w_src[..., :4]), 'conv_input: time column dropped'
    dst = tmp_path / 'converted.pth'
    assert main(['convert', path, str(dst), '--config', CONFIG, '-q', '--modules',
                 'pts_bbox_head']) == 0
    converted = read_checkpoint(str(dst))['state_dict']
    assert torch.equal(converted[head + 'weight'], saved[head + 'weight'][[0, 2]])
