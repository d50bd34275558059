"""Sparse-conv loads proven by function: every kind, both directions, against references
that do not use this package's conversions (dense ``torch.nn.functional.conv*`` from the
source weights, spconv 2.x itself, MMCV's own module where it runs on CPU)."""
import contextlib
import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from builders import snapshot
from mmfusionload import FusionLoadError, load_sources

spconv = pytest.importorskip('spconv.pytorch')


pytestmark = pytest.mark.usefixtures('one_thread')


# name: (ndim, spconv class, mmcv class name, kwargs)
KINDS = {
    'subm3': (3, 'SubMConv3d', dict(kernel_size=3)),
    'subm1': (3, 'SubMConv3d', dict(kernel_size=1)),
    'conv1': (3, 'SparseConv3d', dict(kernel_size=1)),
    'conv1_s2': (3, 'SparseConv3d', dict(kernel_size=1, stride=2)),
    'conv3_s2': (3, 'SparseConv3d', dict(kernel_size=3, stride=2, padding=1)),
    'conv113_s112': (3, 'SparseConv3d', dict(kernel_size=(1, 1, 3), stride=(1, 1, 2))),
    'conv311_s211': (3, 'SparseConv3d', dict(kernel_size=(3, 1, 1), stride=(2, 1, 1))),
    'transposed3_s2': (3, 'SparseConvTranspose3d', dict(kernel_size=3, stride=2)),
    'inverse3': (3, 'SparseInverseConv3d', dict(kernel_size=3, indice_key='down')),
    'subm2d3': (2, 'SubMConv2d', dict(kernel_size=3)),
    'subm2d1': (2, 'SubMConv2d', dict(kernel_size=1)),
    'conv2d3_s2': (2, 'SparseConv2d', dict(kernel_size=3, stride=2)),
    'subm4d3': (4, 'SubMConv4d', dict(kernel_size=3)),
    'subm4d1': (4, 'SubMConv4d', dict(kernel_size=1)),
}
CIN, COUT = 4, 6
GRID = {2: 9, 3: 7, 4: 5}


class Holder(nn.Module):

    def __init__(self, conv):
        super().__init__()
        self.enc = conv


def _make(kind: str, library: str) -> nn.Module:
    ndim, cls, kw = KINDS[kind]
    kw = dict(kw)
    if library == 'mmcv':  # mmcv.ops exports no 4-D classes; they live in sparse_conv
        from mmcv.ops import sparse_conv
        return getattr(sparse_conv, cls)(CIN, COUT, **kw)
    return getattr(spconv, cls)(CIN, COUT, **kw)


def _input(ndim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = GRID[ndim]
    allc = torch.tensor(list(itertools.product(range(grid), repeat=ndim)))
    keep = torch.rand(len(allc), generator=g) < 0.4
    coords = allc[keep]
    feats = torch.randn(len(coords), CIN, generator=g)
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    return spconv.SparseConvTensor(feats, idx, [grid] * ndim, 1), coords, feats


def _dense(coords, feats, shape):
    x = torch.zeros(1, feats.shape[1], *shape, dtype=torch.float64)
    x[(0, slice(None), *coords.t())] = feats.double().t()
    return x


def _conv_nd(x, w, stride, padding, dilation):
    """Dense correlation, 2-D/3-D by F.conv*, 4-D as a sum of F.conv3d over the first axis.
    ``w``: torch's ``[out, in, *k]``."""
    n = w.dim() - 2
    if n == 2:
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    if n == 3:
        return F.conv3d(x, w, stride=stride, padding=padding, dilation=dilation)
    xp = F.pad(x, (0, 0, 0, 0, 0, 0, padding[0], padding[0]))
    t_out = (xp.shape[2] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
    outs = []
    for t in range(t_out):
        acc = 0
        for kt in range(w.shape[2]):
            acc = acc + F.conv3d(xp[:, :, t * stride[0] + kt * dilation[0]], w[:, :, kt],
                                 stride=stride[1:], padding=padding[1:], dilation=dilation[1:])
        outs.append(acc)
    return torch.stack(outs, 2)


def reference(kind, kmm, bias, x_coords, x_feats, shape, out_coords, pair=None):
    """What a sparse conv with MMCV-reading kernel ``kmm`` ``[*k, in, out]`` computes at
    ``out_coords``: dense F.conv* on the densified input, read at the output sites."""
    ndim, _, kw = KINDS[kind]
    k = kmm.shape[:ndim]
    tw = kmm.double().permute(ndim + 1, ndim, *range(ndim))  # [out, in, *k]
    x = _dense(x_coords, x_feats, shape)

    def nd(v, default):
        v = kw.get(v, default)
        return tuple(v) if isinstance(v, (tuple, list)) else (v, ) * ndim

    if kind.startswith('subm') or all(s == 1 for s in k) and nd('stride', 1) == (1, ) * ndim:
        y = _conv_nd(x, tw, (1, ) * ndim, tuple(s // 2 for s in k), (1, ) * ndim)
    elif kind.startswith('transposed') or kind.startswith('inverse'):
        stride, padding = pair[:2] if pair else (nd('stride', 1), nd('padding', 0))
        if ndim != 3:
            raise NotImplementedError
        y = F.conv_transpose3d(x, tw.transpose(0, 1), stride=stride, padding=padding)
        if pair is not None:  # inverse: back onto the paired conv's input grid
            full = torch.zeros(*y.shape[:2], *pair[2], dtype=y.dtype)
            sl = tuple(slice(0, min(a, b)) for a, b in zip(y.shape[2:], pair[2]))
            full[(slice(None), slice(None), *sl)] = y[(slice(None), slice(None), *sl)]
            y = full
    else:
        y = _conv_nd(x, tw, nd('stride', 1), nd('padding', 0), nd('dilation', 1))
    out = y[(0, slice(None), *out_coords.t())].t()
    return out + (bias.double() if bias is not None else 0)


def run_spconv(kind, module):
    """Run a live spconv module on the kind's probe; (input coords, feats, shape, out
    coords, out feats, pair) for the reference."""
    ndim = KINDS[kind][0]
    x, coords, feats = _input(ndim)
    pair = None
    if kind.startswith('inverse'):
        down = spconv.SparseConv3d(CIN, CIN, 3, stride=2, padding=1, bias=False,
                                   indice_key='down')
        with torch.no_grad():
            y = down(x)
        pair = ((2, 2, 2), (1, 1, 1), tuple(x.spatial_shape))
        g = torch.Generator().manual_seed(3)
        y = y.replace_feature(torch.randn(y.features.shape[0], CIN, generator=g))
        x, coords, feats = y, y.indices[:, 1:].long(), y.features
    with torch.no_grad():
        out = module(x)
    return coords, feats, tuple(x.spatial_shape), out.indices[:, 1:].long(), out.features, pair


def _mmcv_runs(kind):
    """MMCV's sparse conv runs on CPU only where it needs no indice pairs: volume 1."""
    return all(s == 1 for s in _make(kind, 'spconv').kernel_size)


def _run_mmcv(kind, module, coords, feats, shape, out_coords):
    """MMCV's own forward, read at spconv's output sites: MMCV's volume-1 path keeps the
    input's sites whatever the stride (mmcv/ops/sparse_conv.py, ``conv1x1``), where
    spconv's strided path puts input site ``o * stride`` at output site ``o``."""
    import mmcv.ops as ops
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    x = ops.SparseConvTensor(feats, idx, list(shape), 1)
    with torch.no_grad():
        out = module(x)
    assert torch.equal(out.indices, idx)
    sites = out_coords * torch.tensor(module.stride) - torch.tensor(module.padding)
    row = {tuple(c): i for i, c in enumerate(coords.tolist())}
    return out.features[[row[tuple(c)] for c in sites.tolist()]]


def _mmcv_kernel_of(weight):
    """MMCV's reading of its own weight (mmcv/ops/sparse_conv.py): [*k, in, out] as is."""
    return weight


@pytest.mark.parametrize('kind', list(KINDS))
def test_mmcv_checkpoint_into_spconv2_computes_the_source_function(kind, tmp_path):
    """MMCV-layout checkpoint -> live spconv 2.x module: its output equals the dense
    reference built from the checkpoint's weights read as MMCV reads them."""
    src = _make(kind, 'mmcv')
    g = torch.Generator().manual_seed(1)
    w = torch.randn(src.weight.shape, generator=g)
    b = torch.randn(COUT, generator=g)
    sd = OrderedDict([('enc.weight', w), ('enc.bias', b)])
    sd._metadata = OrderedDict([('enc', {'version': 1})])
    torch.save({'state_dict': sd}, tmp_path / 'mmcv.pth')
    live = Holder(_make(kind, 'spconv'))
    report = load_sources(live, [dict(checkpoint=str(tmp_path / 'mmcv.pth'), modules=['enc'])],
                          logger=None)
    ic, ifeats, ishape, oc, ofeats, pair = run_spconv(kind, live.enc)
    assert len(oc) > 0
    ref = reference(kind, _mmcv_kernel_of(w), b, ic, ifeats, ishape, oc, pair)
    torch.testing.assert_close(ofeats.double(), ref, rtol=1e-5, atol=1e-5)
    assert report.sources[0].verified == 1 and report.sources[0].verify_error < 1e-5
    if _mmcv_runs(kind):  # the source module itself, as a second reference
        with torch.no_grad():
            src.weight.copy_(w)
            src.bias.copy_(b)
        mm = _run_mmcv(kind, src, ic, ifeats, ishape, oc)
        torch.testing.assert_close(ofeats, mm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', list(KINDS))
def test_spconv2_checkpoint_into_mmcv_computes_the_source_function(kind, tmp_path):
    """spconv 2.x checkpoint -> live MMCV module: the MMCV module's function (dense
    reference of its loaded weight; MMCV itself where it runs on CPU) equals what the
    source spconv 2.x module computes, run by spconv."""
    src = _make(kind, 'spconv')
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        src.weight.copy_(torch.randn(src.weight.shape, generator=g))
        src.bias.copy_(torch.randn(COUT, generator=g))
    sd = OrderedDict((f'enc.{k}', v) for k, v in src.state_dict().items())
    sd._metadata = OrderedDict([('enc', {'version': 2})])
    torch.save({'state_dict': sd}, tmp_path / 'spconv2.pth')
    live = Holder(_make(kind, 'mmcv'))
    report = load_sources(live, [dict(checkpoint=str(tmp_path / 'spconv2.pth'),
                                      modules=['enc'])], logger=None)
    assert report.sources[0].verified == 1
    ic, ifeats, ishape, oc, ofeats, pair = run_spconv(kind, src)
    assert len(oc) > 0
    ref = reference(kind, live.enc.weight.detach(), live.enc.bias.detach(), ic, ifeats, ishape,
                    oc, pair)
    torch.testing.assert_close(ref, ofeats.double(), rtol=1e-5, atol=1e-5)
    if _mmcv_runs(kind):
        mm = _run_mmcv(kind, live.enc, ic, ifeats, ishape, oc)
        torch.testing.assert_close(mm, ofeats, rtol=1e-5, atol=1e-5)


def test_volume_one_kernel_is_not_a_transpose(tmp_path):
    """The conv1x1 path reads a spconv 2.x weight [out, 1, 1, 1, in] as weight.view(in, out):
    the MMCV kernel converts by a reshape, and a permute would compute another function."""
    w = torch.randn(1, 1, 1, 4, 6)
    torch.save({'enc.weight': w, 'enc.bias': torch.zeros(6)}, tmp_path / 'k1.pth')
    live = Holder(spconv.SubMConv3d(4, 6, 1))
    load_sources(live, [dict(checkpoint=str(tmp_path / 'k1.pth'), modules=['enc'])],
                 logger=None)
    assert torch.equal(live.enc.weight.detach().reshape(-1), w.reshape(-1))
    assert not torch.equal(live.enc.weight.detach(), w.permute(4, 0, 1, 2, 3))


class Plain(nn.Module):
    """A user's spconv 2.x model (no MMDetection3D): cube kernels included."""

    def __init__(self):
        super().__init__()
        self.a = spconv.SubMConv3d(3, 3, 3)          # [3, 3, 3, 3, 3]: fits both layouts
        self.b = spconv.SubMConv3d(3, 16, 3)
        self.c = spconv.SubMConv3d(16, 16, 3)        # [16, 3, 3, 3, 16]
        self.d = spconv.SubMConv3d(16, 16, 1)        # [16, 1, 1, 1, 16]
        self.e = spconv.SparseConv3d(16, 8, (3, 1, 1), stride=(2, 1, 1))


def test_plain_spconv2_state_dict_loads_back_unchanged(tmp_path):
    src = Plain()
    sd = src.state_dict()
    sd._metadata = OrderedDict((k, dict(v, version=1)) for k, v in sd._metadata.items())
    torch.save(sd, tmp_path / 'plain.pth')
    dst = Plain()
    report = load_sources(dst, [dict(checkpoint=str(tmp_path / 'plain.pth'))], logger=None)
    got = dst.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    assert 'spconv_layout' not in report.sources[0].adapted
    from mmfusionload.load.load_from import repair_checkpoint
    ckpt = {'state_dict': sd}
    rep = repair_checkpoint(ckpt, dst)
    assert not rep.mismatched
    for k, v in src.state_dict().items():
        assert torch.equal(ckpt['state_dict'][k], v), k


def test_one_layout_per_file_names_both_kernels(tmp_path):
    src = Plain()
    sd = OrderedDict(src.state_dict())
    sd['b.weight'] = sd['b.weight'].permute(1, 2, 3, 4, 0).contiguous()  # one kernel in MMCV's
    torch.save(sd, tmp_path / 'mixed.pth')
    dst = Plain()
    before = snapshot(dst)
    with pytest.raises(FusionLoadError, match='disagree') as e:
        load_sources(dst, [dict(checkpoint=str(tmp_path / 'mixed.pth'))], logger=None)
    assert 'b.weight' in str(e.value) and 'mixed.pth' in str(e.value)
    assert any(k in str(e.value) for k in ('c.weight', 'e.weight', 'd.weight'))
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@contextlib.contextmanager
def registered(repair: type):
    """``repair`` registered for the block, unregistered after."""
    from mmfusionload.registry import REPAIRS
    REPAIRS.register_module(module=repair)
    try:
        yield
    finally:
        REPAIRS.module_dict.pop(repair.__name__)


def _refused(dst: nn.Module, path: str) -> str:
    """The message of the load of ``path`` that verify refuses; ``dst`` unchanged."""
    before = snapshot(dst)
    with pytest.raises(FusionLoadError, match='computes another function') as e:
        load_sources(dst, [dict(checkpoint=path)], logger=None)
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    return str(e.value)


def test_verify_catches_a_wrong_registered_repair(tmp_path):
    from mmfusionload.load.repairs import Repair, module_layout

    class FlipKernel(Repair):
        name = 'flip_kernel'
        priority = 12

        def __call__(self, entry):
            if module_layout(entry.module) and entry.param_name == 'weight':
                entry.add_step(self.name, lambda t: t.flip(1).contiguous())

    src = Plain()
    torch.save(src.state_dict(), tmp_path / 'p.pth')
    dst = Plain()
    with registered(FlipKernel):
        msg = _refused(dst, str(tmp_path / 'p.pth'))
        assert 'p.pth' in msg and 'flip_kernel' in msg and 'spconv2 -> spconv2' in msg
        for name in ('a', 'b', 'c', 'e'):
            assert f'-> {name} (' in msg
        # each kernel that failed is a record of its source, no longer counted loaded
        with pytest.raises(FusionLoadError) as e:
            load_sources(dst, [dict(checkpoint=str(tmp_path / 'p.pth'))], logger=None)
        rep = e.value.report.sources[0]
        failed = [m.key for m in rep.mismatched if m.kind == 'verify']
        assert sorted(failed) == ['a.weight', 'b.weight', 'c.weight', 'e.weight']
        assert not set(failed) & set(rep.loaded) and 'd.weight' in rep.loaded
        # the load_from repair refuses the whole file before touching it (d's flip along
        # its size-1 axes leaves its values as they are: nothing to prove there)
        from mmfusionload.load.load_from import repair_checkpoint
        sd = OrderedDict(src.state_dict())
        ckpt = {'state_dict': sd}
        with pytest.raises(FusionLoadError, match='computes another function') as e:
            repair_checkpoint(ckpt, dst)
        assert str(e.value).count('computes another function') == 5  # title + a, b, c, e
        assert '-> d (' not in str(e.value) and '-> c (' in str(e.value)
        assert ckpt['state_dict'] is sd and list(sd) == list(src.state_dict())
        assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items())
        # verify=False trusts the repair (and loads its wrong result)
        load_sources(dst, [dict(checkpoint=str(tmp_path / 'p.pth'), verify=False)], logger=None)
        assert torch.equal(dst.c.weight, src.c.weight.flip(1))


def test_convert_without_model_converts_2d_3d_4d_kernels_by_function(tmp_path):
    """``convert --to-layout spconv2`` without a model: 2-D, 3-D and 4-D sparse kernels of
    an MMCV file (volume 1 included) compute, in spconv 2.x, what MMCV computed; a dense
    Conv2d weight elsewhere is left as it is."""
    from mmfusionload.cli.convert import convert_checkpoint
    kinds = ['subm3', 'subm1', 'conv1', 'conv3_s2', 'subm2d3', 'subm2d1', 'subm4d3', 'subm4d1']
    g = torch.Generator().manual_seed(5)
    sd = OrderedDict()
    for kind in kinds:
        shape = _make(kind, 'mmcv').weight.shape
        sd[f'pts_middle_encoder.{kind}.weight'] = torch.randn(shape, generator=g)
        sd[f'pts_middle_encoder.{kind}.bias'] = torch.randn(COUT, generator=g)
    sd['pts_middle_encoder.big.weight'] = torch.randn(3, 3, 3, 16, 16, generator=g)
    sd['img_backbone.stem.weight'] = torch.randn(16, 3, 3, 3, generator=g)
    sd._metadata = OrderedDict((k.rpartition('.')[0], {'version': 1}) for k in sd)
    torch.save({'state_dict': sd}, tmp_path / 'mmcv.pth')
    result = convert_checkpoint(str(tmp_path / 'mmcv.pth'), str(tmp_path / 'spconv2.pth'),
                                to_layout='spconv2')
    assert 'img_backbone.stem.weight' not in result.sparse
    out = torch.load(tmp_path / 'spconv2.pth', weights_only=True)['state_dict']
    assert torch.equal(out['img_backbone.stem.weight'], sd['img_backbone.stem.weight'])
    for kind in kinds:
        key = f'pts_middle_encoder.{kind}'
        assert result.sparse[f'{key}.weight'] == ('mmcv', 'spconv2')
        live = _make(kind, 'spconv')
        with torch.no_grad():  # a plain copy (MMDetection3D's override may patch load_state_dict)
            live.weight.copy_(out[f'{key}.weight'])
            live.bias.copy_(out[f'{key}.bias'])
        ic, ifeats, ishape, oc, ofeats, pair = run_spconv(kind, live)
        ref = reference(kind, sd[f'{key}.weight'], sd[f'{key}.bias'], ic, ifeats, ishape, oc,
                        pair)
        torch.testing.assert_close(ofeats.double(), ref, rtol=1e-5, atol=1e-5)


def test_hook_verify_option_is_every_source_default():
    from mmfusionload.hooks.fusion_load_hook import FusionLoadHook
    hook = FusionLoadHook(sources=[dict(checkpoint='a.pth'), dict(checkpoint='b.pth',
                                                                    verify=True)],
                          verify=False)
    assert [s.verify for s in hook.sources] == [False, True]
    with pytest.raises(FusionLoadError, match='verify'):
        FusionLoadHook(sources=[dict(checkpoint='a.pth')], verify='yes')
    with pytest.raises(FusionLoadError, match='spatial_order'):
        FusionLoadHook(sources=[dict(checkpoint='a.pth', spatial_order='yxz')])
    from mmfusionload.cli.commands import parse_source_arg
    assert parse_source_arg('checkpoint=a.pth,verify=false,spatial_order=zyx') == dict(
        checkpoint='a.pth', verify=False, spatial_order='zyx')


@pytest.mark.parametrize('kind', ['subm3', 'conv3_s2', 'conv1'])
def test_biased_spconv_conv_in_eval_mode_is_verified_and_loaded(kind, tmp_path):
    """A biased spconv 2.x conv in eval mode (spconv 2.3.8 refuses its bias on CPU in
    eval: "cpu don't support act and bias") is proven and loaded; its output, bias
    included, equals the dense reference of the MMCV checkpoint's weight and bias."""
    src = _make(kind, 'mmcv')
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(src.weight.shape, generator=g), torch.randn(COUT, generator=g)
    sd = OrderedDict([('enc.weight', w), ('enc.bias', b)])
    sd._metadata = OrderedDict([('enc', {'version': 1})])
    torch.save({'state_dict': sd}, tmp_path / 'mmcv.pth')
    live = Holder(_make(kind, 'spconv')).eval()
    assert live.enc.bias is not None and not live.enc.training
    report = load_sources(live, [dict(checkpoint=str(tmp_path / 'mmcv.pth'), modules=['enc'],
                                      spconv_layout='mmcv')], logger=None)
    s = report.sources[0]
    assert s.verified == 1 and s.verify_error < 1e-5 and not s.mismatched
    assert torch.equal(live.enc.bias.detach(), b)
    ic, ifeats, ishape, oc, ofeats, pair = run_spconv(kind, live.enc.train())
    ref = reference(kind, w, b, ic, ifeats, ishape, oc, pair)
    torch.testing.assert_close(ofeats.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_repair_named_cast_that_permutes_a_kernel_is_verified_and_refused(tmp_path):
    """Hostile: a registered repair calls its step ``cast`` and permutes sparse kernels
    (same shape for a cube kernel). Exemption from ``verify='auto'`` follows what the
    step does (values equal to the checkpoint's, cast), not its name: refused, the model
    unchanged; a true cast (float16 file into a float32 model) is still exempt."""
    from mmfusionload.load.repairs import Repair, module_layout

    class SwapChannels(Repair):
        name = 'cast'
        priority = 16

        def __call__(self, entry):
            w = entry.source
            if module_layout(entry.module) and entry.param_name == 'weight' \
                    and w.shape[0] == w.shape[-1]:  # the shape stays: in == out
                entry.add_step(self.name, lambda t: t.transpose(0, -1).contiguous())

    src = Plain()
    torch.save(src.state_dict(), tmp_path / 'p.pth')
    dst = Plain()
    with registered(SwapChannels):
        msg = _refused(dst, str(tmp_path / 'p.pth'))
    assert 'p.pth' in msg and 'repairs: cast' in msg
    for name in ('a', 'c', 'd'):  # the kernels with in == out ([3, 3, 3, 3, 3], ...)
        assert f'-> {name} (' in msg
    assert msg.count('computes another function') == 3
    half = OrderedDict((k, v.half()) for k, v in src.state_dict().items())
    torch.save(half, tmp_path / 'half.pth')
    report = load_sources(dst, [dict(checkpoint=str(tmp_path / 'half.pth'))], logger=None)
    s = report.sources[0]
    assert len(s.adapted['cast']) == len(half) and s.verified == 0
    assert torch.equal(dst.c.weight.detach(), half['c.weight'].float())


def test_verify_of_an_mmcv_target_does_not_trust_the_layout_definitions(tmp_path, monkeypatch):
    """A spconv 2.x kernel-1 stride-2 conv takes spconv's general path (its weight read
    transposed), not the ``conv1x1`` one. With the package's reading of that fact broken
    (the stride ignored, so the conversion and the definition agree on the wrong kernel),
    verify on an MMCV target still refuses the load: it runs the source through spconv
    and reads the target as MMCV does, densely."""
    from mmfusionload.sparse import layouts, modules
    monkeypatch.setattr(modules, 'is_pointwise',
                        lambda kernel, stride=(1, ), subm=True: layouts.volume(kernel) == 1)
    src = _make('conv1_s2', 'spconv')
    assert not src.conv1x1  # spconv itself: general path
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        src.weight.copy_(torch.randn(src.weight.shape, generator=g))
    sd = OrderedDict((f'enc.{k}', v) for k, v in src.state_dict().items())
    sd._metadata = OrderedDict([('enc', {'version': 2})])
    torch.save({'state_dict': sd}, tmp_path / 'spconv2.pth')
    live = Holder(_make('conv1_s2', 'mmcv'))
    before = snapshot(live)
    with pytest.raises(FusionLoadError, match='computes another function') as e:
        load_sources(live, [dict(checkpoint=str(tmp_path / 'spconv2.pth'), modules=['enc'])],
                     logger=None)
    assert 'spconv2 -> mmcv' in str(e.value) and 'spconv ran the source' in str(e.value)
    assert all(torch.equal(live.state_dict()[k], v) for k, v in before.items())
