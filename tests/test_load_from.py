"""The load_from repair, applied through MMEngine's own checkpoint loading."""
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from builders import build, randomize, sparse_conv_names, to_mmcv_layout
from mmfusionload import FusionLoadError, read_checkpoint, repair_checkpoint
from mmfusionload.report import Mismatch

pytest.importorskip('spconv')

ENCODER = dict(type='SparseEncoder', in_channels=4, sparse_shape=[41, 32, 32],
               output_channels=32)


class Lidar(torch.nn.Module):

    def __init__(self):
        super().__init__()
        self.pts_middle_encoder = build(ENCODER)
        self.pts_backbone = build(dict(type='SECOND', in_channels=64, out_channels=[16, 32],
                                       layer_nums=[1, 1], layer_strides=[1, 2]))
        self.img_backbone = torch.nn.Conv2d(3, 8, 3)


@pytest.fixture(scope='module')
def src():
    return randomize(Lidar(), seed=11)


def _apply(model, ckpt, **kw):
    """What Runner.load_checkpoint does: hook repair, then MMEngine applies it."""
    report = repair_checkpoint(ckpt, model, 'ckpt.pth', **kw)
    _load_checkpoint_to_model(model, ckpt, strict=False)
    return report


def _sparse(model):
    return [f'{n}.weight' for n in sparse_conv_names(model)]


@pytest.mark.parametrize('case', ['mmcv_meta', 'mmcv_bare', 'spconv2_meta', 'spconv2_lost_meta'])
def test_spconv2_model_gets_exact_kernels(src, case):
    sd = src.state_dict()
    if case.startswith('mmcv'):
        sd = to_mmcv_layout(sd, src)
        sd._metadata = OrderedDict((n, {'version': 1}) for n in sparse_conv_names(src))
    if case.endswith(('bare', 'lost_meta')):
        sd = OrderedDict(sd)  # a dict rebuild loses _metadata
    model = randomize(Lidar(), seed=12)
    report = _apply(model, {'state_dict': sd, 'meta': {}})
    got = model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    n = len(_sparse(src)) if case.startswith('mmcv') else 0
    assert len(report.adapted.get('spconv_layout', [])) == n


def test_without_repair_mmdet3d_permutes_twice(src):
    """The bug the repair exists for: spconv2 weights whose _metadata was lost."""
    model = randomize(Lidar(), seed=12)
    sd = OrderedDict(src.state_dict())
    with pytest.raises(RuntimeError, match='size mismatch'):
        model.load_state_dict(sd)


def test_fill_targets_and_containers(src):
    model = randomize(Lidar(), seed=12)
    before = model.img_backbone.weight.detach().clone()
    sd = {'module.' + k: v for k, v in src.state_dict().items() if not k.startswith('img_')}
    ckpt = {'model': sd}
    report = _apply(model, ckpt, fill_targets=['img_backbone'])
    assert set(ckpt['state_dict']) == set(model.state_dict())
    assert report.container == 'model' and report.stripped == ['module.']
    assert report.new == ['img_backbone.weight', 'img_backbone.bias']
    assert torch.equal(model.img_backbone.weight, before)
    assert torch.equal(model.pts_backbone.blocks[0][0].weight, src.pts_backbone.blocks[0][0].weight)


def test_bare_checkpoint_is_wrapped():
    model = Lidar()
    ckpt = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    repair_checkpoint(ckpt, model)
    assert list(ckpt) == ['state_dict'] and len(ckpt['state_dict']) == len(model.state_dict())


def test_ambiguous_load_from_needs_option(tmp_path):
    import spconv.pytorch as spconv
    model = torch.nn.Sequential(spconv.SubMConv3d(3, 3, 3, bias=False))
    w = torch.randn(3, 3, 3, 3, 3)
    ckpt = {'state_dict': OrderedDict([('0.weight', w)])}
    report = repair_checkpoint(ckpt, model)
    assert "spconv_layout='spconv2' or 'mmcv'" in report.mismatched[0].reason
    ckpt = {'state_dict': OrderedDict([('0.weight', w)])}
    repair_checkpoint(ckpt, model, spconv_layout='mmcv')
    _load_checkpoint_to_model(model, ckpt, strict=True)
    assert torch.equal(model[0].weight, w.permute(4, 0, 1, 2, 3))


# ---------------------------------------------------------------- safe reading
class _Touch:
    """Unpickling this runs ``touch <path>``: a file appears if code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f'touch {self.path}', ))


@pytest.mark.parametrize('fmt', ['zip', 'legacy', 'raw'])
def test_code_never_runs_in_any_file_format(tmp_path, fmt):
    ran = tmp_path / 'code_ran'
    path = tmp_path / f'evil_{fmt}.pth'
    obj = {'state_dict': {'w': torch.ones(2)}, 'payload': _Touch(ran)}
    if fmt == 'zip':
        torch.save(obj, path)
    elif fmt == 'legacy':
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, read by torch's old-format reader
        with open(path, 'wb') as f:
            pickle.dump(_Touch(ran), f, protocol=2)
    with pytest.raises(FusionLoadError, match='system') as e:
        read_checkpoint(str(path))
    assert not ran.exists()
    assert str(path) in str(e.value) and 'trust_checkpoint=True' in str(e.value)


def test_legacy_format_checkpoint_still_loads(tmp_path):
    sd = {'w': torch.arange(4.0), 'meta': {'epoch': 3}}
    torch.save({'state_dict': sd}, tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
    got = read_checkpoint(str(tmp_path / 'old.pth'))
    assert torch.equal(got['state_dict']['w'], torch.arange(4.0))


def test_reader_rebuilds_numpy_and_refuses_code(tmp_path):
    obj = {'state_dict': {'w': torch.ones(2)},
           'meta': {'seed': np.int64(3), 'arr': np.arange(4.0), 'dtype': np.dtype('float32')}}
    torch.save(obj, tmp_path / 'np.pth')
    got = read_checkpoint(str(tmp_path / 'np.pth'))
    assert got['meta']['seed'] == 3 and isinstance(got['meta']['seed'], np.int64)
    assert np.array_equal(got['meta']['arr'], np.arange(4.0))

    class Boom:

        def __reduce__(self):
            return (subprocess.call, (['true'], ))

    torch.save({'state_dict': {'w': torch.ones(2)}, 'x': Boom()}, tmp_path / 'boom.pth')
    with pytest.raises(FusionLoadError, match="subprocess.call") as e:
        read_checkpoint(str(tmp_path / 'boom.pth'))
    assert 'trust_checkpoint=True' in str(e.value) and 'boom.pth' in str(e.value)
    assert read_checkpoint(str(tmp_path / 'boom.pth'), trust_checkpoint=True)['x'] == 0


def test_import_registers_without_heavy_modules():
    code = ('import sys, mmfusionload\n'
            'heavy = [m for m in ("mmdet3d.models", "spconv", "mmcv.ops", "mmdet.models") '
            'if m in sys.modules]\n'
            'assert not heavy, heavy\n'
            'from mmengine.registry import HOOKS\n'
            'from mmdet.registry import MODELS\n'
            'assert HOOKS.get("FusionLoadHook") is mmfusionload.FusionLoadHook\n'
            'from mmdet.registry import HOOKS as DET_HOOKS\n'
            'from mmdet3d.registry import HOOKS as DET3D_HOOKS\n'
            'assert DET_HOOKS.get("FusionLoadHook") is mmfusionload.FusionLoadHook\n'
            'assert DET3D_HOOKS.get("FusionLoadHook") is mmfusionload.FusionLoadHook\n'
            'assert MODELS.get("EfficientViT") is mmfusionload.models.EfficientViT\n')
    subprocess.run([sys.executable, '-c', code], check=True)


def _decisions(rep):
    return dict(loaded=rep.loaded, repaired=rep.repaired, regenerated=rep.regenerated,
                mismatched=[(m.key, m.checkpoint_shape, m.model_shape, m.kind)
                            for m in rep.mismatched],
                unexpected=rep.unexpected, missing=rep.missing)


def test_load_from_and_load_sources_plan_alike(src, tmp_path):
    """One planner: the load_from repair and a whole-model source of the same file decide
    the same per tensor (loaded, repaired, mismatched, unexpected, missing, verified)."""
    from mmfusionload import load_sources
    sd = to_mmcv_layout(src.state_dict(), src)
    sd = OrderedDict((k, v) for k, v in sd.items() if k != 'img_backbone.bias')  # missing
    sd['pts_backbone.blocks.0.0.weight'] = torch.zeros(16, 64, 1, 1)  # mismatched
    sd['head.extra'] = torch.zeros(2)  # unexpected
    torch.save({'state_dict': sd}, tmp_path / 'f.pth')
    model = randomize(Lidar(), seed=12)
    ckpt = {'state_dict': OrderedDict(sd)}
    lf = repair_checkpoint(ckpt, model, str(tmp_path / 'f.pth'), verify=True)
    ls = load_sources(model, [dict(checkpoint=str(tmp_path / 'f.pth'), strict=False,
                                   verify=True)], dry_run=True, logger=None).sources[0]
    assert _decisions(lf) == _decisions(ls)
    assert lf.mismatched == ls.mismatched == [Mismatch(
        'pts_backbone.blocks.0.0.weight', 'pts_backbone.blocks.0.0.weight', [16, 64, 1, 1],
        [16, 64, 3, 3])]
    assert len(lf.repaired['spconv_layout']) == len(_sparse(src)) == lf.verified
    assert lf.missing == ['img_backbone.bias'] and lf.unexpected == ['head.extra']
    # written back in place: repaired kernels, the mismatched and unexpected tensors as
    # they were (MMEngine reports them), in the checkpoint's order
    out = ckpt['state_dict']
    assert list(out) == list(sd)
    for k in _sparse(src):
        assert torch.equal(out[k], src.state_dict()[k]), k
    assert out['pts_backbone.blocks.0.0.weight'] is sd['pts_backbone.blocks.0.0.weight']
    assert out['head.extra'] is sd['head.extra']


def test_load_from_fills_what_the_sources_load_and_counts_the_rest_missing(src):
    """The targets of the load_from plan: the model minus the tensors the hook's sources
    fill (reported new); a tensor of another module the file lacks is missing."""
    sd = OrderedDict((k, v) for k, v in src.state_dict().items()
                     if not k.startswith('img_backbone.')
                     and k != 'pts_backbone.blocks.0.1.weight')
    model = randomize(Lidar(), seed=12)
    ckpt = {'state_dict': sd}
    report = repair_checkpoint(ckpt, model, 'f.pth', fill_targets=['img_backbone'])
    assert report.new == ['img_backbone.weight', 'img_backbone.bias']
    assert report.missing == ['pts_backbone.blocks.0.1.weight']
    assert torch.equal(ckpt['state_dict']['img_backbone.weight'], model.img_backbone.weight)
    # without a source for the camera, its tensors are missing too
    report = repair_checkpoint({'state_dict': OrderedDict(sd)}, model, 'f.pth')
    assert report.new == [] and report.missing == [
        'pts_backbone.blocks.0.1.weight', 'img_backbone.weight', 'img_backbone.bias']
    # a file with nothing for the model: everything is missing, nothing is a problem here
    report = repair_checkpoint({'state_dict': {'x': torch.zeros(1)}}, model, 'f.pth')
    assert report.unexpected == ['x'] and report.kept == [] and report.loaded == []
    assert len(report.missing) == sum(1 for k in model.state_dict()
                                      if not k.endswith('num_batches_tracked'))
