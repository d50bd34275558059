"""The load report as one self-contained HTML page: the model as a map of where every weight
came from.

:func:`render_html` turns a :class:`~mmfusionload.report.LoadReport` into one file with inline
CSS and script (no network, no CDN; a Content-Security-Policy forbids fetching anything). The
page shows the problems first, each linked to its module, a header per source, and the model as
a collapsible tree of modules: each node with its parameter count and a bar split by what
happened to its values, coloured per source for what a source loaded as it was, in the words of
:data:`~mmfusionload.report.STATUSES` (the legend). Expanding a module lists its tensors. Filters
by status and source and a search over keys are kept in the page's address
(``#status=missing,mismatched&source=1&q=conv``), so a filtered view can be linked.

The data is :meth:`LoadReport.to_dict` (the JSON report), plus each tensor's final status; it is
embedded as JSON in a ``<script type="application/json">`` element with ``<``, ``>`` and ``&``
escaped, and the script writes every text through ``textContent``: nothing from a checkpoint
(keys, file names, messages) is ever parsed as markup or run.
"""
import json
import re
import os.path as osp
from typing import Dict, List, Optional, Tuple

from . import STATUSES

__all__ = ['render_html', 'tensor_statuses', 'SOURCE_COLORS', 'STATUS_COLORS']

_HERE = osp.dirname(osp.abspath(__file__))

#: Bar colour of what each source loaded as it was, in source order (then repeated).
SOURCE_COLORS = ('#2563eb', '#0d9488', '#7c3aed', '#65a30d', '#0891b2', '#c026d3')
#: Bar colour of every other status.
STATUS_COLORS: Dict[str, str] = {
    'repaired': '#f59e0b', 'regenerated': '#94a3b8', 'new': '#93c5fd', 'kept': '#e2e8f0',
    'excluded': '#c4b5fd', 'missing': '#ef4444', 'mismatched': '#991b1b',
    'unexpected': '#fb923c', 'frozen': '#0f172a', 'ignored': '#cbd5e1'}
#: Which of two statuses of a tensor from different sources the page shows (higher wins);
#: a source that writes the tensor wins over one that does not.
_RANK = {'kept': 0, 'new': 1, 'regenerated': 2, 'excluded': 3, 'unexpected': 4, 'missing': 5,
         'mismatched': 6}


def _escape(text: str) -> str:
    """JSON safe inside ``<script>``: no ``</script>``, no ``<!--``, no HTML entity."""
    return (text.replace('&', '\\u0026').replace('<', '\\u003c').replace('>', '\\u003e')
            .replace('\u2028', '\\u2028').replace('\u2029', '\\u2029'))


def tensor_statuses(report) -> Dict[str, Tuple[str, int]]:
    """Model key -> ``(status, source index)`` the page shows: the last source that
    writes the tensor (``loaded``/``repaired``), else the most telling status any source
    gave it (``mismatched`` over ``missing`` over ...), else ``kept`` with no source."""
    out: Dict[str, Tuple[str, int]] = {}
    for i, s in enumerate(report.sources):
        repaired = set(s.keys_of('repaired'))
        for key in s.loaded:
            out[key] = ('repaired' if key in repaired else 'loaded', i)
        for word in ('regenerated', 'new', 'excluded', 'missing', 'mismatched'):
            for key in s.keys_of(word):
                old = out.get(key)
                if old is None or (old[0] in _RANK and _RANK[word] > _RANK[old[0]]):
                    out[key] = (word, i)
    return out


def _source_facts(s) -> List[Tuple[str, str]]:
    facts = [('file', s.checkpoint), ('format', s.identity), ('weights', s.weights),
             ('family', s.family), ('container', s.container),
             ('targets', ', '.join(t or '<model>' for t in s.targets)),
             ('prefix', s.prefix), ('stripped', ' '.join(s.stripped)),
             ('repairs', ', '.join(f'{k} {len(v)}' for k, v in s.repaired.items())),
             ('verify', f'{s.verified} sparse conv(s) checked by function, largest error '
                        f'{s.verify_error:.1e}' if s.verified else ''),
             ('kept', ', '.join(s.kept)),
             ('outside the targets', f'{s.ignored} checkpoint tensor(s)' if s.ignored else ''),
             ('unexpected', f'{len(s.unexpected)} checkpoint tensor(s) the model lacks'
                            if s.unexpected else '')]
    return [(k, v) for k, v in facts if v]


def _module_of(text: str, modules: List[str]) -> Optional[str]:
    """The deepest model module a problem line names (a key or a module), if any."""
    best = None
    for m in modules:
        if m and m in text and (best is None or len(m) > len(best)):
            best = m
    return best


def view(report) -> dict:
    """What the page draws: the report's data and each model tensor's row."""
    status = tensor_statuses(report)
    placed: Dict[str, tuple] = {}
    reasons: Dict[str, tuple] = {}
    for i, s in enumerate(report.sources):
        for p in s.placed:
            placed[p.key] = (p.file_key, p.shape, p.dtype, ' \u2192 '.join(p.steps))
        for m in s.mismatched:
            reasons[m.key] = (m.file_key, m.checkpoint_shape, m.describe())
    rows = []
    total = 0
    for key, shape, dtype in report.model:
        numel = 1
        for d in shape:
            numel *= int(d)
        total += numel
        st, src = status.get(key, ('kept', -1))
        file_key, file_shape, file_dtype, steps = placed.get(key, ('', None, '', ''))
        reason = ''
        if st == 'mismatched' and key in reasons:
            file_key, file_shape, reason = reasons[key]
        rows.append([key, numel, shape, dtype, st, src, file_key, file_shape, file_dtype,
                     steps, reason])
    in_model = {r[0] for r in rows}
    for i, s in enumerate(report.sources):  # checkpoint tensors the model lacks
        for key in s.unexpected:
            if key not in in_model:
                rows.append([key, 0, None, '', 'unexpected', i, key, None, '', '',
                             STATUSES['unexpected']])
    modules = sorted({r[0].rpartition('.')[0] for r in rows} | {
        '.'.join(r[0].split('.')[:n]) for r in rows for n in range(1, r[0].count('.') + 1)})
    state = 'dry run' if report.dry_run else ('applied' if report.applied else 'not applied')
    return dict(
        title=report.title, state=state, ok=report.ok, total=total,
        problems=[[p, _module_of(p, modules)] for p in report.problems],
        statuses=[[w, m, STATUS_COLORS.get(w, '#64748b')] for w, m in STATUSES.items()
                  if w != 'ignored'],
        sources=[dict(label=s.label, checkpoint=s.checkpoint, facts=_source_facts(s),
                      color=SOURCE_COLORS[i % len(SOURCE_COLORS)])
                 for i, s in enumerate(report.sources)],
        tensors=rows,
        report=report.to_dict(compress=False),
        footer=f'{report.title}: {len(report.sources)} source(s), {state}. The same data as '
               'the JSON report (under "report" in this page\'s data).')


def _asset(name: str) -> str:
    with open(osp.join(_HERE, name), encoding='utf-8') as f:
        return f.read()


def render_html(report) -> str:
    """The report as one self-contained HTML page (see the module's docstring)."""
    data = _escape(json.dumps(view(report), separators=(',', ':')))
    title = (report.title.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
             + ' \u2014 where every weight came from')
    parts = dict(TITLE=title, SCRIPT=_asset('page.js'), DATA=data)
    return re.sub(r'__(TITLE|SCRIPT|DATA)__', lambda m: parts[m.group(1)], _asset('page.html'))
