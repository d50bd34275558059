"""``freeze=True`` through a real Runner: two training iterations of the CPU CenterPoint.

The LiDAR branch is loaded from a checkpoint with ``freeze=True``; after MMEngine's
training loop (its ``model.train()`` calls, ``OptimWrapper`` with AdamW and weight
decay, gradient clipping) every frozen tensor and every running statistic of the LiDAR
branch is bit-identical to the checkpoint's, and every parameter of the head, which
trains, has changed. The same with ``EMAHook`` (whose averaged copy keeps the frozen
values too).
"""
import socket

import pytest
import torch

from test_lidar_train_test import CONFIG, LIDAR_MODULES, write_dataset
from mmfusionload.load.freeze import frozen_parts, is_kept_in_eval, keep_in_eval

pytest.importorskip('spconv')
pytestmark = pytest.mark.usefixtures('one_thread')


def lidar_checkpoint(path):
    """A checkpoint of the config's model whose LiDAR branch gives live features in eval
    mode: PyTorch's default initialisation scaled by U(0.5, 1.5) per element, norm layers
    with statistics near (0, 1) (U(-1, 1)-randomized statistics would silence the branch in
    eval mode, and a zero input would leave the head nothing to learn from)."""
    from mmdet3d.registry import MODELS
    from mmdet3d.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    register_all_modules(init_default_scope=False)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        model = MODELS.build(Config.fromfile(str(CONFIG), import_custom_modules=False).model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            u = torch.rand(t.shape, generator=g)
            if name.endswith('running_mean'):
                t.copy_((u - 0.5) * 0.2)
            elif name.endswith('running_var'):
                t.copy_(u * 0.5 + 0.75)
            elif name.endswith('bias'):
                t.add_((u - 0.5) * 0.2)
            else:
                t.mul_(u + 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({'state_dict': state, 'meta': {}}, str(path))
    return state


@pytest.fixture(scope='module')
def lidar_data(tmp_path_factory):
    d = tmp_path_factory.mktemp('freeze')
    write_dataset(d / 'data')
    return d, lidar_checkpoint(d / 'lidar.pth')


def run(d, ema: bool, name: str):
    import lidar_run_hooks  # noqa: F401  (registers StateSnapshotHook)
    from mmengine.config import Config
    from mmengine.runner import Runner
    from mmfusionload.sparse.compat import patch_spconv_cpu_stream
    patch_spconv_cpu_stream()  # an unfrozen encoder would train too (spconv's CPU backward)
    cfg = Config.fromfile(str(CONFIG))
    cfg.work_dir = str(d / name)
    cfg.experiment_name = f'freeze_{name}'
    cfg.custom_hooks = [dict(type='FusionLoadHook', sources=[
        dict(modality='lidar', checkpoint=str(d / 'lidar.pth'), freeze=True)]),
        dict(type='StateSnapshotHook')] + ([dict(type='EMAHook')] if ema else [])
    for split in ('train', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = str(d / 'data') + '/'
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    runner = Runner.from_cfg(cfg)
    runner.train()
    start = torch.load(str(d / name / 'state_at_start.pth'), weights_only=True)
    return runner, start


@pytest.mark.parametrize('ema', [False, True], ids=['plain', 'EMAHook'])
def test_frozen_lidar_branch_holds_through_training(lidar_data, ema):
    d, source = lidar_data
    runner, start = run(d, ema, 'ema' if ema else 'plain')
    from mmfusionload.hooks.fusion_load_hook import dataset_classes
    assert dataset_classes(runner, 'train') == ['car', 'pedestrian']  # what the hook passes
    hook = next(h for h in runner.hooks if type(h).__name__ == 'FusionLoadHook')
    (src, ) = hook.report.sources
    assert src.frozen and all(m.startswith(LIDAR_MODULES) for m in src.frozen)
    model = runner.model
    after = model.state_dict()
    lidar = [k for k in source if k.startswith(LIDAR_MODULES)]
    assert any(k.endswith('running_mean') for k in lidar)
    for k in lidar:  # parameters and running statistics, bit-identical
        assert torch.equal(after[k], source[k]), f'frozen {k} moved'
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith('pts_bbox_head.') for n in trained)
    same = [n for n in trained if torch.equal(after[n], start[n])]
    assert not same, f'{same} did not train ({len(trained)} trained)'
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith(LIDAR_MODULES))
    model.train()  # what every epoch of the loop does: the frozen norms stay in eval
    norms = [m for n, m in model.named_modules() if n.startswith(LIDAR_MODULES)
             and isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms and all(is_kept_in_eval(m) for m in norms)
    if ema:
        ema_hook = next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')
        averaged = ema_hook.ema_model.module.state_dict()
        for k in lidar:
            assert torch.equal(averaged[k], source[k]), f'EMA copy of frozen {k} moved'
        assert any(not torch.equal(averaged[n], start[n]) for n in trained)


def test_norm_kept_in_eval_ignores_train_and_survives_a_deep_copy():
    import copy
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params, norms = frozen_parts(net, ['1.weight', '1.bias', '1.running_mean', '1.running_var'])
    assert params == ['1.weight', '1.bias'] and norms == ['1']
    assert frozen_parts(net, ['1.weight', '1.bias', '1.running_mean'])[1] == []  # not wholly
    keep_in_eval(net[1])
    for m in (net, copy.deepcopy(net)):
        m.train()
        stats = m[1].running_mean.clone()
        m(torch.randn(8, 3))
        assert torch.equal(m[1].running_mean, stats)
        assert not m[1].training


def test_freeze_under_ddp_without_find_unused_parameters_stops_early(tmp_path, monkeypatch):
    """A real DistributedDataParallel (gloo, one process): frozen parameters would never
    get gradients, so the hook refuses before loading anything."""
    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel
    from mmfusionload import FusionLoadError
    from mmfusionload.hooks.fusion_load_hook import check_freeze_wrapper
    from mmfusionload.load.source import parse_source
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    with socket.socket() as s:  # a free port: another job may hold any fixed one
        s.bind(('127.0.0.1', 0))
        monkeypatch.setenv('MASTER_PORT', str(s.getsockname()[1]))
    dist.init_process_group('gloo', rank=0, world_size=1)
    try:
        from mmengine.model import BaseModel

        class Tiny(BaseModel):
            def __init__(self):
                super().__init__()
                self.backbone = torch.nn.Linear(2, 2)

            def forward(self, x, mode='tensor'):
                return self.backbone(x)
        sources = [parse_source(dict(checkpoint='x.pth', modules=['backbone'], freeze=True))]
        strict = MMDistributedDataParallel(Tiny(), find_unused_parameters=False)
        with pytest.raises(FusionLoadError, match='find_unused_parameters=True'):
            check_freeze_wrapper(strict, sources)
        check_freeze_wrapper(MMDistributedDataParallel(Tiny(), find_unused_parameters=True),
                             sources)
        check_freeze_wrapper(strict, [parse_source(dict(checkpoint='x.pth'))])
    finally:
        dist.destroy_process_group()
