"""Head classes by name, proven by function against the head that saved the checkpoint.

Each case saves a randomized real head (MMDetection3D's ``CenterHead``, MMDetection's
``RetinaHead``, BEVFusion's ``TransFusionHead`` from an MMDetection3D checkout) trained
"on nuScenes" (its class names in ``meta['dataset_meta']``), loads it into the same head
built for other classes, and compares outputs on one input: every kept class's outputs
equal the source head's for that class; a new class's outputs are the model's own.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest

from builders import build, randomize
from mmfusionload import FusionLoadError, load_sources

NUSCENES = ['car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
            'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone']
NUSCENES_TASKS = [['car'], ['truck', 'construction_vehicle'], ['bus', 'trailer'], ['barrier'],
                  ['motorcycle', 'bicycle'], ['pedestrian', 'traffic_cone']]
TARGET = ['car', 'pedestrian', 'cyclist']
MAP = {'bicycle': 'cyclist'}


class Holder(nn.Module):
    """A detector-shaped parent: the head under ``bbox_head``."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.bbox_head = head


def save(tmp_path, head: nn.Module, classes, name='src.pth') -> str:
    path = tmp_path / name
    torch.save({'state_dict': Holder(head).state_dict(),
                'meta': {'dataset_meta': {'classes': list(classes)}}}, path)
    return str(path)


def pairs_by_name(src, dst, class_map):
    named = [class_map.get(c, c) for c in src]
    return [(j, named.index(c)) for j, c in enumerate(dst) if c in named]


# ---------------------------------------------------------------- CenterHead

def center_head(tasks):
    return build(dict(
        type='CenterHead', in_channels=8,
        tasks=[dict(num_class=len(t), class_names=t) for t in tasks],
        common_heads=dict(reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2), vel=(2, 2)),
        share_conv_channel=8,
        bbox_coder=dict(type='CenterPointBBoxCoder', pc_range=[-8.0, -8.0],
                        post_center_range=[-10.0, -10.0, -5.0, 10.0, 10.0, 3.0], max_num=10,
                        score_threshold=0.0, out_size_factor=1, voxel_size=[0.5, 0.5],
                        code_size=9),
        separate_head=dict(type='SeparateHead', init_bias=-2.19, final_kernel=3, head_conv=8),
        loss_cls=dict(type='mmdet.GaussianFocalLoss', reduction='mean'),
        loss_bbox=dict(type='mmdet.L1Loss', reduction='mean', loss_weight=0.25),
        norm_bbox=True)).eval()


def test_centerhead_tasks_by_name(tmp_path):
    src = randomize(center_head(NUSCENES_TASKS), seed=1)
    tasks = [['car'], ['pedestrian'], ['cyclist'], ['tram']]
    dst = randomize(center_head(tasks), seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    tram = copy.deepcopy(dst.task_heads[3])  # the new task's head as built
    report = load_sources(Holder(dst), [dict(checkpoint=save(tmp_path, src, NUSCENES),
                                             modules=['bbox_head'], class_map=MAP)],
                          classes=[c for t in tasks for c in t], logger=None)
    (s,) = report.sources
    assert s.new_classes == ['tram']
    assert s.dropped_classes == ['truck', 'construction_vehicle', 'bus', 'trailer',
                                 'barrier', 'motorcycle', 'traffic_cone']
    assert all(k.startswith('bbox_head.task_heads.3.') for k in s.new) and s.new
    assert s.unexpected == []  # the checkpoint's tasks 1..5 serve dropped classes
    with torch.no_grad():
        want, got = src.forward_single(x), dst.forward_single(x)
    # model task -> (checkpoint task, checkpoint index of its one class)
    for t, (s_task, s_idx) in enumerate([(0, 0), (5, 0), (4, 1)]):
        for name in ('reg', 'height', 'dim', 'rot', 'vel'):
            assert torch.equal(got[t][name], want[s_task][name]), \
                f'task {t} {tasks[t]}: {name} differs from checkpoint task {s_task}'
        assert torch.equal(got[t]['heatmap'][:, 0], want[s_task]['heatmap'][:, s_idx]), \
            f'heatmap of class {tasks[t][0]}'
    with torch.no_grad():  # the new task: the model's own weights on the loaded shared conv
        initial = tram(dst.shared_conv(x))
    for name, value in initial.items():
        assert torch.equal(got[3][name], value), f'new task tram: {name} changed'
    for k, v in dst.state_dict().items():
        if k.startswith('task_heads.3.'):
            assert torch.equal(v, before[k]), k


def test_centerhead_task_split_across_checkpoint_tasks_is_an_error(tmp_path):
    src = randomize(center_head(NUSCENES_TASKS), seed=1)
    dst = center_head([['car', 'pedestrian']])
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(FusionLoadError) as e:
        load_sources(Holder(dst), [dict(checkpoint=save(tmp_path, src, NUSCENES),
                                        modules=['bbox_head'])],
                     classes=['car', 'pedestrian'], logger=None)
    msg = str(e.value)
    assert "task 0 ['car', 'pedestrian']" in msg and "0 ['car']" in msg and \
        "5 ['pedestrian']" in msg, msg
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- RetinaHead

def retina_head(n):
    """MMDetection's RetinaHead, built in MMDetection's scope (its anchor generator and box
    coder are MMDetection's, whatever default scope earlier tests left)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(dict(type='RetinaHead', num_classes=n, in_channels=8,
                                 stacked_convs=1, feat_channels=8)).eval()


def test_retinahead_anchor_class_scores_by_name(tmp_path):
    src, dst = randomize(retina_head(10), seed=3), randomize(retina_head(3), seed=4)
    x = torch.randn(1, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    before = dst.retina_cls.weight.detach().clone().view(-1, 3, 8, 3, 3)
    report = load_sources(Holder(dst), [dict(checkpoint=save(tmp_path, src, NUSCENES),
                                             modules=['bbox_head'],
                                             class_map={'bicycle': 'cyclist',
                                                        'barrier': 'wall'})],
                          classes=['car', 'tram', 'cyclist'], logger=None)
    assert report.sources[0].new_classes == ['tram']
    with torch.no_grad():
        want, got = src.forward_single(x)[0], dst.forward_single(x)[0]
    anchors = dst.num_base_priors
    want, got = want.view(1, anchors, 10, 5, 5), got.view(1, anchors, 3, 5, 5)
    for j, i in ((0, 0), (2, 7)):
        assert torch.equal(got[:, :, j], want[:, :, i]), f'class {j}: scores per anchor differ'
    # the new class keeps the model's filters for every anchor
    assert torch.equal(dst.retina_cls.weight.view(-1, 3, 8, 3, 3)[:, 1], before[:, 1])


# ---------------------------------------------------------------- TransFusionHead

def query_outputs(head, x, index, labels):
    """The decoder's outputs for given query positions (flat BEV index) and labels, computed
    with the head's own modules in the order of ``TransFusionHead.forward_single``."""
    feat = head.shared_conv(x)
    b, c = feat.shape[:2]
    flat = feat.view(b, c, -1)
    bev_pos = head.bev_pos.repeat(b, 1, 1)
    query = flat.gather(-1, index[:, None, :].expand(-1, c, -1))
    one_hot = F.one_hot(labels, head.class_encoding.in_channels).permute(0, 2, 1).float()
    query = query + head.class_encoding(one_hot)
    pos = bev_pos.gather(1, index[:, :, None].expand(-1, -1, 2))
    outs = []
    for layer, pred in zip(head.decoder, head.prediction_heads):
        query = layer(query, key=flat, query_pos=pos, key_pos=bev_pos)
        res = pred(query)
        res['center'] = res['center'] + pos.permute(0, 2, 1)
        outs.append(res)
        pos = res['center'].detach().permute(0, 2, 1)
    return outs


def top_queries(head, x):
    """Query positions and labels as ``forward_single`` picks them (3x3 local maxima)."""
    heat = head.heatmap_head(head.shared_conv(x)).sigmoid()
    local = torch.zeros_like(heat)
    local[:, :, 1:-1, 1:-1] = F.max_pool2d(heat, 3, stride=1, padding=0)
    heat = (heat * (heat == local)).flatten(2)
    top = heat.flatten(1).argsort(dim=-1, descending=True)[:, :head.num_proposals]
    return top % heat.shape[-1], top // heat.shape[-1]


def test_query_outputs_are_forward_single():
    """The reference above computes what the real forward does, for its own queries."""
    from bevfusion_modules import transfusion_head
    head = randomize(transfusion_head(10), seed=5).eval()
    x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (real,) = head.forward_single(x, None)
        index, labels = top_queries(head, x)
        assert torch.equal(head.query_labels, labels)
        mine = query_outputs(head, x, index, labels)
    for name in ('heatmap', 'center', 'dim'):
        assert torch.allclose(real[name], torch.cat([m[name] for m in mine], -1),
                              atol=1e-6), name


def test_transfusion_nuscenes_to_three_classes(tmp_path):
    """Done: a 10-class nuScenes TransFusionHead into car / pedestrian / cyclist with one
    option (class_map); the classes come from the checkpoint's meta and the model's list."""
    from bevfusion_modules import transfusion_head
    src = randomize(transfusion_head(10), seed=6).eval()
    dst = randomize(transfusion_head(3), seed=7).eval()
    report = load_sources(Holder(dst), [dict(checkpoint=save(tmp_path, src, NUSCENES),
                                             modules=['bbox_head'], class_map=MAP)],
                          classes=TARGET, logger=None)
    s = report.sources[0]
    assert s.new_classes == [] and 'bicycle' not in s.dropped_classes
    assert len(s.adapted['classes']) == 2 + 1 + 2 * 2  # heatmap conv, class encoding, layers
    pairs = pairs_by_name(NUSCENES, TARGET, MAP)
    assert pairs == [(0, 0), (1, 8), (2, 7)]
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    index = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    labels = torch.randint(0, 3, (2, 6), generator=torch.Generator().manual_seed(5))
    src_labels = torch.tensor([i for _, i in pairs])[labels]
    with torch.no_grad():
        dense_src = src.heatmap_head(src.shared_conv(x))
        dense_dst = dst.heatmap_head(dst.shared_conv(x))
        want, got = query_outputs(src, x, index, src_labels), query_outputs(dst, x, index,
                                                                            labels)
    for j, i in pairs:
        assert torch.equal(dense_dst[:, j], dense_src[:, i]), \
            f'dense heatmap of {TARGET[j]} differs from {NUSCENES[i]}'
    for layer, (w, g) in enumerate(zip(want, got)):
        for j, i in pairs:
            assert torch.allclose(g['heatmap'][:, j], w['heatmap'][:, i], atol=1e-6), \
                f'decoder layer {layer}: class logits of {TARGET[j]}'
        for name in ('center', 'height', 'dim', 'rot', 'vel'):
            assert torch.allclose(g[name], w[name], atol=1e-6), f'layer {layer}: {name}'


def test_transfusion_new_class_keeps_model_rows(tmp_path):
    from bevfusion_modules import transfusion_head
    src = randomize(transfusion_head(10), seed=6).eval()
    dst = randomize(transfusion_head(3), seed=7).eval()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_sources(Holder(dst), [dict(checkpoint=save(tmp_path, src, NUSCENES),
                                             modules=['bbox_head'])],
                          classes=['car', 'tram', 'pedestrian'], logger=None)
    assert report.sources[0].new_classes == ['tram']
    assert report.sources[0].dropped_classes == [c for c in NUSCENES
                                                 if c not in ('car', 'pedestrian')]
    after, saved = dst.state_dict(), src.state_dict()
    assert torch.equal(after['class_encoding.weight'][:, 1], before['class_encoding.weight'][:, 1])
    assert torch.equal(after['class_encoding.weight'][:, 2], saved['class_encoding.weight'][:, 8])
    assert torch.equal(after['heatmap_head.1.bias'][1], before['heatmap_head.1.bias'][1])


def test_unknown_class_map_name_is_an_error(tmp_path):
    src = retina_head(10)
    with pytest.raises(FusionLoadError, match=r"class_map names \['bike'\]"):
        load_sources(Holder(retina_head(3)), [dict(checkpoint=save(tmp_path, src, NUSCENES),
                                                   modules=['bbox_head'],
                                                   class_map={'bike': 'cyclist'})],
                     classes=TARGET, logger=None)


def test_without_class_names_the_size_mismatch_stays(tmp_path):
    """No class option and no model classes: the old, exact size-mismatch error."""
    src = retina_head(10)
    with pytest.raises(FusionLoadError, match='size mismatch for bbox_head.retina_cls.weight'):
        load_sources(Holder(retina_head(3)), [dict(checkpoint=save(tmp_path, src, NUSCENES),
                                                   modules=['bbox_head'])], logger=None)


# ---------------------------------------------------------------- Anchor3DHead

KITTI = ['Pedestrian', 'Cyclist', 'Car']


def anchor3d_head(n, ranges=None):
    gen = dict(type='Anchor3DRangeGenerator', ranges=[[0, -40.0, -1.78, 70.4, 40.0, -1.78]],
               sizes=[[3.9, 1.6, 1.56]], rotations=[0, 1.57], reshape_out=False)
    if ranges:
        gen = dict(type='AlignedAnchor3DRangeGenerator', ranges=ranges,
                   sizes=[[0.8, 0.6, 1.73], [1.76, 0.6, 1.73], [3.9, 1.6, 1.56]],
                   rotations=[0, 1.57], reshape_out=False)
    return build(dict(type='Anchor3DHead', num_classes=n, in_channels=8, feat_channels=8,
                      anchor_generator=gen)).eval()


def test_anchor3dhead_shared_anchors_by_name(tmp_path):
    src, dst = randomize(anchor3d_head(3), seed=8), randomize(anchor3d_head(2), seed=9)
    load_sources(Holder(dst), [dict(checkpoint=save(tmp_path, src, KITTI),
                                    modules=['bbox_head'])],
                 classes=['Car', 'Cyclist'], logger=None)
    x = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        (cls_s, reg_s, dir_s), (cls_d, reg_d, dir_d) = src.forward_single(x), \
            dst.forward_single(x)
    anchors = dst.num_anchors
    cls_s, cls_d = cls_s.view(1, anchors, 3, 4, 4), cls_d.view(1, anchors, 2, 4, 4)
    for j, i in ((0, 2), (1, 1)):
        assert torch.equal(cls_d[:, :, j], cls_s[:, :, i]), f'{KITTI[i]}: scores per anchor'
    assert torch.equal(reg_d, reg_s) and torch.equal(dir_d, dir_s)


def test_anchor3dhead_per_class_anchors_is_an_error(tmp_path):
    ranges = [[0, -40.0, -0.6, 70.4, 40.0, -0.6], [0, -40.0, -0.6, 70.4, 40.0, -0.6],
              [0, -40.0, -1.78, 70.4, 40.0, -1.78]]
    src = anchor3d_head(3, ranges)
    with pytest.raises(FusionLoadError, match='anchors are per class'):
        load_sources(Holder(anchor3d_head(3, ranges)),
                     [dict(checkpoint=save(tmp_path, src, KITTI), modules=['bbox_head'])],
                     classes=['Car', 'Cyclist', 'Pedestrian'], logger=None)
