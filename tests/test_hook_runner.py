"""FusionLoadHook in a real mmengine Runner: train, test, resume, EMA, load_from repair."""
import json
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.runner import Runner

import mmfusionload  # noqa: F401  (registers FusionLoadHook)
from builders import randomize, sparse_conv_names, to_mmcv_layout
from tiny_fusion import PointsDataset, TinyFusion

pytest.importorskip('spconv')


@pytest.fixture(autouse=True)
def _spconv_cpu():
    from mmfusionload.sparse.compat import patch_spconv_cpu_stream
    patch_spconv_cpu_stream()


class Snapshot(Hook):
    """Records the model (and EMA) weights right after FusionLoadHook has run."""
    priority = 'LOWEST'

    def __init__(self):
        self.model = self.ema = None

    def _take(self, runner):
        if self.model is None:
            self.model = {k: v.clone() for k, v in runner.model.state_dict().items()}
            for h in runner.hooks:
                if type(h).__name__ == 'EMAHook':
                    self.ema = {k: v.clone() for k, v in h.ema_model.module.state_dict().items()}

    before_train = before_test = _take


class Score(BaseMetric):
    default_prefix = 'tiny'

    def process(self, data_batch, data_samples):
        self.results += [s['score'] for s in data_samples]

    def compute_metrics(self, results):
        return dict(score=sum(results) / len(results))


def _loader():
    return dict(dataset=PointsDataset(), batch_size=2, num_workers=0,
                sampler=dict(type='DefaultSampler', shuffle=False),
                collate_fn=dict(type='pseudo_collate'))


def _runner(work_dir, name, hooks, **kw):
    cfg = dict(
        model=TinyFusion(), work_dir=str(work_dir), experiment_name=name,
        default_scope='mmdet3d', train_dataloader=_loader(), test_dataloader=_loader(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=1), test_cfg=dict(),
        test_evaluator=Evaluator(Score()),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks, env_cfg=dict(dist_cfg=dict(backend='gloo')))
    cfg.update(kw)
    return Runner(**cfg)


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """Source model weights and checkpoints made from them."""
    d = tmp_path_factory.mktemp('ckpts')
    src = randomize(TinyFusion(), seed=1)
    cam = randomize(TinyFusion(), seed=3)
    sd = src.state_dict()
    # load_from: a LiDAR+fusion run's checkpoint in MMCV's sparse layout, no camera keys
    lidar = to_mmcv_layout(OrderedDict((k, v) for k, v in sd.items()
                                       if not k.startswith('img_backbone.')), src)
    lidar._metadata = OrderedDict((n, {'version': 1}) for n in sparse_conv_names(src))
    torch.save({'state_dict': lidar, 'meta': {'epoch': 20}}, d / 'lidar_mmcv.pth')
    # camera: a 2-D detector checkpoint, backbone.-prefixed
    det = OrderedDict(('backbone.' + k[13:], v) for k, v in cam.state_dict().items()
                      if k.startswith('img_backbone.'))
    det['neck.fpn_convs.0.conv.weight'] = torch.randn(8, 8, 3, 3)
    torch.save({'state_dict': det, 'meta': {}}, d / 'det.pth')
    return dict(src=sd, cam=cam.state_dict(), lidar=str(d / 'lidar_mmcv.pth'),
                camera=str(d / 'det.pth'))


def _check(weights, sources):
    for k, v in weights.items():
        want = sources['cam'][k] if k.startswith('img_backbone.') else sources['src'][k]
        assert torch.equal(v, want), k


def test_train_with_load_from_ema_and_camera_source(tmp_path, sources, capsys):
    snap = Snapshot()
    hook = dict(type='FusionLoadHook', sources=[dict(modality='camera', checkpoint=sources['camera'])])
    runner = _runner(tmp_path, 'train', [dict(type='EMAHook'), hook, snap],
                     load_from=sources['lidar'])
    runner.train()
    out = capsys.readouterr()
    _check(snap.model, sources)
    _check(snap.ema, sources)
    assert 'missing keys' not in out.out + out.err
    report = json.load(open(osp.join(runner.work_dir, 'fusionload_report.json')))
    first, second = report['sources']
    assert first['label'] == 'load_from'
    assert first['counts']['repaired:spconv_layout'] == len(sparse_conv_names(runner.model))
    assert second['prefix'] == 'backbone. -> img_backbone.'
    assert second['counts']['loaded'] == len(
        [k for k in runner.model.state_dict() if k.startswith('img_backbone.')])
    assert osp.exists(osp.join(runner.work_dir, 'iter_1.pth'))
    with open(osp.join(runner.work_dir, 'fusionload_report.html'), encoding='utf-8') as f:
        page = f.read()
    data = json.loads(page.split('<script id="report-data" type="application/json">')[1]
                      .split('</script>')[0])
    assert [s['label'] for s in data['sources']] == ['load_from', 'camera']
    status = {row[0]: row[4] for row in data['tensors']}
    assert len(status) == len(runner.model.state_dict())
    assert {k for k, v in status.items() if v in ('loaded', 'repaired')} == set(
        runner.model.state_dict())


def test_resume_keeps_resumed_weights_and_reads_runner_checkpoint(tmp_path, sources):
    # a Runner-saved checkpoint (message_hub with HistoryBuffer, numpy) via the safe reader
    hook = dict(type='FusionLoadHook', sources=[dict(modality='camera', checkpoint=sources['camera'])])
    _runner(tmp_path, 'first', [hook], load_from=sources['lidar']).train()
    saved = torch.load(osp.join(tmp_path, 'iter_1.pth'), weights_only=False)['state_dict']
    snap = Snapshot()
    runner = _runner(tmp_path, 'resumed', [dict(hook), snap], resume=True,
                     train_cfg=dict(by_epoch=False, max_iters=2))
    runner.train()
    for k, v in snap.model.items():
        assert torch.equal(v, saved[k]), k
    assert runner.iter == 2


def test_test_mode_loads_before_test(tmp_path, sources):
    snap = Snapshot()
    hook = dict(type='FusionLoadHook', sources=[dict(modality='camera', checkpoint=sources['camera'])])
    runner = _runner(tmp_path, 'test', [hook, snap], load_from=sources['lidar'],
                     optim_wrapper=None, train_dataloader=None, train_cfg=None)
    metrics = runner.test()
    _check(snap.model, sources)
    assert 'tiny/score' in metrics


def test_hook_rejects_bad_source_at_build():
    from mmengine.registry import HOOKS
    from mmfusionload import FusionLoadError
    with pytest.raises(FusionLoadError, match='unknown source option'):
        HOOKS.build(dict(type='FusionLoadHook', sources=[dict(checkpoint='x', modalty='lidar')]))


def test_load_from_kernel_failing_verify_stops_the_run_before_anything_is_applied(
        tmp_path, sources):
    """A converted kernel that computes another function (a wrong registered repair)
    stops the Runner with a FusionLoadError naming module, layouts and error, before
    MMEngine applies any tensor of the load_from file: no partial load."""
    from mmfusionload import FusionLoadError
    from mmfusionload.load.repairs import Repair, module_layout
    from mmfusionload.registry import REPAIRS

    class RollKernel(Repair):
        name = 'roll_kernel'
        priority = 60  # after the layout conversion

        def __call__(self, entry):
            if module_layout(entry.module) and entry.key.endswith('conv_input.0.weight'):
                entry.add_step(self.name, lambda t: t.roll(1, dims=1).contiguous())

    REPAIRS.register_module(module=RollKernel)
    try:
        runner = _runner(tmp_path, 'refused', [dict(type='FusionLoadHook')],
                         load_from=sources['lidar'])
        with pytest.raises(FusionLoadError, match='computes another function') as e:
            runner.train()
    finally:
        REPAIRS.module_dict.pop('RollKernel')
    msg = str(e.value)
    assert sources['lidar'] in msg and 'pts_middle_encoder.conv_input.0 (' in msg
    assert 'layout mmcv -> spconv2' in msg and 'roll_kernel' in msg
    assert 'largest relative error' in msg
    assert runner.iter == 0
    got = runner.model.state_dict()
    loadable = [k for k, v in sources['src'].items()
                if not k.startswith('img_backbone.') and v.is_floating_point() and v.numel() > 1]
    assert len(loadable) > 40
    for k in loadable:  # every tensor keeps its initial value
        assert not torch.equal(got[k], sources['src'][k]), k
