"""The ``init_cfg=dict(type='Pretrained', ...)`` loads of ``init_weights``, planned.

A training run calls ``model.init_weights()`` before ``load_from``: every
``BaseModule`` whose ``init_cfg`` holds a ``Pretrained`` entry loads its
checkpoint then. Two loaders do it:

- modules of this package (``EfficientViT``) load through
  :func:`~mmfusionload.load_sources`; planned here with ``dry_run=True``;
- a module whose class overrides ``init_weights`` (MMDetection's
  ``SwinTransformer`` reads ``model``/``state_dict``, strips ``backbone.`` and
  converts names) loads with its own code: only the file is read here;
- any other module goes through MMEngine 0.10.7's ``PretrainedInit``:
  ``load_checkpoint(module, checkpoint, strict=False)`` (the checkpoint's
  ``state_dict`` if it has one, else the whole dict; ``module.`` stripped), or
  with ``prefix`` only the keys under ``prefix`` (a ``.`` appended), stripped.
  MMEngine then skips tensors whose shape differs (a warning) and keeps the
  module's values for keys the file lacks; a missing file raises.

A planned load fails (a problem) when its file cannot be read, when a tensor
would be skipped for its shape, or when nothing of the file lands in the
module. Remote checkpoints (``torchvision://``, ``https://``...) are not
downloaded by a dry run: they are named in a note.
"""
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import FusionLoadError
from ..load.pipeline import load_sources
from ..files.reader import read_checkpoint
from ..files.remote import is_local
from ..report import LoadReport, Mismatch, SourceReport, mismatch_problems

MODULE_PREFIX = re.compile(r'^module\.')  # MMEngine's load_checkpoint revise_keys default


def pretrained_cfgs(model: nn.Module) -> Iterator[Tuple[str, nn.Module, dict]]:
    """``(name, module, cfg)`` for each ``Pretrained`` entry of a ``BaseModule`` init_cfg."""
    from mmengine.model import BaseModule
    for name, module in model.named_modules():
        cfg = getattr(module, 'init_cfg', None)
        if not isinstance(module, BaseModule) or not cfg:
            continue
        for entry in (cfg if isinstance(cfg, (list, tuple)) else [cfg]):
            if isinstance(entry, dict) and entry.get('type') == 'Pretrained':
                yield name or '<model>', module, dict(entry)


def _mmengine_state(ckpt: Any, prefix: Optional[str]) -> Dict[str, Any]:
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        return {}
    state = {MODULE_PREFIX.sub('', k): v for k, v in state.items()}
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def plan_mmengine_pretrained(module: nn.Module, name: str, cfg: dict,
                             trust_checkpoint: bool = False) -> Tuple[SourceReport, List[str]]:
    """Plan MMEngine's ``PretrainedInit`` of ``module`` without loading anything.

    Returns:
        tuple: The source report and the problems of the load.
    """
    path = str(cfg.get('checkpoint'))
    report = SourceReport(path, f'{name}.init_cfg', targets=[''], container='state_dict',
                          prefix=str(cfg.get('prefix') or 'identity'))
    try:
        ckpt = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    except FusionLoadError as e:
        return report, [f'{name}.init_cfg: {p}' for p in e.problems]
    state = _mmengine_state(ckpt, cfg.get('prefix'))
    own = module.state_dict()
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(Mismatch(key, key, value.shape, own[key].shape))
        else:
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state]
    problems = mismatch_problems(f'{path} ({name}.init_cfg)', report.mismatched,
                                 lambda k: k.split('.', 1)[0])
    if not report.loaded:
        problems.append(f'{path}: nothing in it lands in {name} ({len(state)} tensor(s)'
                        + (f' under prefix {cfg["prefix"]!r}' if cfg.get('prefix') else '')
                        + '); init_cfg would load nothing')
    return report, problems


def dry_run_pretrained(model: nn.Module, trust_checkpoint: bool = False
                       ) -> Tuple[LoadReport, List[str]]:
    """Plan every ``Pretrained`` load ``model.init_weights()`` would do.

    Args:
        model (nn.Module): The built model (``init_weights`` not called).
        trust_checkpoint (bool): Read the files without the restricted
            unpickler (as a ``FusionLoadHook(trust_checkpoint=True)`` makes
            MMEngine do).

    Returns:
        tuple: The report (one source per load) and notes (remote files).
    """
    from ..models.efficientvit import EfficientViT, pretrained_source
    report = LoadReport(dry_run=True, title='init_cfg')
    notes: List[str] = []
    for name, module, cfg in pretrained_cfgs(model):
        path = cfg.get('checkpoint')
        if not path:
            report.problems.append(f'{name}.init_cfg: Pretrained without a checkpoint')
            continue
        if not is_local(str(path)):
            notes.append(f'{name}.init_cfg: {path} is read by MMEngine at init_weights '
                         '(remote: not downloaded by a dry run)')
            continue
        if isinstance(module, EfficientViT):
            sub = load_sources(module, [pretrained_source(cfg)], dry_run=True, logger=None)
            for src in sub.sources:
                src.label = f'{name}.init_cfg'
            report.sources += sub.sources
            report.problems += [f'{name}.init_cfg: {p}' for p in sub.problems]
            continue
        if has_own_loader(module):
            try:
                read_checkpoint(str(path), trust_checkpoint=trust_checkpoint)
            except FusionLoadError as e:
                report.problems += [f'{name}.init_cfg: {p}' for p in e.problems]
                continue
            notes.append(f'{name}.init_cfg: {path} is readable; '
                         f'{type(module).__name__}.init_weights places its tensors with its '
                         'own code (not planned here)')
            continue
        src, problems = plan_mmengine_pretrained(module, name, cfg, trust_checkpoint)
        report.sources.append(src)
        report.problems += problems
    return report, notes


def has_own_loader(module: nn.Module) -> bool:
    """Whether ``module``'s class overrides ``BaseModule.init_weights`` (and so may load a
    ``Pretrained`` checkpoint its own way, as MMDetection's ``SwinTransformer`` does)."""
    from mmengine.model import BaseModule
    return type(module).init_weights is not BaseModule.init_weights
