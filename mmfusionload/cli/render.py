"""Render dry-run and load reports for the terminal: one table per source, then details."""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch.nn as nn

from ..report import LoadReport, SourceReport, format_group

__all__ = ['Inspection', 'source_table', 'detail_lines', 'render', 'model_summary']


@dataclass
class Inspection:
    """Dry-run result of one group of loads.

    Args:
        title (str): What the group is (``load_from``, ``FusionLoadHook``...).
        report (LoadReport): Its reports (one per source).
        notes (list[str]): Remarks that are not problems.
    """
    title: str
    report: LoadReport
    notes: List[str] = field(default_factory=list)
    row_notes: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.report.ok


def _group(key: str, targets: Sequence[str]) -> str:
    for t in sorted(targets, key=len, reverse=True):
        if t not in ('', '<model>') and (key == t or key.startswith(t + '.')):
            return t
    return key.split('.', 1)[0] if '.' in key else '<root>'


def _mismatch_key(line: str, keys: Sequence[str]) -> str:
    """The model key a mismatch message is about (its first token that is a model key)."""
    tokens = re.findall(r'[\w.]+', line)
    known = set(keys)
    for tok in tokens:
        if tok in known:
            return tok
    return line.split(':', 1)[0]


def source_table(src: SourceReport, keys: Sequence[str] = (),
                 row_notes: Optional[Dict[str, str]] = None):
    """A ``rich`` table of one source: one row per target module.

    Args:
        src (SourceReport): The source's report.
        keys (Sequence[str]): The model's keys (to attribute mismatch messages).
        row_notes (dict, optional): Module -> remark for the last column.
    """
    from rich.table import Table
    from rich.text import Text
    targets = [t for t in src.targets if t not in ('', '<model>')]
    buckets: Dict[str, Dict[str, int]] = {}
    cols = ('loaded', 'repaired', 'regenerated', 'new', 'missing', 'mismatched')

    def add(key: str, col: str) -> None:
        row = buckets.setdefault(_group(key, targets), dict.fromkeys(cols, 0))
        row[col] += 1

    for t in list(targets) + list(row_notes or {}):
        buckets.setdefault(t, dict.fromkeys(cols, 0))
    for k in src.loaded:
        add(k, 'loaded')
    for k in {k for keys in src.adapted.values() for k in keys}:
        add(k, 'repaired')
    for col, keys in (('regenerated', src.regenerated), ('new', src.new),
                      ('missing', src.missing)):
        for k in keys:
            add(k, col)
    for line in src.mismatched:
        add(_mismatch_key(line, keys), 'mismatched')
    kept = set(src.kept)
    title = Text(f'[{src.label}] {src.checkpoint}')
    caption = (f'container {src.container or "?"}, prefix {src.prefix or "-"}'
               + (f', stripped {" ".join(src.stripped)}' if src.stripped else '')
               + f', {src.ignored} tensor(s) outside the targets'
               + (f', {len(src.unexpected)} unexpected' if src.unexpected else ''))
    table = Table(title=title, caption=Text(caption), title_justify='left',
                  caption_justify='left')
    table.add_column('model module', overflow='fold')
    for col in cols:
        table.add_column(col, justify='right', no_wrap=True)
    table.add_column('note', overflow='fold')
    for name, row in buckets.items():
        note = 'kept (nothing in the checkpoint)' if name in kept else ''
        note = (row_notes or {}).get(name, note)
        table.add_row(name, *(str(row[c]) if row[c] else '-' for c in cols), note)
    return table


def detail_lines(src: SourceReport, max_lines: int = 12) -> List[str]:
    """What was repaired, regenerated, new, missing, mismatched, unexpected (compressed)."""
    lines = []
    groups = [(f'repaired ({name})', keys) for name, keys in src.adapted.items()]
    groups += [('regenerated', src.regenerated), ('new', src.new), ('missing', src.missing),
               ('mismatched', src.mismatched), ('unexpected', src.unexpected),
               ('excluded', src.excluded)]
    for name, keys in groups:
        if keys:  # mismatches are long lines, and summed up among the problems
            lines.append('  ' + format_group(name, keys, 3 if name == 'mismatched' else max_lines))
    return lines


def render(results: Sequence[Inspection], console, model: Optional[nn.Module] = None) -> None:
    """Print every group: a table per source, details, notes and problems."""
    keys = list(model.state_dict()) if model is not None else []
    for ins in results:
        status = 'ok' if ins.ok else 'WOULD FAIL'
        console.rule(f'{ins.title}: {len(ins.report.sources)} source(s), {status}')
        for src in ins.report.sources:
            for head, text in (('format', src.identity), ('weights', src.weights)):
                if text:
                    console.print(f'[{src.label}] {head}: {text}', markup=False,
                                  highlight=False)
            console.print(source_table(src, keys, ins.row_notes))
            for line in src.finetune_lines():  # classes, point features, freezing
                console.print(f'[{src.label}] {line}', markup=False, highlight=False)
            for line in detail_lines(src):
                console.print(line, markup=False, highlight=False)
        for note in ins.notes:
            console.print(f'note: {note}', markup=False, highlight=False)
        for p in ins.report.problems:
            console.print(f'problem: {p}', markup=False, highlight=False)


def model_summary(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    k = len(model.state_dict())
    children = ', '.join(name for name, _ in model.named_children())
    return f'{type(model).__name__}: {k} tensors, {n / 1e6:.2f}M parameters ({children})'
