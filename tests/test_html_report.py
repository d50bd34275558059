"""The report page, rendered in headless Chromium: the tree's counts per module and status,
filters, problems linked to their modules, escaping of hostile text, size, a screenshot."""
import os
import os.path as osp
import struct
import sys
from collections import OrderedDict, defaultdict
from html.parser import HTMLParser
from typing import Dict, List

import pytest
import torch
import torch.nn as nn

from mmfusionload import FusionLoadError, LoadReport, SourceReport, load_sources
from mmfusionload.report import Placed

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from browser import dump_dom, screenshot  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class Dom(HTMLParser):
    """The elements the tests read from a dumped DOM."""

    def __init__(self, text: str):
        super().__init__()
        self.modules: Dict[str, dict] = {}
        self.rows: List[dict] = []
        self.problems: List[dict] = []
        self.tags = defaultdict(int)
        self._li = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        classes = (a.get('class') or '').split()
        if tag == 'details' and 'mod' in classes:
            self.modules[a['data-path']] = a
        elif tag == 'tr' and 'tensor' in classes:
            self.rows.append(dict(a, hidden='hidden' in classes))
        elif tag == 'li' and 'problem' in classes:
            self._li = dict(text='', module=None)
            self.problems.append(self._li)
        elif tag == 'a' and 'goto' in classes and self._li is not None:
            self._li['module'] = a['data-module']

    def handle_endtag(self, tag):
        if tag == 'li':
            self._li = None

    def handle_data(self, data):
        if self._li is not None:
            self._li['text'] += data


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _expected(model: nn.Module, statuses: Dict[str, str]) -> Dict[str, Dict[str, int]]:
    """Module path -> category -> values, from the model and the given per-key categories
    (the test's own accounting, not the page's)."""
    out: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, t in model.state_dict().items():
        parts = key.split('.')
        for n in range(len(parts)):
            out['.'.join(parts[:n])][statuses.get(key, 'kept')] += t.numel()
    return out


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """The demo's load (a LiDAR file in MMCV's layout, a camera detector file) and its page."""
    from mmfusionload.cli.demo import BEVFusionLike, randomize, to_mmcv_layout
    d = tmp_path_factory.mktemp('demo')
    trained = randomize(BEVFusionLike(), seed=1)
    sd = trained.state_dict()
    lidar = to_mmcv_layout(OrderedDict((k, v) for k, v in sd.items() if k.startswith('pts_')),
                           trained)
    torch.save({'state_dict': lidar}, d / 'lidar.pth')
    cam = OrderedDict(('backbone.' + k[len('img_backbone.'):], v) for k, v in sd.items()
                      if k.startswith('img_backbone.'))
    torch.save({'state_dict': cam}, d / 'camera.pth')
    model = BEVFusionLike()
    report = load_sources(model, [dict(modality='lidar', checkpoint=str(d / 'lidar.pth')),
                                  dict(modality='camera', checkpoint=str(d / 'camera.pth'))],
                          logger=None, title='demo')
    page = str(d / 'report.html')
    report.to_html(page)
    return dict(model=model, report=report, page=page, dir=d)


def _categories(report: LoadReport) -> Dict[str, str]:
    cats = {}
    for i, s in enumerate(report.sources):
        repaired = set(s.keys_of('repaired'))
        for k in s.loaded:
            cats[k] = 'repaired' if k in repaired else f'source-{i}'
        for k in s.regenerated:
            cats[k] = 'regenerated'
    return cats


def test_tree_counts_per_module_and_status(demo):
    dom = Dom(dump_dom(demo['page']))
    want = _expected(demo['model'], _categories(demo['report']))
    assert set(dom.modules) == set(want)
    for path, cats in want.items():
        got = dom.modules[path]
        assert int(got['data-params']) == sum(cats.values()), path
        shown = {k[len('data-n-'):]: int(v) for k, v in got.items() if k.startswith('data-n-')}
        assert shown == dict(cats), path
    # the 21 converted sparse kernels are 'repaired', under the LiDAR encoder only
    enc = dom.modules['pts_middle_encoder']
    assert int(enc['data-n-repaired']) == sum(
        demo['model'].state_dict()[k].numel() for k in demo['report'].sources[0].keys_of('repaired'))
    assert 'data-n-source-1' not in enc and 'data-n-source-0' in dom.modules['pts_backbone']
    assert int(dom.modules['fusion_layer']['data-n-kept']) == int(
        dom.modules['fusion_layer']['data-params'])
    assert len(dom.rows) == len(demo['model'].state_dict())
    assert not any(r['hidden'] for r in dom.rows)


def test_filters_by_status_source_and_search(demo):
    report = demo['report']
    repaired = set(report.sources[0].keys_of('repaired'))
    dom = Dom(dump_dom(demo['page'], '#status=repaired'))
    assert {r['data-key'] for r in dom.rows if not r['hidden']} == repaired
    assert dom.modules['img_backbone'].get('class', '').split().count('hidden') == 1
    dom = Dom(dump_dom(demo['page'], '#source=1'))
    shown = {r['data-key'] for r in dom.rows if not r['hidden']}
    assert shown == set(report.sources[1].loaded) | set(report.sources[1].regenerated)
    assert all(k.startswith('img_backbone.') for k in shown)
    dom = Dom(dump_dom(demo['page'], '#q=conv_input'))
    assert {r['data-key'] for r in dom.rows if not r['hidden']} == {
        k for k in demo['model'].state_dict() if 'conv_input' in k}


def test_failed_load_shows_problems_first_linked_to_modules(demo, tmp_path):
    model = nn.Sequential(OrderedDict(head=nn.Linear(4, 3), neck=nn.Linear(3, 3)))
    bad = OrderedDict(model.state_dict())
    bad['head.weight'] = torch.zeros(5, 4)
    torch.save({'state_dict': bad}, tmp_path / 'bad.pth')
    with pytest.raises(FusionLoadError) as err:
        load_sources(model, [dict(checkpoint=str(tmp_path / 'bad.pth'))], logger=None)
    page = str(tmp_path / 'failed.html')
    err.value.report.to_html(page)
    html = dump_dom(page)
    assert html.index('id="problems"') < html.index('id="tree"')
    dom = Dom(html)
    assert len(dom.problems) == 1 and 'head.weight' in dom.problems[0]['text']
    assert dom.problems[0]['module'] == 'head'
    row = next(r for r in dom.rows if r['data-key'] == 'head.weight')
    assert row['data-status'] == 'mismatched'
    assert int(dom.modules['head']['data-n-mismatched']) == 12
    assert 'FAILED' in html


def test_inspect_html_of_the_cpu_centerpoint_config(tmp_path):
    pytest.importorskip('spconv')
    from mmfusionload.cli import main
    ckpt = tmp_path / 'lidar.pth'
    from mmfusionload.cli.config import build_model, load_config
    cfg = osp.join(ROOT, 'configs', 'lidar', 'centerpoint_tiny_cpu.py')
    model = build_model(load_config(cfg))
    torch.save({'state_dict': OrderedDict((k, v) for k, v in model.state_dict().items()
                                          if k.startswith('pts_middle_encoder.'))}, ckpt)
    page = str(tmp_path / 'inspect.html')
    code = main(['inspect', cfg, '--source', f'modality=lidar,checkpoint={ckpt}', '--html',
                 page, '-q'])
    assert code == 0  # the encoder file loads; the rest of the model keeps its values
    dom = Dom(dump_dom(page))
    want = model.state_dict()
    enc = [k for k in want if k.startswith('pts_middle_encoder.')]
    assert int(dom.modules['pts_middle_encoder']['data-params']) == sum(
        want[k].numel() for k in enc)
    assert int(dom.modules['pts_middle_encoder'].get('data-n-source-0', 0)) == sum(
        want[k].numel() for k in enc)
    assert int(dom.modules['']['data-params']) == sum(v.numel() for v in want.values())


HOSTILE = [
    '</script><script>document.title="pwned"</script>',
    '"><img src=x onerror="document.title=\'pwned\'">',
    "'; document.title='pwned'; '",
    '<!-- <script>',
    '\u2028\u2029&amp;&lt;',
    'k' * 20000,
]


def test_hostile_text_stays_text(tmp_path):
    keys = [f'm{i}.{h}' for i, h in enumerate(HOSTILE)]
    src = SourceReport(checkpoint='/tmp/' + HOSTILE[0] + '.pth', label=HOSTILE[1],
                       targets=[''], identity=HOSTILE[2], weights=HOSTILE[3],
                       loaded=keys[:3], missing=keys[3:])
    src.placed = [Placed(k, HOSTILE[4] + k, [1], 'float32', [HOSTILE[0]]) for k in keys[:3]]
    report = LoadReport([src], title=HOSTILE[1], problems=[f'{HOSTILE[0]}: {keys[0]}'])
    report.model = [[k, [1], 'float32'] for k in keys]
    page = str(tmp_path / 'hostile.html')
    text = report.to_html(page)
    body = text[text.index('<script id="report-data"'):]
    assert body.count('</script>') == 2  # the data element's and the script's own
    html = dump_dom(page)
    dom = Dom(html)
    assert dom.tags['img'] == 0 and dom.tags['script'] == 2
    title = html.split('<title>')[1].split('</title>')[0]
    assert title.startswith('"&gt;&lt;img src=x onerror=') and title != 'pwned'
    assert {r['data-key'] for r in dom.rows} == set(keys)
    assert dom.problems and dom.problems[0]['text'].startswith(HOSTILE[0])


def test_bevfusion_size_report_stays_under_one_megabyte(tmp_path, manifest):
    m = manifest('mmdet3d_bevfusion_lidar-cam_spconv2')
    tensors = m['tensors']
    src = SourceReport('/data/' + 'x' * 80 + '/bevfusion_converted.pth', 'lidar+camera',
                       targets=[''])
    for t in tensors:
        src.loaded.append(t['key'])
        src.placed.append(Placed(t['key'], 'model.' + t['key'], t['shape'], 'float16',
                                 ['spconv_layout', 'cast']))
    report = LoadReport([src], title='FusionLoadHook', applied=True)
    report.model = [[t['key'], t['shape'], 'float32'] for t in tensors]
    page = report.to_html(str(tmp_path / 'big.html'))
    assert len(tensors) > 500
    assert len(page.encode()) < 1 << 20


def test_screenshot_for_a_person(demo):
    out = os.environ.get('MMFL_SCREENSHOT', str(demo['dir'] / 'report.png'))
    screenshot(demo['page'], out, fragment='')
    with open(out, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n'
    assert struct.unpack('>II', head[16:24]) == (1400, 1000)
    assert osp.getsize(out) > 20000  # a drawn page, not a blank one


def test_the_docs_table_of_words_is_the_vocabulary():
    from mmfusionload.report import STATUSES
    with open(osp.join(ROOT, 'docs', 'report.md'), encoding='utf-8') as f:
        rows = [line.strip('|\n').split(' | ') for line in f if line.startswith('| ')]
    table = {r[0].strip(): r[1].strip() for r in rows[1:]}  # the header row first
    assert table == dict(STATUSES)
