"""Trainer families: which copy ``weights='auto'|'ema'|'raw'`` takes from each container."""
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from mmfusionload import FusionLoadError, load_sources
from mmfusionload.checkpoint.trainers import choose_copy, family_of


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                       for k, v in _model().state_dict().items())


RAW, EMA = _sd(1), _sd(2)


def _module(sd):
    return OrderedDict(('module.' + k, v) for k, v in sd.items())


FILES = {
    # family, file, auto copy, ema copy, raw copy, (why in the report)
    'timm': ('timm', dict(epoch=3, arch='resnet', state_dict=RAW, state_dict_ema=EMA, version=2),
             EMA, EMA, RAW, 'timm'),
    'deit': ('DeiT/Cream', dict(model=RAW, model_ema=EMA, epoch=3), RAW, EMA, RAW, 'DeiT/Cream'),
    'pcdet': ('OpenPCDet', dict(model_state=RAW, optimizer_state={}, epoch=1, it=10,
                                version='pcdet+0.6.0'), RAW, None, RAW, 'OpenPCDet'),
    'lightning': ('PyTorch Lightning', {'state_dict': RAW, 'pytorch-lightning_version': '2.4.0',
                                        'global_step': 5}, RAW, None, RAW, 'Lightning'),
    'mmcv1': ('MMCV 1.x Runner', dict(state_dict=RAW, meta=dict(mmcv_version='1.7.0')), RAW,
              None, RAW, 'MMCV 1.x'),
    'bare': ('plain state dict', RAW, RAW, None, RAW, 'plain state dict'),
    'ddp': ('state_dict container', dict(state_dict=_module(RAW)), RAW, None, RAW, 'state_dict'),
}


@pytest.mark.parametrize('name', list(FILES))
def test_each_family_copy(name, tmp_path):
    family, ckpt, auto, ema, raw, why = FILES[name]
    path = str(tmp_path / f'{name}.pth')
    torch.save(ckpt, path)
    assert family_of(ckpt).name == family
    for weights, want in (('auto', auto), ('ema', ema), ('raw', raw)):
        model = _model()
        if want is None:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(FusionLoadError, match=f"weights='ema' but this {family}"):
                load_sources(model, [dict(checkpoint=path, weights=weights)], logger=None)
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            continue
        report = load_sources(model, [dict(checkpoint=path, weights=weights)], logger=None)
        for k, v in want.items():
            assert torch.equal(model.state_dict()[k], v), (name, weights, k)
        assert why in report.sources[0].weights and report.sources[0].family == family


def test_mmcv1_ema_buffers_are_dropped_and_only_auto_is_taken(tmp_path):
    sd = OrderedDict(RAW)
    for k, v in EMA.items():
        sd['ema_' + k.replace('.', '_')] = v
    torch.save(dict(state_dict=sd, meta=dict(mmcv_version='1.7.0')), tmp_path / 'e.pth')
    model = _model()
    report = load_sources(model, [dict(checkpoint=str(tmp_path / 'e.pth'))], logger=None)
    for k, v in RAW.items():
        assert torch.equal(model.state_dict()[k], v)
    assert report.sources[0].ignored == 0 and not report.sources[0].unexpected
    for weights in ('ema', 'raw'):
        with pytest.raises(FusionLoadError, match='depends on the hook priority'):
            load_sources(model, [dict(checkpoint=str(tmp_path / 'e.pth'), weights=weights)],
                         logger=None)


def test_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file
    keys = list(RAW)
    save_file({k: RAW[k].contiguous() for k in keys[:3]}, str(tmp_path / 'model-00001.safetensors'))
    save_file({k: RAW[k].contiguous() for k in keys[3:]}, str(tmp_path / 'model-00002.safetensors'))
    wmap = {k: 'model-00001.safetensors' if i < 3 else 'model-00002.safetensors'
            for i, k in enumerate(keys)}
    index = tmp_path / 'model.safetensors.index.json'
    index.write_text(json.dumps(dict(metadata=dict(total_size=1), weight_map=wmap)))
    model = _model()
    report = load_sources(model, [dict(checkpoint=str(index))], logger=None)
    for k, v in RAW.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert report.sources[0].family == 'safetensors (sharded)'
    # an index that points outside its folder, or at a shard without the key, is refused
    bad = dict(wmap)
    bad[keys[0]] = '../model-00001.safetensors'
    index.write_text(json.dumps(dict(weight_map=bad)))
    with pytest.raises(FusionLoadError, match="not a file in the index's folder"):
        load_sources(_model(), [dict(checkpoint=str(index))], logger=None)
    bad = dict(wmap)
    bad[keys[0]] = 'model-00002.safetensors'
    index.write_text(json.dumps(dict(weight_map=bad)))
    with pytest.raises(FusionLoadError, match='does not hold it'):
        load_sources(_model(), [dict(checkpoint=str(index))], logger=None)


def test_choose_copy_rejects_unknown_weights():
    with pytest.raises(FusionLoadError, match="weights must be 'auto', 'ema' or 'raw'"):
        choose_copy(dict(state_dict=RAW), 'x.pth', 'best')


@pytest.mark.parametrize('counter', ['epoch', 'iter'])
def test_bevdet_ema_file_is_the_averaged_copy(counter, tmp_path):
    # what BEVDet's MEGVIIEMAHook.save_checkpoint(_iter) writes: epoch_<n>_ema.pth
    path = str(tmp_path / 'epoch_12_ema.pth')
    torch.save({counter: 11, 'state_dict': EMA, 'updates': 12345}, path)
    for weights in ('auto', 'ema'):
        model = _model()
        report = load_sources(model, [dict(checkpoint=path, weights=weights)], logger=None)
        for k, v in EMA.items():
            assert torch.equal(model.state_dict()[k], v), (weights, k)
        src = report.sources[0]
        assert src.family == 'BEVDet MEGVIIEMAHook'
        assert src.weights.startswith('state_dict: EMA weights, BEVDet MEGVIIEMAHook')
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FusionLoadError, match="weights='raw' but this BEVDet MEGVIIEMAHook"):
        load_sources(model, [dict(checkpoint=path, weights='raw')], logger=None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    from mmfusionload.checkpoint.identify import identify
    ident = identify(path)
    assert ident.family == 'BEVDet MEGVIIEMAHook'
    assert ident.copies == [('state_dict', 'EMA weights (auto)')]
    assert any("weights='raw' is refused" in n for n in ident.notes)


def test_state_dict_with_more_entries_is_not_a_bevdet_ema_file():
    # a Runner checkpoint that happens to record 'updates' is not MEGVIIEMAHook's file
    fam = family_of(dict(epoch=1, state_dict=RAW, updates=3, optimizer={}))
    assert fam.name == 'state_dict container' and not fam.has_ema
