"""Dry-run every checkpoint load a config would do, and render what goes where.

``mmfusionload inspect CONFIG`` builds the model the way a Runner does (custom
imports, default scope, ``MODELS.build``), then plans, without touching the model or
any file: each module's ``init_cfg=Pretrained`` checkpoint, the ``load_from``
checkpoint as :class:`~mmfusionload.FusionLoadHook` would repair it, every source of
the config's ``FusionLoadHook``, and any extra source given on the command line.
"""
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .errors import FusionLoadError
from .hooks import is_fusion_load_hook
from .load_from import fill_targets_of, repair_checkpoint
from .loading import load_sources
from .reader import read_checkpoint
from .report import LoadReport, SourceReport, format_group, size_mismatch_problems
from .source import parse_source

HOOK_TYPE = 'FusionLoadHook'


def load_config(config: str, cfg_options: Optional[dict] = None):
    """Read a config file and merge ``--cfg-options`` into it."""
    from mmengine.config import Config
    if not osp.isfile(config):
        raise FusionLoadError([f'{config}: no such config file'], 'cannot read config')
    try:
        cfg = Config.fromfile(config, import_custom_modules=False)  # build_model imports them
    except SyntaxError as e:  # MMEngine's parser may not name the file
        raise FusionLoadError([f'{config}: line {e.lineno}: {e.msg}'],
                              'cannot read config') from e
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model(cfg, stand_ins: Optional[List[str]] = None) -> nn.Module:
    """Build ``cfg.model`` as MMEngine's Runner does (no ``init_weights``).

    Honours ``custom_imports``, initialises the default scope
    (``cfg.default_scope``, else ``'mmdet3d'``) and builds with MMEngine's root
    ``MODELS``, which resolves the type in the scope's registry.

    Args:
        cfg (Config): The config.
        stand_ins (list, optional): Structure-only build: when given, compiled
            extensions that ``custom_imports`` cannot import because they are
            not built are replaced by inert stand-ins
            (:mod:`mmfusionload.standins`) and their names appended here.
            Without it such an import error is raised.
    """
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import import_modules_from_strings
    imports = cfg.get('custom_imports')
    if imports and stand_ins is not None:
        from .standins import import_with_stand_ins
        stand_ins += import_with_stand_ins(**imports)
    elif imports:
        import_modules_from_strings(**imports)
    if 'model' not in cfg:
        raise FusionLoadError(['the config has no "model"'], 'cannot build the model')
    init_default_scope(cfg.get('default_scope', 'mmdet3d'))
    model = MODELS.build(cfg.model)
    return model.eval()


def fusion_hooks(cfg) -> List[dict]:
    """The ``FusionLoadHook`` entries of ``cfg.custom_hooks`` (as plain dicts)."""
    return [dict(h) for h in cfg.get('custom_hooks', None) or [] if is_fusion_load_hook(h)]


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


def dry_run_load_from(model: nn.Module, path: str, hook: Optional[dict]) -> Inspection:
    """Plan ``load_from`` as the config's ``FusionLoadHook`` would repair it.

    Reads a copy of the checkpoint (the file is never written) and runs
    :func:`~mmfusionload.repair_checkpoint` on it, which reports what MMEngine
    would meet: keys whose shapes still differ (MMEngine would leave those
    tensors at their initial values) and keys of the model the checkpoint lacks.
    """
    report = LoadReport(dry_run=True, title='load_from')
    result = Inspection('load_from', report)
    hook = hook or {}
    try:
        ckpt = read_checkpoint(path, trust_checkpoint=bool(hook.get('trust_checkpoint')))
    except FusionLoadError as e:
        report.sources.append(SourceReport(path, 'load_from'))
        report.problems += e.problems
        return result
    try:
        sources = [parse_source(dict(s)) for s in hook.get('sources', [])]
        fill = fill_targets_of(model, sources)
        src = repair_checkpoint(ckpt, model, filename=path, fill_targets=fill,
                                spconv_layout=hook.get('load_from_spconv_layout', 'auto'))
    except FusionLoadError as e:
        report.sources.append(SourceReport(path, 'load_from'))
        report.problems += e.problems
        return result
    report.sources.append(src)
    report.problems += _summed_up(path, src.mismatched)  # tensors that could not be placed
    if src.new:  # filled by repair_checkpoint: the hook's sources load these modules
        for t in fill:
            result.row_notes[t] = f'left to the {HOOK_TYPE} sources'
        result.notes.append(f'{len(src.new)} tensor(s) of {", ".join(fill)} are filled with '
                            f'the model\'s own values so that MMEngine does not report them '
                            f'missing; the {HOOK_TYPE} sources load them')
        src.new = []
    if not hook:
        result.notes.append('the config has no FusionLoadHook: MMEngine would load this file '
                            'without the repairs shown')
    elif hook.get('repair_load_from', True) is False:
        result.notes.append('FusionLoadHook(repair_load_from=False): MMEngine would load this '
                            'file without the repairs shown')
    if src.missing:
        result.notes.append(f'{len(src.missing)} model tensor(s) get nothing from load_from; '
                            'MMEngine keeps their initial values and warns')
    return result


_LOAD_FROM_SIZE = re.compile(r'^(.*): size mismatch for (\S+): checkpoint \[([\d, ]*)\], '
                             r'model \[([\d, ]*)\]$')


def _summed_up(path: str, lines: Sequence[str]) -> List[str]:
    """``repair_checkpoint``'s problem lines with many size mismatches summed up."""
    sizes, other = [], []
    for line in lines:
        m = _LOAD_FROM_SIZE.match(line)
        if m is None:
            other.append(line)
            continue
        shape = [[int(v) for v in g.split(',') if v.strip()] for g in m.group(3, 4)]
        sizes.append((m.group(2), m.group(2), *shape))
    return other + size_mismatch_problems(path, sizes, lambda k: k.split('.', 1)[0])


def dry_run_sources(model: nn.Module, sources: Sequence[Any], title: str,
                    allow_overlap: bool = False) -> Inspection:
    """Plan sources with :func:`~mmfusionload.load_sources` (``dry_run=True``)."""
    report = load_sources(model, sources, dry_run=True, allow_overlap=allow_overlap,
                          logger=None, title=title)
    return Inspection(title, report)


def dry_run_init_cfg(model: nn.Module, hook: Optional[dict]) -> Optional[Inspection]:
    """Plan the ``init_cfg=Pretrained`` loads of ``init_weights`` (None when there are none)."""
    from .pretrained import dry_run_pretrained
    report, notes = dry_run_pretrained(
        model, trust_checkpoint=bool((hook or {}).get('trust_checkpoint')))
    if not report.sources and not report.problems and not notes:
        return None
    notes.append('init_weights() loads these in a training run, before load_from')
    return Inspection('init_cfg (Pretrained)', report, notes)


def inspect_config(config: str,
                   sources: Sequence[dict] = (),
                   cfg_options: Optional[dict] = None,
                   progress=None,
                   allow_overlap: bool = False,
                   stand_ins: Optional[List[str]] = None) -> Tuple[nn.Module, List[Inspection]]:
    """Dry-run every load ``config`` would do, plus ``sources``.

    In order: each module's ``init_cfg=Pretrained`` (``init_weights``), then
    ``load_from`` as ``FusionLoadHook`` repairs it, then each hook's sources,
    then ``sources``.

    Args:
        config (str): Config file.
        sources (Sequence[dict]): Extra sources, checked on their own.
        cfg_options (dict, optional): Overrides merged into the config.
        progress (callable, optional): ``progress(description)`` per step.
        allow_overlap (bool): Let a later source overwrite an earlier one in
            every group (a hook's own ``allow_overlap=True`` holds anyway).
        stand_ins (list, optional): Build structure-only where compiled
            extensions are absent; their names are appended here (see
            :func:`build_model`).

    Returns:
        tuple: The built model and one :class:`Inspection` per group.
    """
    step = progress or (lambda _: None)
    step('reading the config')
    cfg = load_config(config, cfg_options)
    step('building the model')
    model = build_model(cfg, stand_ins)
    hooks = fusion_hooks(cfg)
    hook = hooks[0] if hooks else None
    out: List[Inspection] = []
    step('planning init_cfg loads')
    init = dry_run_init_cfg(model, hook)
    if init is not None:
        out.append(init)
    load_from = cfg.get('load_from', None)
    if load_from:
        step(f'planning load_from {osp.basename(str(load_from))}')
        out.append(dry_run_load_from(model, str(load_from), hook))
        if cfg.get('resume', False):
            out[-1].notes.append('resume=True: MMEngine resumes from this file')
    for i, h in enumerate(hooks):
        step(f'planning {HOOK_TYPE} sources')
        title = HOOK_TYPE if len(hooks) == 1 else f'{HOOK_TYPE} #{i + 1}'
        ins = dry_run_sources(model, h.get('sources', []), title,
                              allow_overlap=allow_overlap or bool(h.get('allow_overlap')))
        if cfg.get('resume', False) and not h.get('load_on_resume', False):
            ins.notes.append('resume=True: the hook would not load these sources '
                             '(load_on_resume=False)')
        out.append(ins)
    if sources:
        step('planning --source')
        out.append(dry_run_sources(model, sources, '--source', allow_overlap=allow_overlap))
    if not out:
        report = LoadReport(dry_run=True, title='nothing to load')
        out.append(Inspection('nothing to load', report,
                              ['the config has no init_cfg checkpoint, no load_from and no '
                               'FusionLoadHook sources; pass --source to check a checkpoint '
                               'against this model']))
    return model, out


# ---------------------------------------------------------------- rendering

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

