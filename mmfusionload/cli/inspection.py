"""Dry-run every checkpoint load a config would do, and render what goes where.

``mmfusionload inspect CONFIG`` builds the model the way a Runner does (custom
imports, default scope, ``MODELS.build``), then plans, without touching the model or
any file: each module's ``init_cfg=Pretrained`` checkpoint, the ``load_from``
checkpoint as :class:`~mmfusionload.FusionLoadHook` would repair it, every source of
the config's ``FusionLoadHook``, and any extra source given on the command line.
"""
import os.path as osp
from dataclasses import replace
from typing import Any, List, Optional, Sequence, Tuple

import torch.nn as nn

from ..errors import FusionLoadError
from ..hooks import is_fusion_load_hook
from ..load.load_from import fill_targets_of, repair_checkpoint
from ..load.pipeline import load_sources
from ..files.reader import read_checkpoint
from ..report import LoadReport, SourceReport, mismatch_problems
from ..load.source import parse_source
from .config import build_model, config_classes, load_config
from .render import Inspection

HOOK_TYPE = 'FusionLoadHook'


def fusion_hooks(cfg) -> List[dict]:
    """The ``FusionLoadHook`` entries of ``cfg.custom_hooks`` (as plain dicts)."""
    return [dict(h) for h in cfg.get('custom_hooks', None) or [] if is_fusion_load_hook(h)]


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
    # tensors that could not be placed: repair problems once, shape mismatches summed up
    report.problems += mismatch_problems(path, src.mismatched, lambda k: k.split('.', 1)[0])
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


def dry_run_sources(model: nn.Module, sources: Sequence[Any], title: str,
                    allow_overlap: bool = False,
                    classes: Optional[Sequence[str]] = None) -> Inspection:
    """Plan sources with :func:`~mmfusionload.load_sources` (``dry_run=True``); ``classes``:
    the model's class names (the config's dataset ``metainfo``)."""
    report = load_sources(model, sources, dry_run=True, allow_overlap=allow_overlap,
                          logger=None, title=title, classes=classes)
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
    classes = config_classes(cfg)
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
                              allow_overlap=allow_overlap or bool(h.get('allow_overlap')),
                              classes=classes)
        if cfg.get('resume', False) and not h.get('load_on_resume', False):
            ins.notes.append('resume=True: the hook would not load these sources '
                             '(load_on_resume=False)')
        out.append(ins)
    if sources:
        step('planning --source')
        out.append(dry_run_sources(model, sources, '--source', allow_overlap=allow_overlap,
                                   classes=classes))
    if not out:
        report = LoadReport(dry_run=True, title='nothing to load')
        out.append(Inspection('nothing to load', report,
                              ['the config has no init_cfg checkpoint, no load_from and no '
                               'FusionLoadHook sources; pass --source to check a checkpoint '
                               'against this model']))
    return model, out


# ---------------------------------------------------------------- rendering


def combined_report(results: Sequence[Inspection], model: nn.Module, title: str) -> LoadReport:
    """Every group's sources and problems in one dry-run report of ``model`` (the page of
    ``inspect --html``); a source's label names its group."""
    report = LoadReport(dry_run=True, title=title)
    for r in results:
        report.sources += [replace(s, label=f'{r.title}: {s.label}') for s in r.report.sources]
        report.problems += r.report.problems
    return report.describe_model(model)
