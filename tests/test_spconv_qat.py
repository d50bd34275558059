"""spconv QAT fused conv-BN modules (``_SparseConvBn``, ``_metadata`` version 2 with
``bn.*``) read as the float conv followed by its BatchNorm, judged by function: the loaded
float modules compute what the fused module computes in eval mode, ``bn(conv(x) + bias)``
(spconv 2.3.8 ``qat/modules.py``), here computed with spconv and ``F.batch_norm``."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfusionload import FusionLoadError, load_sources
from mmfusionload.checkpoint.identify import identify

spconv = pytest.importorskip('spconv.pytorch')
SHAPE = [9, 10, 11]


class Float(nn.Module):
    """The float model: a conv sequence and a basic-block-like convN/bnN pair."""

    def __init__(self):
        super().__init__()
        enc = nn.Module()
        enc.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(4, 8, 3, bias=False, indice_key='a'), nn.BatchNorm1d(8),
            nn.ReLU())
        enc.conv1 = spconv.SubMConv3d(8, 8, 3, bias=False, indice_key='a')
        enc.bn1 = nn.BatchNorm1d(8)
        self.pts_middle_encoder = enc

    def forward(self, x):
        enc = self.pts_middle_encoder
        x = enc.conv_input(x)
        y = enc.conv1(x)
        return y.replace_feature(enc.bn1(y.features))


def _qat_file(g, names=('pts_middle_encoder.conv_input.0', 'pts_middle_encoder.conv1')):
    """What a QAT model of the float one saves: each conv fused with its BN."""
    state, meta, ref = OrderedDict(), OrderedDict(), {}
    for name, cin in zip(names, (4, 8)):
        w = torch.randn(8, 3, 3, 3, cin, generator=g) / (27 * cin) ** 0.5
        b = torch.randn(8, generator=g) * 0.3
        bn = dict(weight=torch.rand(8, generator=g) + 0.5, bias=torch.randn(8, generator=g),
                  running_mean=torch.randn(8, generator=g),
                  running_var=torch.rand(8, generator=g) + 0.5,
                  num_batches_tracked=torch.tensor(100))
        state[name + '.weight'], state[name + '.bias'] = w, b
        for k, v in bn.items():
            state[f'{name}.bn.{k}'] = v
        for k, v in dict(fake_quant_enabled=torch.tensor([1]), observer_enabled=torch.tensor([0]),
                         scale=torch.rand(8), zero_point=torch.zeros(8, dtype=torch.int32),
                         **{'activation_post_process.min_val': torch.randn(8),
                            'activation_post_process.max_val': torch.randn(8)}).items():
            state[f'{name}.weight_fake_quant.{k}'] = v
        meta[name] = {'version': 2}
        meta[name + '.bn'] = {'version': 2}
        meta[name + '.weight_fake_quant'] = {'version': 1}
        ref[name] = (w, b, bn)
    state._metadata = meta
    return state, ref


def _fused_eval(conv, w, b, bn, x):
    """The fused module in eval mode: ``bn(conv(x, W) + bias)``."""
    y = torch.func.functional_call(conv, {'weight': w}, (x, ))
    f = F.batch_norm(y.features + b, bn['running_mean'], bn['running_var'], bn['weight'],
                     bn['bias'], False, 0.0, 1e-5)
    return y.replace_feature(f)


def _input(g):
    coords = torch.unique(torch.stack([torch.zeros(200, dtype=torch.long)] +
                                      [torch.randint(0, s, (200, ), generator=g)
                                       for s in SHAPE], 1), dim=0).int()
    return spconv.SparseConvTensor(torch.randn(len(coords), 4, generator=g), coords, SHAPE, 1)


def test_fused_modules_load_as_conv_and_batchnorm(tmp_path, one_thread):
    g = torch.Generator().manual_seed(3)
    state, ref = _qat_file(g)
    path = str(tmp_path / 'qat.pth')
    torch.save(dict(state_dict=state), path)
    model = Float().eval()
    report = load_sources(model, [dict(checkpoint=path, modality='lidar', strict=True)],
                          logger=None)
    s = report.sources[0]
    assert not s.missing and not s.unexpected and not s.mismatched
    assert '2 spconv QAT fused conv-BN module(s) read as a conv and its BatchNorm' in s.identity
    x = _input(g)
    with torch.no_grad():
        got = model(x)
        enc = model.pts_middle_encoder
        w, b, bn = ref['pts_middle_encoder.conv_input.0']
        want = _fused_eval(enc.conv_input[0], w, b, bn, x)
        want = want.replace_feature(F.relu(want.features))
        w, b, bn = ref['pts_middle_encoder.conv1']
        want = _fused_eval(enc.conv1, w, b, bn, want)
    torch.testing.assert_close(got.features, want.features, rtol=1e-5, atol=1e-5)
    assert got.features.abs().sum() > 0
    ident = identify(path)
    assert any('2 spconv QAT fused conv-BN module(s)' in n and
               'pts_middle_encoder.conv1 -> pts_middle_encoder.conv1 + pts_middle_encoder.bn1'
               in n for n in ident.notes)


def test_fused_module_without_a_place_for_its_batchnorm_is_refused(tmp_path):
    g = torch.Generator().manual_seed(4)
    state, _ = _qat_file(g, names=('pts_middle_encoder.conv_input.0',
                                   'pts_middle_encoder.stem'))
    path = str(tmp_path / 'qat.pth')
    torch.save(dict(state_dict=state), path)
    model = Float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FusionLoadError, match=r'pts_middle_encoder\.stem is a spconv QAT '
                                              r'fused conv-BN module'):
        load_sources(model, [dict(checkpoint=path, modality='lidar')], logger=None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(n.startswith('refused: pts_middle_encoder.stem') for n in identify(path).notes)


def test_plain_version_2_modules_are_not_fused():
    # MMDetection3D marks every spconv module version 2: without bn.* nothing changes
    from mmfusionload.checkpoint.fused import fused_conv_bn, unfuse
    state = OrderedDict([('a.0.weight', torch.zeros(8, 3, 3, 3, 4)),
                         ('a.1.running_mean', torch.zeros(8))])
    meta = {'a.0': {'version': 2}, 'a.1': {'version': 2}}
    assert fused_conv_bn(state, meta) == []
    assert unfuse(state, meta)[0] is state
