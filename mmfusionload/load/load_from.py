"""Repair a checkpoint dict in place before MMEngine applies it (``load_from``)."""
from collections import OrderedDict
from typing import Any, Dict, List, MutableMapping, Sequence, Union

import torch
import torch.nn as nn

from ..checkpoint.containers import shape_of, unwrap
from ..errors import FusionLoadError
from ..checkpoint.identify import identify_state
from .modality import resolve_targets
from .repairs import (Entry, Mapped, RepairProblem, SourceContext, is_record, may_be_absent,
                      repairs_in_order, run_repairs)
from .repairs.spconv_layout import LAYOUT_VERSION, module_layout
from ..report import SourceReport
from .source import SourceSpec
from ..sparse.verify import verify_entries



def repair_checkpoint(checkpoint: MutableMapping[str, Any],
                      model: nn.Module,
                      filename: str = 'load_from',
                      fill_targets: Sequence[str] = (),
                      spconv_layout: str = 'auto',
                      weights: str = 'auto',
                      verify: Union[bool, str] = 'auto') -> SourceReport:
    """Repair ``checkpoint`` in place so that MMEngine loads it into ``model``.

    Unwraps containers into ``checkpoint['state_dict']``, strips wrapper
    prefixes, runs the registered repairs on every key the model has (sparse
    kernels are permuted into the model's layout and their ``_metadata``
    version set to match, so MMDetection3D's override neither permutes twice
    nor skips), leaves derived tensors to the model, and fills keys of
    ``fill_targets`` (modules another source will load) with the model's
    current tensors so MMEngine does not list them as missing.

    Args:
        checkpoint (MutableMapping): What MMEngine read; modified in place.
        model (nn.Module): The unwrapped model.
        filename (str): For messages and the report.
        fill_targets (Sequence[str]): Submodule names filled when absent.
        spconv_layout (str): Layout of the checkpoint's sparse kernels.
        weights (str): Which copy goes into ``checkpoint['state_dict']``:
            ``'auto'`` (the one the file's trainer deploys), ``'ema'`` or ``'raw'``
            (see :func:`~mmfusionload.checkpoint.trainers.choose_copy`).
        verify (bool | str): Check converted sparse kernels by function
            (:mod:`mmfusionload.sparse.verify`); a kernel that fails is left out of
            the checkpoint and its problem reported under ``mismatched``.

    Returns:
        SourceReport: What was repaired.
    """
    if spconv_layout not in ('auto', 'spconv2', 'mmcv'):
        raise FusionLoadError([f"spconv_layout must be 'auto', 'spconv2' or 'mmcv', "
                               f'got {spconv_layout!r}'], 'bad option')
    ckpt = unwrap(checkpoint, filename, weights=weights)
    report = SourceReport(filename, 'load_from', targets=['<model>'],
                          container=ckpt.container, prefix='identity',
                          stripped=list(ckpt.stripped), family=ckpt.family,
                          weights=ckpt.copy)
    report.identity = identify_state(
        filename, {k: shape_of(ckpt.state, k) for k in ckpt.state}, ckpt.metadata).one_line()
    spec = SourceSpec(checkpoint=filename, spconv_layout=spconv_layout)
    model_state = dict(model.state_dict(keep_vars=True))
    metadata: Dict[str, dict] = OrderedDict(ckpt.metadata)
    state: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    repairs = repairs_in_order()
    problems = []
    context = SourceContext(filename, spec, model, meta=dict(ckpt.meta or {}))
    loaded: List[Entry] = []
    for key, tensor in ckpt.state.items():
        if key in model_state:
            mod_name = key.rsplit('.', 1)[0] if '.' in key else ''
            context.mapped.append(Mapped(key, key, tuple(tensor.shape),
                                         model.get_submodule(mod_name), mod_name,
                                         (metadata.get(mod_name) or {}).get('version')))
    for key, tensor in ckpt.state.items():
        target = model_state.get(key)
        if target is None:
            if is_record(key):  # a run-time record the model does not keep: left out
                report.ignored += 1
                continue
            report.unexpected.append(key)
            state[key] = tensor
            continue
        mod_name = key.rsplit('.', 1)[0] if '.' in key else ''
        module = model.get_submodule(mod_name)
        version = (metadata.get(mod_name) or {}).get('version')
        entry = Entry(key, key, tensor, target, module, mod_name, version, spec, filename,
                      context=context)
        try:
            run_repairs(entry, repairs)
        except RepairProblem as e:
            if str(e) not in problems:
                problems.append(str(e))
            state[key] = tensor
            continue
        if entry.skip:
            report.regenerated.append(key)
            state[key] = target.detach()
            continue
        if entry.shape != tuple(target.shape):
            problems.append(f'{filename}: size mismatch for {key}: checkpoint '
                            f'{list(tensor.shape)}, model {list(target.shape)}')
            state[key] = tensor
            continue
        state[key] = entry.materialize() if entry.steps else tensor
        loaded.append(entry)
        report.loaded.append(key)
        for name, _ in entry.steps:
            report.adapted.setdefault(name, []).append(key)
        layout = module_layout(module)
        if layout is not None:
            info = dict(metadata.get(mod_name) or {})
            info['version'] = LAYOUT_VERSION[layout]
            metadata[mod_name] = info
    for key, problem in verify_entries(loaded, verify, report).items():
        problems.append(problem)
        del state[key]  # never applied: MMEngine reports it missing
        report.loaded.remove(key)
    fill = [t for t in fill_targets if t]
    if fill:
        for key, value in model_state.items():
            if key not in state and any(key.startswith(t + '.') for t in fill):
                state[key] = value.detach()
                report.new.append(key)
    report.missing = [k for k in model_state if k not in state and not may_be_absent(k)]
    state._metadata = metadata  # type: ignore[attr-defined]
    if ckpt.container == '<bare>':
        checkpoint.clear()
    checkpoint['state_dict'] = state
    report.mismatched = problems
    return report


def fill_targets_of(model: nn.Module, sources: Sequence[SourceSpec]) -> list:
    """Target submodules of the given sources (for :func:`repair_checkpoint`)."""
    out = []
    for spec in sources:
        out += [t for t in resolve_targets(model, spec.modality, spec.modules) if t not in out]
    return out
