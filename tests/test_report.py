"""Records and one vocabulary: the demo's load rendered exactly (log and command tables, one
legend), mismatches as records in the JSON, and the command table counting them by record."""
import contextlib
import io
import json
import os
import re

import pytest
import torch
import torch.nn as nn

from mmfusionload import load_sources
from mmfusionload.cli.render import Inspection, render, source_table
from mmfusionload.report import (KEY_STATUSES, STATUSES, LoadReport, Mismatch, SourceReport,
                                 legend, mismatch_problems)

pytest.importorskip('spconv')

DEMO_LOG = '''
demo: 2 source(s), applied
┏━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┓
┃ source ┃ file                  ┃ loaded ┃ repaired ┃ regenerated ┃ note                          ┃
┡━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┩
│ lidar  │ lidar_mmcv_layout.pth │    210 │       21 │           - │                               │
│ camera │ swin_detector.pth     │    175 │        - │          12 │ kept (nothing in the          │
│        │                       │        │          │             │ checkpoint): img_neck,        │
│        │                       │        │          │             │ view_transform                │
└────────┴───────────────────────┴────────┴──────────┴─────────────┴───────────────────────────────┘
[lidar] ./lidar_mmcv_layout.pth: container state_dict, targets pts_voxel_encoder,
pts_middle_encoder, pts_backbone, pts_neck, prefix identity, 0 tensor(s) outside the targets,
repairs: spconv_layout 21, verified by function: 21 sparse conv(s), largest error <e>
[lidar] format: MMDetection3D detector; sparse kernels mmcv; axes x-y-z
[lidar] weights: state_dict: weights, state_dict container (auto: the only copy)
[camera] ./swin_detector.pth: container state_dict, targets img_backbone, img_neck, view_transform,
prefix backbone. -> img_backbone., 0 tensor(s) outside the targets
[camera] format: unknown format (backbone. (187))
[camera] weights: state_dict: weights, state_dict container (auto: the only copy)
[lidar] repaired (spconv_layout) (21): pts_middle_encoder.conv_input.0.weight;
pts_middle_encoder.conv_out.0.weight;
pts_middle_encoder.encoder_layers.encoder_layer{1..3}.2.0.weight;
pts_middle_encoder.encoder_layers.encoder_layer{1..4}.{0,1}.conv{1,2}.weight
[camera] regenerated (12): img_backbone.stages.2.blocks.{0..5}.attn.w_msa.relative_position_index;
img_backbone.stages.{0,1,3}.blocks.{0,1}.attn.w_msa.relative_position_index
legend: loaded = written into the model from the checkpoint (repaired ones included); repaired =
loaded after a registered repair changed it (layout, axis order, dtype, size...); regenerated =
derived tensor the model computes itself (the checkpoint copy is not used); kept = target module the
checkpoint provides nothing for (its tensors keep the model's values)
'''

DEMO_COMMAND = '''
────────────────────────────────────── demo: 2 source(s), ok ───────────────────────────────────────
[lidar] ./lidar_mmcv_layout.pth: container state_dict, targets pts_voxel_encoder,
pts_middle_encoder, pts_backbone, pts_neck, prefix identity, 0 tensor(s) outside the targets,
repairs: spconv_layout 21, verified by function: 21 sparse conv(s), largest error <e>
[lidar] format: MMDetection3D detector; sparse kernels mmcv; axes x-y-z
[lidar] weights: state_dict: weights, state_dict container (auto: the only copy)
┏━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━┳━━━━━━┓
┃ model module       ┃ loaded ┃ repaired ┃ note ┃
┡━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━╇━━━━━━┩
│ pts_voxel_encoder  │      - │        - │      │
│ pts_middle_encoder │    126 │       21 │      │
│ pts_backbone       │     72 │        - │      │
│ pts_neck           │     12 │        - │      │
└────────────────────┴────────┴──────────┴──────┘
[lidar] repaired (spconv_layout) (21): pts_middle_encoder.conv_input.0.weight;
pts_middle_encoder.conv_out.0.weight;
pts_middle_encoder.encoder_layers.encoder_layer{1..3}.2.0.weight;
pts_middle_encoder.encoder_layers.encoder_layer{1..4}.{0,1}.conv{1,2}.weight
[camera] ./swin_detector.pth: container state_dict, targets img_backbone, img_neck, view_transform,
prefix backbone. -> img_backbone., 0 tensor(s) outside the targets
[camera] format: unknown format (backbone. (187))
[camera] weights: state_dict: weights, state_dict container (auto: the only copy)
┏━━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┓
┃ model module   ┃ loaded ┃ regenerated ┃ note                             ┃
┡━━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┩
│ img_backbone   │    175 │          12 │                                  │
│ img_neck       │      - │           - │ kept (nothing in the checkpoint) │
│ view_transform │      - │           - │ kept (nothing in the checkpoint) │
└────────────────┴────────┴─────────────┴──────────────────────────────────┘
[camera] regenerated (12): img_backbone.stages.2.blocks.{0..5}.attn.w_msa.relative_position_index;
img_backbone.stages.{0,1,3}.blocks.{0,1}.attn.w_msa.relative_position_index
legend: loaded = written into the model from the checkpoint (repaired ones included); repaired =
loaded after a registered repair changed it (layout, axis order, dtype, size...); regenerated =
derived tensor the model computes itself (the checkpoint copy is not used); kept = target module the
checkpoint provides nothing for (its tensors keep the model's values)
'''


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """The demo's load (``python -m mmfusionload demo``), its files named from their folder."""
    from mmfusionload.cli.demo import run_demo
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp('demo'))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return run_demo('.')
    finally:
        os.chdir(here)


def _plain(text: str) -> str:
    """Rendered text with the verify error (a float that depends on the machine's
    arithmetic) as ``<e>`` and no trailing blanks."""
    text = re.sub(r'largest error \S+', 'largest error <e>', text)
    return '\n'.join(line.rstrip() for line in text.splitlines()).strip('\n')


def _console(width=100):
    from rich.console import Console
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=False, color_system=None,
                   no_color=True), buf


def test_demo_log_table_exact(demo):
    assert _plain(demo.format(width=100)) == DEMO_LOG.strip('\n')
    assert 0 < demo.sources[0].verify_error < 1e-4


def test_demo_command_tables_exact(demo):
    console, buf = _console()
    render([Inspection('demo', demo)], console)
    assert _plain(buf.getvalue()) == DEMO_COMMAND.strip('\n')


def test_demo_counts_use_the_vocabulary(demo):
    report = demo
    lidar, camera = (s.to_dict() for s in report.sources)
    assert list(lidar['counts']) == list(STATUSES) + ['repaired:spconv_layout']
    assert lidar['counts'] == dict(loaded=210, repaired=21, regenerated=0, new=0, kept=0,
                                   excluded=0, missing=0, mismatched=0, unexpected=0,
                                   ignored=0, **{'repaired:spconv_layout': 21})
    assert camera['counts'] == dict(loaded=175, repaired=0, regenerated=12, new=0, kept=2,
                                    excluded=0, missing=0, mismatched=0, unexpected=0,
                                    ignored=0)
    assert camera['kept'] == ['img_neck', 'view_transform']
    # the data field has the table's word; the former name still reads
    assert len(report.sources[0].repaired['spconv_layout']) == 21
    assert report.sources[0].adapted is report.sources[0].repaired
    assert 'adapted' not in lidar


def test_legend_names_the_words_shown_in_table_order():
    assert legend(['mismatched', 'loaded']) == (
        'legend: loaded = ' + STATUSES['loaded'] + '; mismatched = ' + STATUSES['mismatched'])
    assert 'kept = ' not in legend(['loaded'], [SourceReport('a.pth', 'x')])
    assert legend(['loaded'], [SourceReport('a.pth', 'x', kept=['neck'])]).endswith(
        'kept = ' + STATUSES['kept'])
    # every per-key status is a table column and a count
    src = SourceReport('a.pth', 'x', targets=['a'], loaded=['a.w', 'a.b'],
                       repaired={'cast': ['a.w']}, regenerated=['a.r'], new=['a.n'], excluded=['a.e'], missing=['a.m'],
                       mismatched=[Mismatch('a.s', 'a.s', [2], [3])], unexpected=['a.u'])
    table, words = LoadReport([src]).table()
    assert words == list(KEY_STATUSES)
    assert [c.header for c in table.columns] == ['source', 'file', *KEY_STATUSES, 'note']
    assert all(src.counts()[w] == (2 if w == 'loaded' else 1) for w in KEY_STATUSES)
    text = ' '.join(LoadReport([src]).format(details=False).split())
    assert text.endswith(' '.join(legend(KEY_STATUSES).split()))


class Net(nn.Module):

    def __init__(self, width=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))


def test_mismatches_are_records_in_the_report_and_the_json(tmp_path):
    other = Net(width=5).state_dict()
    torch.save({'backbone.' + k[len('net.'):]: v for k, v in other.items()}, tmp_path / 'w.pth')
    path = str(tmp_path / 'w.pth')
    report = load_sources(Net(), [dict(checkpoint=path, prefix={'backbone.': 'net.'})],
                          dry_run=True, logger=None)
    src = report.sources[0]
    assert src.mismatched == [
        Mismatch('net.0.weight', 'backbone.0.weight', [5, 3], [4, 3]),
        Mismatch('net.0.bias', 'backbone.0.bias', [5], [4]),
        Mismatch('net.1.weight', 'backbone.1.weight', [2, 5], [2, 4])]
    assert src.loaded == ['net.1.bias']
    # the problem lines are rendered from the records
    assert report.problems == [
        f'{path}: size mismatch for net.0.weight (checkpoint backbone.0.weight): '
        'checkpoint [5, 3], model [4, 3]',
        f'{path}: size mismatch for net.0.bias (checkpoint backbone.0.bias): '
        'checkpoint [5], model [4]',
        f'{path}: size mismatch for net.1.weight (checkpoint backbone.1.weight): '
        'checkpoint [2, 5], model [2, 4]']
    data = json.loads(report.to_json())['sources'][0]
    assert data['mismatched'][0] == dict(
        key='net.0.weight', file_key='backbone.0.weight', checkpoint_shape=[5, 3],
        model_shape=[4, 3], kind='shape',
        reason="the checkpoint tensor's shape differs from the model's")
    assert data['counts']['mismatched'] == 3 and data['counts']['loaded'] == 1


def test_mismatch_problems_once_per_repair_problem_then_sizes():
    recs = [Mismatch('a.w', 'a.w', [1], [2]),
            Mismatch('b.w', 'b.w', [3, 3, 3, 4, 4], [4, 3, 3, 3, 4], 'repair', 'f: ambiguous'),
            Mismatch('c.w', 'c.w', [3, 3, 3, 4, 4], [4, 3, 3, 3, 4], 'repair', 'f: ambiguous')]
    assert mismatch_problems('f', recs, lambda k: k) == [
        'f: ambiguous', 'f: size mismatch for a.w: checkpoint [1], model [2]']
    with pytest.raises(ValueError, match='kind'):
        Mismatch('a', 'a', [1], [1], 'other')


def test_command_table_counts_mismatches_by_their_record():
    """A mismatch is counted under the module of its record's key, whatever its message
    names (here another model key first, as a repair message may)."""
    src = SourceReport('load_from.pth', 'load_from', targets=['<model>'],
                       loaded=['head.w'],
                       mismatched=[Mismatch('neck.w', 'neck.w', [2], [3], 'repair',
                                            'load_from.pth: head.w decided the layout of neck.w')])
    rows = {name: counts for name, counts, _ in src.module_rows()}
    assert rows['neck']['mismatched'] == 1 and rows['head']['mismatched'] == 0
    table, words = source_table(src)
    assert words == ['loaded', 'mismatched']
    console, buf = _console()
    console.print(table)
    rows = [line.split() for line in buf.getvalue().splitlines() if 'neck' in line or 'head' in line]
    assert rows == [['│', 'head', '│', '1', '│', '-', '│', '│'],
                    ['│', 'neck', '│', '-', '│', '1', '│', '│']]


def test_a_tensor_whose_values_cannot_load_is_a_record(tmp_path):
    """A NaN in the checkpoint: a mismatch of kind 'value' with the problem line, no longer
    counted loaded; with allow_nonfinite=True it loads."""
    sd = Net().state_dict()
    sd['net.1.bias'] = torch.tensor([0.0, float('nan')])
    path = str(tmp_path / 'nan.pth')
    torch.save(sd, path)
    report = load_sources(Net(), [dict(checkpoint=path)], dry_run=True, logger=None)
    src = report.sources[0]
    (problem, ) = report.problems
    assert 'net.1.bias' in problem and 'NaN/Inf' in problem
    assert src.mismatched == [Mismatch('net.1.bias', 'net.1.bias', [2], [2], 'value', problem)]
    assert 'net.1.bias' not in src.loaded and len(src.loaded) == 3
    assert src.counts()['mismatched'] == 1 and src.counts()['loaded'] == 3
    report = load_sources(Net(), [dict(checkpoint=path, allow_nonfinite=True)], dry_run=True,
                          logger=None)
    assert report.ok and report.sources[0].mismatched == [] and len(report.sources[0].loaded) == 4
