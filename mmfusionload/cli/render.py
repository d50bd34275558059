"""Render dry-run and load reports for the terminal: one table per source, then details."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch.nn as nn

from ..report import LoadReport, SourceReport, legend, status_table

__all__ = ['Inspection', 'source_table', 'render', 'model_summary']


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


def source_table(src: SourceReport, row_notes: Optional[Dict[str, str]] = None):
    """A ``rich`` table of one source: one row per target module, the status
    columns of :func:`~mmfusionload.report.status_table`.

    Args:
        src (SourceReport): The source's report.
        row_notes (dict, optional): Module -> remark for the note column.

    Returns:
        tuple: The table and the status columns it shows.
    """
    rows = [((name, ), counts, note) for name, counts, note in src.module_rows(row_notes)]
    return status_table('', ('model module', ), rows)


def render(results: Sequence[Inspection], console, model: Optional[nn.Module] = None) -> None:
    """Print every group: per source its format and weights, a table by module and
    the details; the group's notes and problems; then one legend of the words shown."""
    words: List[str] = []
    for ins in results:
        status = 'ok' if ins.ok else 'WOULD FAIL'
        console.rule(f'{ins.title}: {len(ins.report.sources)} source(s), {status}')
        for src in ins.report.sources:
            for line in src.header_lines():
                console.print(line, markup=False, highlight=False)
            table, shown = source_table(src, ins.row_notes)
            words += shown
            console.print(table)
            for line in src.detail_lines():
                console.print(line, markup=False, highlight=False)
        for note in ins.notes:
            console.print(f'note: {note}', markup=False, highlight=False)
        for p in ins.report.problems:
            console.print(f'problem: {p}', markup=False, highlight=False)
    if words:
        console.print(legend(words, [s for ins in results for s in ins.report.sources]),
                      markup=False, highlight=False)


def model_summary(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    k = len(model.state_dict())
    children = ', '.join(name for name, _ in model.named_children())
    return f'{type(model).__name__}: {k} tensors, {n / 1e6:.2f}M parameters ({children})'
