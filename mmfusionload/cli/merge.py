"""One initial fusion checkpoint from several per-modality checkpoints.

``mmfusionload merge --config fusion.py -o bevfusion_init_converted.pth
modality=lidar+head,checkpoint=lidar.pth modality=camera,checkpoint=swin.pth,preset=swin-original``
builds the model of the config, loads every source into it (all or nothing, with every
repair :func:`~mmfusionload.load_sources` does) and saves the whole state dict, so a
plain ``load_from`` of the result needs no hook.
"""
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ..files.writer import check_destination, save_checkpoint
from ..errors import FusionLoadError
from ..load.pipeline import load_sources
from ..report import LoadReport
from ..load.source import parse_source


def _source_paths(sources: Sequence[Dict[str, Any]]) -> List[str]:
    return [str(s.get('checkpoint')) for s in sources if s.get('checkpoint')]


def merge_into(model: nn.Module,
               sources: Sequence[Dict[str, Any]],
               out: str,
               allow_overlap: bool = False,
               config: Optional[str] = None,
               classes: Optional[Sequence[str]] = None) -> Tuple[LoadReport, Dict[str, Any]]:
    """Load ``sources`` into ``model`` and save its state dict to ``out``.

    Args:
        model (nn.Module): The target model (initialised as wanted).
        sources (Sequence[dict]): Sources as for :func:`~mmfusionload.load_sources`.
        out (str): ``.pth`` or ``.safetensors``; written atomically, never one of the
            sources.
        allow_overlap (bool): Let a later source overwrite an earlier one.
        config (str, optional): Recorded in ``meta``.
        classes (Sequence[str], optional): The model's class names (sources whose
            checkpoint has other classes load by name); recorded as
            ``meta['dataset_meta']['classes']``.

    Returns:
        tuple: The load report and the ``meta`` written.

    Raises:
        FusionLoadError: A bad destination or any load problem; nothing is written.
    """
    check_destination(out, _source_paths(sources))
    return _load_and_save(model, sources, out, allow_overlap, config, classes)


def _load_and_save(model: nn.Module, sources: Sequence[Dict[str, Any]], out: str,
                   allow_overlap: bool,
                   config: Optional[str],
                   classes: Optional[Sequence[str]] = None) -> Tuple[LoadReport, Dict[str, Any]]:
    """:func:`merge_into` once ``out`` has been checked."""
    # one read of every file: a failure raises before the model is touched, with the
    # full report attached (``err.report``)
    try:
        report = load_sources(model, sources, allow_overlap=allow_overlap, logger=None,
                              title='merge', classes=classes)
    except FusionLoadError as e:
        err = FusionLoadError(e.problems, 'checkpoint load failed; nothing written')
        err.report = e.report  # type: ignore[attr-defined]
        raise err from e
    provided = {t for s in report.sources for t in s.targets if t not in s.kept}
    children = [n for n, _ in model.named_children()
                if any(True for _ in model.get_submodule(n).state_dict())]
    untouched = [n for n in children
                 if not any(t in ('', n) or t.startswith(n + '.') for t in provided)]
    meta: Dict[str, Any] = dict(
        mmfusionload=dict(
            merged_by='mmfusionload merge',
            config=osp.abspath(config) if config else None,
            sources=[dict(checkpoint=osp.abspath(s.checkpoint), label=s.label,
                          preset=spec.preset, targets=list(s.targets), kept=list(s.kept),
                          loaded=len(s.loaded), regenerated=len(s.regenerated),
                          new=len(s.new),
                          repaired={k: len(v) for k, v in s.repaired.items()})
                     for s, spec in zip(report.sources, map(parse_source, sources))],
            not_loaded=untouched))
    if classes is not None:
        meta['dataset_meta'] = dict(classes=list(classes))
    save_checkpoint(out, model.state_dict(), meta)
    return report, meta


def merge_checkpoints(config: str,
                      sources: Sequence[Dict[str, Any]],
                      out: str,
                      cfg_options: Optional[dict] = None,
                      init_weights: bool = False,
                      allow_overlap: bool = False,
                      progress=None) -> Tuple[nn.Module, LoadReport, Dict[str, Any]]:
    """Build the config's model, load ``sources`` into it and save it to ``out``.

    Args:
        config (str): Config file (its ``model`` is built like a Runner does).
        sources (Sequence[dict]): The per-modality sources.
        out (str): Destination.
        cfg_options (dict, optional): Config overrides.
        init_weights (bool): Call ``model.init_weights()`` first, as the Runner
            does, so modules no source provides get their configured
            initialisation rather than their constructors'. Defaults to False.
        allow_overlap (bool): Let a later source overwrite an earlier one.
        progress (callable, optional): ``progress(description)`` per step.

    Returns:
        tuple: Model, report and the ``meta`` written.
    """
    from .config import build_model, config_classes, load_config
    step = progress or (lambda _: None)
    if not sources:
        raise FusionLoadError(['no sources given'], 'nothing to merge')
    check_destination(out, _source_paths(sources))  # before the (slow) model build
    step('building the model')
    cfg = load_config(config, cfg_options)
    model = build_model(cfg)
    if init_weights:
        step('init_weights')
        model.init_weights()
    step('loading the sources')
    report, meta = _load_and_save(model, sources, out, allow_overlap, config,
                                  classes=config_classes(cfg))
    return model, report, meta
