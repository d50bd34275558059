"""``weights='auto'|'ema'|'raw'`` on checkpoints a real MMEngine Runner wrote with EMAHook.

Every expectation is a tensor recorded from the live modules while the Runner saved
(the model and EMAHook's averaged model), never the package's report.
"""
import pytest
import torch
import torch.nn as nn
from mmengine.hooks import EMAHook, Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import mmfusionload  # noqa: F401  (registers FusionLoadHook)
from mmfusionload import FusionLoadError, load_sources


class Dense(BaseModel):
    """A small dense model with a BatchNorm (buffers) for Runner runs."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
        out = self.head(self.backbone(x))
        if mode == 'loss':
            return dict(loss=((out - 1.0) ** 2).mean())
        return out


class Points(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(4, generator=g))


class RecordAtSave(Hook):
    """Records the model's and EMAHook's averaged weights when a checkpoint is saved,
    before EMAHook's own ``before_save_checkpoint`` runs."""
    priority = 'VERY_HIGH'

    def __init__(self):
        self.raw = self.ema = None

    def before_save_checkpoint(self, runner, checkpoint):
        self.raw = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
        ema = next(h for h in runner.hooks if isinstance(h, EMAHook))
        self.ema = {k: v.detach().clone()
                    for k, v in ema.ema_model.module.state_dict().items()}


class Snapshot(Hook):
    """The model and EMA model weights at ``before_train``, after every load."""
    priority = 'LOWEST'

    def __init__(self):
        self.model = self.ema = None

    def before_train(self, runner):
        self.model = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
        for h in runner.hooks:
            if isinstance(h, EMAHook):
                self.ema = {k: v.detach().clone()
                            for k, v in h.ema_model.module.state_dict().items()}


def _runner(work_dir, name, hooks, iters=3, **kw):
    loader = dict(dataset=Points(), batch_size=4, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False),
                  collate_fn=dict(type='pseudo_collate'))
    cfg = dict(model=Dense(), work_dir=str(work_dir), experiment_name=name,
               train_dataloader=loader, optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.2)),
               train_cfg=dict(by_epoch=False, max_iters=iters),
               default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=iters,
                                                  by_epoch=False),
                                  logger=dict(type='LoggerHook', interval=1)),
               custom_hooks=hooks, env_cfg=dict(dist_cfg=dict(backend='gloo')))
    cfg.update(kw)
    return Runner(**cfg)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A Runner run with EMAHook (momentum 0.5) and one without; weights recorded."""
    d = tmp_path_factory.mktemp('ema_run')
    rec = RecordAtSave()
    _runner(d / 'ema', 'ema', [dict(type='EMAHook', momentum=0.5), rec]).train()
    plain = _runner(d / 'plain', 'plain', [])
    plain.train()
    raw_plain = {k: v.detach().clone() for k, v in plain.model.state_dict().items()}
    float_keys = [k for k, v in rec.raw.items() if v.is_floating_point()]
    assert any(not torch.equal(rec.raw[k], rec.ema[k]) for k in float_keys)
    return dict(ckpt=str(d / 'ema' / 'iter_3.pth'), raw=rec.raw, ema=rec.ema,
                plain=str(d / 'plain' / 'iter_3.pth'), plain_raw=raw_plain, dir=d)


def _same(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def _differs(got, want):
    return any(not torch.equal(got[k], v) for k, v in want.items() if v.is_floating_point())


def test_mmengine_ema_file_holds_averaged_state_dict(trained):
    """The MMEngine 0.10.7 fact the package relies on, checked on the real file."""
    from mmfusionload.files.reader import read_checkpoint
    ckpt = read_checkpoint(trained['ckpt'])
    _same(dict(ckpt['state_dict']), trained['ema'])
    raw = {k[len('module.'):]: v for k, v in ckpt['ema_state_dict'].items()
           if k.startswith('module.')}
    _same(raw, trained['raw'])
    assert 'steps' in ckpt['ema_state_dict']


@pytest.mark.parametrize('option,copy,why', [
    (dict(), 'ema', 'state_dict: EMA weights, MMEngine EMAHook'),
    (dict(weights='auto'), 'ema', 'state_dict: EMA weights, MMEngine EMAHook'),
    (dict(weights='ema'), 'ema', 'state_dict: EMA weights, MMEngine EMAHook'),
    (dict(prefer_ema=True), 'ema', 'state_dict: EMA weights, MMEngine EMAHook'),
    (dict(weights='raw'), 'raw', 'ema_state_dict: raw weights, MMEngine EMAHook'),
])
def test_load_sources_takes_the_asked_copy(trained, option, copy, why):
    model = Dense()
    report = load_sources(model, [dict(checkpoint=trained['ckpt'], **option)], logger=None)
    _same(model.state_dict(), trained[copy])
    src = report.sources[0]
    assert src.weights.startswith(why) and src.family == 'MMEngine Runner + EMAHook'
    assert why in report.format()


def test_ema_without_an_ema_copy_is_an_error(trained, tmp_path):
    model = Dense()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(trained['plain_raw'], tmp_path / 'bare.pth')
    for path in (trained['plain'], str(tmp_path / 'bare.pth')):
        with pytest.raises(FusionLoadError, match="weights='ema' but this .* has no EMA copy") as e:
            load_sources(model, [dict(checkpoint=path, weights='ema')], logger=None)
        assert path in str(e.value)
        _same(model.state_dict(), before)
    # raw and auto take the only copy
    for weights in ('raw', 'auto'):
        report = load_sources(model, [dict(checkpoint=trained['plain'], weights=weights)],
                              logger=None)
        _same(model.state_dict(), trained['plain_raw'])
        assert report.sources[0].family == 'MMEngine Runner'


def test_bad_weights_value_and_contradiction():
    with pytest.raises(FusionLoadError, match="weights must be 'auto', 'ema' or 'raw'"):
        load_sources(Dense(), [dict(checkpoint='x.pth', weights='best')], logger=None)
    with pytest.raises(FusionLoadError, match="prefer_ema=True contradicts weights='raw'"):
        load_sources(Dense(), [dict(checkpoint='x.pth', weights='raw', prefer_ema=True)],
                     logger=None)


@pytest.mark.parametrize('weights,copy', [('auto', 'ema'), ('ema', 'ema'), ('raw', 'raw')])
def test_hook_loads_model_and_ema_model(trained, tmp_path, weights, copy):
    snap = Snapshot()
    hook = dict(type='FusionLoadHook', sources=[dict(checkpoint=trained['ckpt'],
                                                     weights=weights)])
    _runner(tmp_path, 'hook', [dict(type='EMAHook', momentum=0.5), hook, snap],
            iters=1).train()
    _same(snap.model, trained[copy])
    _same(snap.ema, trained[copy])


@pytest.mark.parametrize('weights,copy', [('auto', 'ema'), ('ema', 'ema'), ('raw', 'raw')])
def test_load_from_copy(trained, tmp_path, weights, copy):
    snap = Snapshot()
    hook = dict(type='FusionLoadHook', load_from_weights=weights)
    _runner(tmp_path, 'load_from', [dict(type='EMAHook', momentum=0.5), hook, snap], iters=1,
            load_from=trained['ckpt']).train()
    _same(snap.model, trained[copy])
    _same(snap.ema, trained[copy])


def test_resume_restores_raw_model_and_averaged_ema(trained, tmp_path):
    import shutil
    shutil.copy(trained['ckpt'], tmp_path / 'iter_3.pth')
    snap = Snapshot()
    hook = dict(type='FusionLoadHook', load_from_weights='ema')  # not used on resume
    _runner(tmp_path, 'resume', [dict(type='EMAHook', momentum=0.5), hook, snap], iters=3,
            load_from=str(tmp_path / 'iter_3.pth'), resume=True).train()
    _same(snap.model, trained['raw'])
    _same(snap.ema, trained['ema'])
    assert _differs(snap.model, trained['ema'])


def test_hook_rejects_bad_load_from_weights():
    from mmfusionload import FusionLoadHook
    with pytest.raises(FusionLoadError, match='load_from_weights'):
        FusionLoadHook(load_from_weights='averaged')


def test_raw_copy_keeps_module_metadata(trained):
    """The raw copy's ``_metadata`` (sparse-conv versions live there) keyed like the model."""
    from mmfusionload.checkpoint.containers import unwrap
    from mmfusionload.files.reader import read_checkpoint
    ckpt = read_checkpoint(trained['ckpt'])
    raw, auto = unwrap(ckpt, 'x.pth', weights='raw'), unwrap(ckpt, 'x.pth')
    assert raw.container == 'ema_state_dict' and auto.container == 'state_dict'
    assert raw.metadata == auto.metadata and 'backbone.1' in raw.metadata
    assert raw.skipped == [] and list(raw.state) == list(auto.state)


def test_identify_names_the_swapped_copies(trained):
    from mmfusionload.checkpoint.identify import identify
    ident = identify(trained['ckpt'])
    assert ident.family.startswith('MMEngine Runner + EMAHook')
    assert ident.copies == [('state_dict', 'EMA weights (auto)'),
                            ('ema_state_dict', 'raw weights')]
    assert ("weights='auto' takes state_dict (what load_from deploys); weights='ema' takes "
            "state_dict, weights='raw' takes ema_state_dict") in ident.notes
