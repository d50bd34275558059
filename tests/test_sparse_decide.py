"""One sparse-layout decider: ``identify``, ``convert`` (without a model) and a load take
the same decision with the same evidence on the same file; the model's geometry decides
only what the file leaves open; ``_metadata`` version 1 is never evidence."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

from builders import snapshot
from mmfusionload import FusionLoadError, load_sources
from mmfusionload.checkpoint.identify import identify
from mmfusionload.cli.convert import convert_checkpoint
from mmfusionload.load.pipeline import plan_source, read_source
from mmfusionload.load.source import parse_source

spconv = pytest.importorskip('spconv.pytorch')

KERNELS = [(3, 3, 3), (1, 1, 1), (3, 1, 1), (1, 3, 3)]
CHANNELS = [3, 4, 16]
CHOICES = "set spconv_layout='spconv2' or 'mmcv' or 'spconv2_rskc' on this source"


def stored(kernel, cin, cout, layout):
    """The stored shape, written out per library (not through the package's table)."""
    return {'spconv2': (cout, *kernel, cin), 'mmcv': (*kernel, cin, cout),
            'spconv2_rskc': (*kernel, cout, cin)}[layout]


class Convs(nn.Module):
    """Live spconv 2.3.8 submanifold convs ``c0``, ``c1``... of the given geometries."""

    def __init__(self, geoms, biases):
        super().__init__()
        for i, ((kernel, cin, cout), bias) in enumerate(zip(geoms, biases)):
            self.add_module(f'c{i}', spconv.SubMConv3d(cin, cout, kernel, bias=bias))


def write(path, geoms, biases, layout, versions):
    sd, meta = OrderedDict(), OrderedDict()
    for i, ((kernel, cin, cout), bias, version) in enumerate(zip(geoms, biases, versions)):
        sd[f'c{i}.weight'] = torch.zeros(stored(kernel, cin, cout, layout))
        if bias:
            sd[f'c{i}.bias'] = torch.zeros(cout)
        if version is not None:
            meta[f'c{i}'] = {'version': version}
    sd._metadata = meta
    torch.save(sd, path)


def three_ways(tmp_path, geoms, biases, layout, versions):
    """(identify, convert, load) decisions on one file: (layout, evidence) each; a refusal
    as (None, message)."""
    path = str(tmp_path / 'f.pth')
    write(path, geoms, biases, layout, versions)
    ident = identify(path)
    try:
        conv = convert_checkpoint(path, str(tmp_path / 'out.pth'))
        layouts = {src for src, _ in conv.sparse.values()}
        converted = (layouts.pop() if layouts else None, conv.layout_evidence)
    except FusionLoadError as e:
        converted = (None, str(e))
    model = Convs(geoms, biases)
    spec = parse_source(dict(checkpoint=path))
    plan = plan_source(model, spec, read_source(spec))
    d = next(e.context.cache['sparse'] for e in plan.entries if e.key.endswith('.weight'))
    return ((ident.layout, ident.layout_evidence), converted, (d.layout, d.why), d, plan)


@settings(max_examples=60, deadline=None, derandomize=True)
@example([((3, 3, 3), 16, 16, False), ((3, 1, 1), 16, 16, False)], 'spconv2_rskc', 2)
@example([((3, 3, 3), 4, 4, False), ((3, 3, 3), 4, 16, True)], 'mmcv', 1)
@example([((1, 1, 1), 4, 16, False), ((3, 3, 3), 16, 16, True)], 'spconv2_rskc', None)
@given(st.lists(st.tuples(st.sampled_from(KERNELS), st.sampled_from(CHANNELS),
                          st.sampled_from(CHANNELS), st.booleans()), min_size=1, max_size=3),
       st.sampled_from(['spconv2', 'mmcv', 'spconv2_rskc']),
       st.sampled_from([None, 1, 2]))
def test_identify_convert_and_load_decide_alike(tmp_path_factory, convs, layout, version):
    if version == 2 and layout == 'mmcv':  # version 2 is only written on spconv 2.x modules
        version = 1
    tmp_path = tmp_path_factory.mktemp('grid')
    geoms = [(k, cin, cout) for k, cin, cout, _ in convs]
    biases = [b for *_, b in convs]
    ident, conv, load, d, plan = three_ways(tmp_path, geoms, biases, layout,
                                            [version] * len(geoms))
    # version 1 is nobody's proof; a consistent file is never read as contradictory
    for _, evidence in (ident, conv, load):
        assert 'version 1 on' not in evidence and 'disagree' not in evidence
    assert ident == conv
    assert ident[0] in (None, layout)  # never a wrong layout
    if ident[0] is not None:  # the file decides: the load takes the same decision, same words
        assert load == ident and not d.decision.by_model
        assert not plan.problems
    elif load[0] is not None:  # the model's geometry decides what the file leaves open
        assert load[0] == layout and d.decision.by_model
        assert ' fit their modules only in the ' in load[1]
    else:  # nothing decides: refused, naming the option
        assert plan.problems and all(CHOICES in p for p in plan.problems)


def test_cube_kernels_with_version_1_are_undecided_everywhere(tmp_path):
    """Two (3,3,3,4,4) kernels with _metadata version 1: nothing decides, and the evidence
    says so (version 1 is every module's default)."""
    geoms = [((3, 3, 3), 4, 4)] * 2
    ident, conv, load, d, plan = three_ways(tmp_path, geoms, [False, False], 'mmcv', [1, 1])
    evidence = ('all 2 sparse kernels read as spconv2 [out, *k, in] or mmcv [*k, in, out] or '
                'spconv2_rskc [*k, out, in] alike, e.g. c0.weight [3, 3, 3, 4, 4]; nothing '
                'in the file decides (no layout is written in a file, and _metadata version 1 '
                "is every module's default)")
    assert ident == conv == (None, evidence)
    # the model rules out spconv2 ([4, 3, 3, 3, 4]) but not mmcv vs spconv2_rskc: refused
    assert load == (None, 'all 2 sparse kernels fit their modules as mmcv [*k, in, out] or '
                    'spconv2_rskc [*k, out, in] alike, e.g. c0.weight [3, 3, 3, 4, 4] in c0 '
                    '(kernel [3, 3, 3], 4 -> 4); nothing in the file decides (nor in the '
                    'model; no layout is written in a file, and _metadata version 1 is every '
                    "module's default)")
    assert plan.problems == [f'{tmp_path}/f.pth: {load[1]}; {CHOICES}']
    model = Convs(geoms, [False, False])
    before = snapshot(model)
    with pytest.raises(FusionLoadError, match="'spconv2_rskc' on this source"):
        load_sources(model, [dict(checkpoint=str(tmp_path / 'f.pth'))], logger=None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_one_kernel_that_fits_mmcv_only_decides(tmp_path):
    """The cube kernels plus one (3,3,3,4,16): with its bias the file itself decides
    (identify, convert and the load say the same); without, the model does."""
    geoms = [((3, 3, 3), 4, 4)] * 2 + [((3, 3, 3), 4, 16)]
    ident, conv, load, d, plan = three_ways(tmp_path, geoms, [False, False, True], 'mmcv',
                                            [1, 1, 1])
    evidence = ('1 of 3 sparse kernels fit only the mmcv layout [*k, in, out], e.g. '
                'c2.weight [3, 3, 3, 4, 16] (out 16: c2.bias)')
    assert ident == conv == load == ('mmcv', evidence) and not plan.problems
    ident, conv, load, d, plan = three_ways(tmp_path, geoms, [False] * 3, 'mmcv', [1, 1, 1])
    assert ident[0] is None and ident == conv
    assert load == ('mmcv', '1 of 3 sparse kernels fit their modules only in the mmcv layout '
                    '[*k, in, out], e.g. c2.weight [3, 3, 3, 4, 16] in c2 (kernel [3, 3, 3], '
                    '4 -> 16)')
    assert not plan.problems


def test_version_2_rules_out_mmcv(tmp_path):
    """``_metadata`` version 2 (MMDetection3D's spconv 2.x modules): an ``in == out`` kernel
    that reads as mmcv and spconv2_rskc alike is spconv2_rskc; one reading as all three
    stays open between the two spconv 2.x layouts."""
    geoms = [((3, 3, 3), 16, 16)]
    ident, conv, load, d, plan = three_ways(tmp_path, geoms, [False], 'spconv2_rskc', [2])
    assert ident == conv == load == (
        'spconv2_rskc', '1 of 1 sparse kernels fit only the spconv2_rskc layout [*k, out, in], '
        'e.g. c0.weight [3, 3, 3, 16, 16] with _metadata version 2 (a spconv 2.x module)')
    geoms = [((3, 3, 3), 3, 3)]
    ident, conv, load, d, plan = three_ways(tmp_path, geoms, [False], 'spconv2', [2])
    assert ident[0] is None and 'as spconv2 [out, *k, in] or spconv2_rskc [*k, out, in] ' \
        'alike' in ident[1]


def test_output_width_from_bias_or_the_batchnorm_after_the_conv(tmp_path):
    """Without a model, the conv's bias or the BatchNorm right after it (MMDetection3D's
    make_sparse_convmodule ``<seq>.0``/``<seq>.1``, SparseBasicBlock ``convN``/``bnN``)
    tells [*k, in, out] from [*k, out, in]: identify and convert read an MMCV file."""
    from mmfusionload.sparse.decide import out_width
    shapes = {'enc.conv_input.0.weight': (3, 3, 3, 4, 16),
              'enc.conv_input.1.running_mean': (16, ),
              'enc.blk.conv1.weight': (3, 3, 3, 16, 32), 'enc.blk.bn1.running_mean': (32, ),
              'enc.c.weight': (3, 3, 3, 8, 8), 'enc.c.bias': (8, ), 'enc.d.weight': (1, )}
    assert out_width('enc.conv_input.0.weight', shapes) == (16, 'enc.conv_input.1.running_mean')
    assert out_width('enc.blk.conv1.weight', shapes) == (32, 'enc.blk.bn1.running_mean')
    assert out_width('enc.c.weight', shapes) == (8, 'enc.c.bias')
    assert out_width('enc.d.weight', shapes) is None
    sd = OrderedDict((k, torch.zeros(s)) for k, s in shapes.items() if k != 'enc.d.weight')
    torch.save(sd, tmp_path / 'mmcv.pth')
    ident = identify(str(tmp_path / 'mmcv.pth'))
    assert (ident.layout, ident.layout_evidence) == (
        'mmcv', '2 of 3 sparse kernels fit only the mmcv layout [*k, in, out], e.g. '
        'enc.conv_input.0.weight [3, 3, 3, 4, 16] (out 16: enc.conv_input.1.running_mean)')
    conv = convert_checkpoint(str(tmp_path / 'mmcv.pth'), str(tmp_path / 'out.pth'),
                              to_layout='spconv2')
    assert conv.layout_evidence == ident.layout_evidence
    assert set(conv.sparse.values()) == {('mmcv', 'spconv2')}
