"""Repair a checkpoint dict in place before MMEngine applies it (``load_from``)."""
from collections import OrderedDict
from typing import Any, Dict, MutableMapping, Sequence, Union

import torch
import torch.nn as nn

from ..checkpoint.containers import Unwrapped, unwrap
from ..errors import FusionLoadError
from ..checkpoint.identify import identify_state
from .modality import resolve_targets
from .pipeline import SourcePlan, plan_mapping, verify_plan
from .repairs import SourceContext, is_record, may_be_absent
from .repairs.spconv_layout import LAYOUT_VERSION, module_layout
from ..report import SourceReport
from ..sparse.layouts import check_layout_option
from .source import SourceSpec



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

    The plan is :func:`~mmfusionload.load.pipeline.plan_mapping`'s, the planner of
    :func:`~mmfusionload.load_sources`: one source of identical keys whose target is
    the whole model less the tensors of ``fill_targets`` the file lacks; the planned
    tensors are then written back into ``checkpoint`` instead of into the model.

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
            (:mod:`mmfusionload.sparse.verify`); a kernel that fails raises
            :class:`FusionLoadError` before ``checkpoint`` is modified.

    Returns:
        SourceReport: What was repaired.
    """
    bad_layout = check_layout_option(spconv_layout)
    if bad_layout:
        raise FusionLoadError([bad_layout], 'bad option')
    ckpt = unwrap(checkpoint, filename, weights=weights)
    report = SourceReport(filename, 'load_from', targets=['<model>'],
                          container=ckpt.container, prefix='identity',
                          stripped=list(ckpt.stripped), family=ckpt.family,
                          weights=ckpt.copy)
    shapes = ckpt.shapes()
    report.identity = identify_state(filename, shapes, ckpt.metadata).one_line()
    spec = SourceSpec(checkpoint=filename, spconv_layout=spconv_layout, strict=False,
                      verify=verify)
    model_state = dict(model.state_dict(keep_vars=True))
    fill = [t for t in fill_targets if t]
    # the model minus what the hook's sources fill: their tensors this file lacks
    targeted = {k: v for k, v in model_state.items()
                if k in ckpt.state or not any(k.startswith(t + '.') for t in fill)}
    keys = {k: k for k in ckpt.state}
    plan = plan_mapping(SourcePlan(spec, report), spec,
                        SourceContext(filename, spec, model, meta=dict(ckpt.meta or {})),
                        ckpt.state, keys, keys, shapes, [''], targeted, ckpt.metadata)
    if not plan.entries:  # _account found nothing provided: MMEngine warns about all
        report.kept = []
        report.missing = [k for k in targeted if not may_be_absent(k)]
    failed = verify_plan(plan, verify)
    if failed:  # before the checkpoint is touched: MMEngine applies nothing
        raise FusionLoadError(
            list(failed.values()),
            'a converted sparse kernel computes another function than the checkpoint\'s; '
            'nothing applied (verify=False loads it unchecked)')
    state = _write_back(ckpt, plan)
    for key, value in model_state.items():
        if key not in state and any(key.startswith(t + '.') for t in fill):
            state[key] = value.detach()
            report.new.append(key)
    if ckpt.container == '<bare>':
        checkpoint.clear()
    checkpoint['state_dict'] = state
    return report


def _write_back(ckpt: Unwrapped, plan: SourcePlan) -> 'OrderedDict[str, torch.Tensor]':
    """The state dict MMEngine gets, in the checkpoint's order: each planned tensor as
    the model takes it (``_metadata`` versions of converted sparse modules set to their
    new layout), a regenerated one as the model holds it, one that cannot be placed or
    is off the model as it is (MMEngine reports it)."""
    entries = {e.key: e for e in plan.entries}
    bad = {m.key for m in plan.report.mismatched}
    metadata: Dict[str, dict] = OrderedDict(ckpt.metadata)
    state: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for key, tensor in ckpt.state.items():
        e = entries.get(key)
        if e is None and is_record(key):  # a run-time record the model does not keep
            continue
        if e is None or key in bad:
            state[key] = tensor
        elif e.skip:
            state[key] = e.target.detach()
        else:
            layout = module_layout(e.module)
            if layout is not None:
                info = dict(metadata.get(e.module_name) or {})
                info['version'] = LAYOUT_VERSION[layout]
                metadata[e.module_name] = info
            state[key] = e.materialize() if e.steps else tensor
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


def fill_targets_of(model: nn.Module, sources: Sequence[SourceSpec]) -> list:
    """Target submodules of the given sources (for :func:`repair_checkpoint`)."""
    out = []
    for spec in sources:
        out += [t for t in resolve_targets(model, spec.modality, spec.modules) if t not in out]
    return out
