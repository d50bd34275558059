"""spconv 2.0/2.1 Native kernels (``[*k, out, in]``, layout ``spconv2_rskc``) and 2-D
kernels marked by ``_metadata`` version 2, proven by function: spconv 2.3.8 modules and
dense ``torch.nn.functional`` references built from the libraries' own readings, never
from this package's conversions."""
import itertools
from collections import OrderedDict

import pytest
import torch

from builders import build, randomize, snapshot
from mmfusionload import FusionLoadError, load_sources
from test_sparse_semantics import CIN, COUT, KINDS, Holder, _make, reference, run_spconv

spconv = pytest.importorskip('spconv.pytorch')

pytestmark = pytest.mark.usefixtures('one_thread')


def spconv21_reading(kind: str, w: torch.Tensor) -> torch.Tensor:
    """What spconv 2.1.25 computes with its Native weight ``w`` ``[*k, out, in]``
    (``spconv/pytorch/conv.py``, ``ops.indice_conv``), as a ``[*k, in, out]`` kernel for
    the dense reference: its conv1x1 path (volume 1, submanifold or stride 1; the same
    test as 2.3.8's ``conv1x1``) is ``mm(features, weight.view(in, out))``, every other
    path uses ``weight[k].T`` at offset ``k``."""
    if _make(kind, 'spconv').conv1x1:
        return w.reshape(*w.shape[:-2], CIN, COUT)
    return w.transpose(-1, -2)


@pytest.mark.parametrize('kind', list(KINDS))
def test_spconv21_kernel_computes_in_spconv23_what_spconv21_computed(kind, tmp_path):
    """A spconv 2.1 Native kernel loads, with no option (its shape decides), into a
    spconv 2.3.8 module that computes what spconv 2.1 computed with it."""
    ndim = KINDS[kind][0]
    kernel = tuple(_make(kind, 'spconv').kernel_size)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(*kernel, COUT, CIN, generator=g)
    b = torch.randn(COUT, generator=g)
    sd = OrderedDict([('enc.weight', w), ('enc.bias', b)])
    torch.save({'state_dict': sd}, tmp_path / 'spconv21.pth')
    live = Holder(_make(kind, 'spconv'))
    report = load_sources(live, [dict(checkpoint=str(tmp_path / 'spconv21.pth'))],
                          logger=None)
    assert report.sources[0].verified == 1
    ic, ifeats, ishape, oc, ofeats, pair = run_spconv(kind, live.enc)
    assert len(oc) > 0 and ndim == len(kernel)
    ref = reference(kind, spconv21_reading(kind, w), b, ic, ifeats, ishape, oc, pair)
    torch.testing.assert_close(ofeats.double(), ref, rtol=1e-5, atol=1e-5)


ENCODER = dict(type='SparseEncoder', in_channels=4, sparse_shape=[41, 16, 16],
               base_channels=8, output_channels=16,
               encoder_channels=((8, ), (16, 16), (16, 16), (16, 16)),
               encoder_paddings=((1, ), (1, 1), (1, 1), ((0, 1, 1), 1)))
CUBES = dict(ENCODER, in_channels=8, output_channels=8,
             encoder_channels=((8, ), (8, 8), (8, 8), (8, 8)))


def sparse_convs(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, spconv.conv.SparseConvolution)}


def spconv21_state(model, version):
    """``model``'s state dict as spconv 2.1 on a CPU-only build saves it: every sparse
    kernel as allocated by the Native algorithm, ``[*k, out, in]``, holding at each
    offset the ``[out, in]`` matrix spconv 2.3.8 reads from ``weight[:, k, :]`` (a
    volume-1 conv1x1 weight is read as ``view(in, out)`` by both: the same memory)."""
    sd = OrderedDict(model.state_dict())
    meta = OrderedDict((k, dict(v)) for k, v in model.state_dict()._metadata.items())
    for name, m in sparse_convs(model).items():
        w = sd[f'{name}.weight']
        n = w.dim() - 2
        sd[f'{name}.weight'] = (w.reshape(*w.shape[1:-1], m.out_channels, m.in_channels)
                                if m.conv1x1 else w.permute(*range(1, n + 1), 0, n + 1))
        if version is None:
            meta[name].pop('version', None)
        else:
            meta[name]['version'] = version
    sd._metadata = meta
    return sd


def encode(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.tensor(list(itertools.product(range(41), range(16), range(16))))
    coords = coords[torch.rand(len(coords), generator=g) < 0.03]
    coors = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    feats = torch.randn(len(coords), model.in_channels, generator=g)
    model.eval()
    with torch.no_grad():
        return model(feats, coors.int(), 1)


@pytest.mark.parametrize('version', [None, 2])
def test_spconv21_cpu_encoder_checkpoint_loads_and_computes_the_same(version, tmp_path):
    """A SparseEncoder checkpoint saved by spconv 2.1 on a CPU-only build (plain: no
    _metadata version; through MMDetection3D: version 2) loads into the spconv 2.3.8
    model with no option, and the model computes what the source model computed."""
    src = randomize(build(ENCODER), seed=1)
    path = tmp_path / 'spconv21_cpu.pth'
    torch.save({'state_dict': spconv21_state(src, version)}, path)
    dst = randomize(build(ENCODER), seed=2)
    report = load_sources(dst, [dict(checkpoint=str(path))], logger=None)
    src_report = report.sources[0]
    assert len(src_report.adapted['spconv_layout']) == len(sparse_convs(dst))
    assert src_report.verified == len(sparse_convs(dst))
    torch.testing.assert_close(encode(dst), encode(src), rtol=1e-5, atol=1e-5)
    for name, m in sparse_convs(src).items():  # written back as 2.3.8 allocates them
        assert torch.equal(dst.get_submodule(name).weight, m.weight), name


def test_cube_only_spconv21_checkpoint_is_refused_until_the_source_says(tmp_path):
    """Every kernel in == out: [*k, out, in] and MMCV's [*k, in, out] have one shape and
    nothing in the file tells them apart (version 1). The load is refused naming the
    option, the model untouched; with spconv_layout='spconv2_rskc' it computes the same."""
    src = randomize(build(CUBES), seed=3)
    path = tmp_path / 'cubes.pth'
    torch.save({'state_dict': spconv21_state(src, 1)}, path)
    dst = randomize(build(CUBES), seed=4)
    before = snapshot(dst)
    with pytest.raises(FusionLoadError) as e:
        load_sources(dst, [dict(checkpoint=str(path))], logger=None)
    msg = str(e.value)
    assert 'cubes.pth' in msg and "spconv_layout='spconv2' or 'mmcv' or 'spconv2_rskc'" in msg
    assert 'fit their modules as mmcv [*k, in, out] or spconv2_rskc [*k, out, in] alike' in msg
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())
    load_sources(dst, [dict(checkpoint=str(path), spconv_layout='spconv2_rskc')], logger=None)
    torch.testing.assert_close(encode(dst), encode(src), rtol=1e-5, atol=1e-5)
    # read as MMCV's layout (K^T at every offset) it would compute another function
    dst2 = randomize(build(CUBES), seed=4)
    load_sources(dst2, [dict(checkpoint=str(path), spconv_layout='mmcv')], logger=None)
    assert not torch.allclose(encode(dst2), encode(src), rtol=1e-3, atol=1e-3)


def test_convert_to_rskc_without_model_computes_the_same_in_spconv21_reading(tmp_path):
    """``convert --to-layout spconv2_rskc``: a spconv 2.x KRSC file (decided by its shapes)
    becomes kernels spconv 2.1's reading computes the source function with."""
    from mmfusionload.cli.convert import convert_checkpoint
    kinds = ['subm3', 'subm1', 'conv3_s2', 'subm2d3', 'subm4d3']
    g = torch.Generator().manual_seed(9)
    sd, mods = OrderedDict(), {}
    for kind in kinds:
        mods[kind] = m = _make(kind, 'spconv')
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(torch.randn(COUT, generator=g))
        sd[f'pts_middle_encoder.{kind}.weight'] = m.weight.detach().clone()
        sd[f'pts_middle_encoder.{kind}.bias'] = m.bias.detach().clone()
    torch.save({'state_dict': sd}, tmp_path / 'krsc.pth')
    result = convert_checkpoint(str(tmp_path / 'krsc.pth'), str(tmp_path / 'rskc.pth'),
                                to_layout='spconv2_rskc')
    out = torch.load(tmp_path / 'rskc.pth', weights_only=True)['state_dict']
    for kind in kinds:
        key = f'pts_middle_encoder.{kind}'
        assert result.sparse[f'{key}.weight'] == ('spconv2', 'spconv2_rskc')
        ic, ifeats, ishape, oc, ofeats, pair = run_spconv(kind, mods[kind])
        ref = reference(kind, spconv21_reading(kind, out[f'{key}.weight']), out[f'{key}.bias'],
                        ic, ifeats, ishape, oc, pair)
        torch.testing.assert_close(ofeats.double(), ref, rtol=1e-5, atol=1e-5)


def test_convert_2d_kernel_marked_by_metadata_version_2(tmp_path):
    """``convert --to-layout mmcv`` without a model: a 2-D spconv kernel [out, kh, kw, in]
    that also reads as a dense Conv2d weight is a sparse kernel when its module has
    _metadata version 2; converted, MMCV's reading of it ([*k, in, out] as is, through a
    dense reference) computes what the spconv 2.3.8 SubMConv2d computed. Dense weights
    (a Conv2d; MMCV's DeformConv2dPack, which writes version 2 too) stay, and are named."""
    from mmfusionload.cli.convert import convert_checkpoint
    src = _make('subm2d3', 'spconv')  # weight [6, 3, 3, 4]: also a Conv2d [6, 4->3, 3, 4]?
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        src.weight.copy_(torch.randn(src.weight.shape, generator=g))
        src.bias.copy_(torch.randn(COUT, generator=g))
    assert tuple(src.weight.shape) == (COUT, 3, 3, CIN)
    sd = OrderedDict([('bev.sparse.weight', src.weight.detach().clone()),
                      ('bev.sparse.bias', src.bias.detach().clone()),
                      ('img_backbone.stem.weight', torch.randn(8, 3, 3, 3, generator=g)),
                      ('img_neck.dcn.weight', torch.randn(8, 4, 3, 3, generator=g)),
                      ('img_neck.dcn.conv_offset.weight', torch.randn(18, 4, 3, 3,
                                                                      generator=g))])
    sd._metadata = OrderedDict([('bev.sparse', {'version': 2}),
                                ('img_backbone.stem', {'version': 1}),
                                ('img_neck.dcn', {'version': 2}),
                                ('img_neck.dcn.conv_offset', {'version': 1})])
    torch.save({'state_dict': sd}, tmp_path / 'bev2d.pth')
    result = convert_checkpoint(str(tmp_path / 'bev2d.pth'), str(tmp_path / 'mmcv.pth'),
                                to_layout='mmcv')
    out = torch.load(tmp_path / 'mmcv.pth', weights_only=True)['state_dict']
    assert result.sparse == {'bev.sparse.weight': ('spconv2', 'mmcv')}
    ic, ifeats, ishape, oc, ofeats, pair = run_spconv('subm2d3', src)
    ref = reference('subm2d3', out['bev.sparse.weight'], out['bev.sparse.bias'], ic, ifeats,
                    ishape, oc, pair)
    torch.testing.assert_close(ofeats.double(), ref, rtol=1e-5, atol=1e-5)
    for key in ('img_backbone.stem.weight', 'img_neck.dcn.weight'):
        assert torch.equal(out[key], sd[key])
    note = next(n for n in result.notes if 'left as they are' in n)
    assert 'img_backbone.stem.weight' in note and 'img_neck.dcn.weight' in note


def test_openpcdet_axis_order_reads_a_spconv21_conv_out():
    """OpenPCDet's conv_out (kernel (3, 1, 1), 64 -> 128) saved by spconv 2.0/2.1 Native,
    [3, 1, 1, 128, 64]: with its BatchNorm's 128 channels it shows a z-y-x encoder."""
    from mmfusionload.formats.openpcdet import _kernel_order
    assert _kernel_order((3, 1, 1, 128, 64), 128) == 'zyx'
    assert _kernel_order((128, 3, 1, 1, 64), 128) == 'zyx'
    assert _kernel_order((3, 1, 1, 64, 128), 128) == 'zyx'
