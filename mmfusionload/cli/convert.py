"""Rewrite a checkpoint into the names and sparse-kernel layout a target model expects.

Two ways:

- with a model (``mmfusionload convert --config``): the model decides. The source is
  planned against it exactly as :func:`~mmfusionload.load_sources` would
  (:func:`~mmfusionload.plan_source`, every repair, strictness), and the tensors
  written are what the load would copy into the model (``Entry.materialize``);
  ``_metadata`` is the model's own.
- without a model: a preset's renames, a prefix strip/add, and a sparse-kernel
  conversion between the layouts (``spconv2`` ``[out, *k, in]``, ``mmcv``
  ``[*k, in, out]``, ``spconv2_rskc`` ``[*k, out, in]``). Which tensors are sparse
  kernels and their layout are read as ``identify`` reads them
  (:func:`~mmfusionload.sparse.decide.file_kernels`,
  :func:`~mmfusionload.sparse.decide.decide_layout`).

Files are written atomically (a temporary file in the destination's folder, then
``os.replace``); the source file is never the destination.
"""
import os.path as osp
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint.containers import Unwrapped, unwrap
from ..errors import FusionLoadError
from ..load.pipeline import plan_source, read_source, validate
from ..load.presets import get_preset, rename_keys
from ..files.reader import read_checkpoint
from ..files.writer import check_destination, plain_metadata, save_checkpoint
from ..load.repairs.spconv_layout import (LAYOUT_VERSION, LAYOUTS, SPCONV2, convert_kernel,
                                          module_layout, module_pointwise)
from ..sparse.axis_order import kernel_order
from ..sparse.decide import MAX_KERNEL, decide_layout, file_kernels, file_readings
from ..sparse.layouts import LAYOUT_DEFS, ORDERS, check_layout_option, reverse_axes, volume
from ..report import SourceReport
from ..load.source import parse_source

Progress = Optional[Callable[[str, int], Callable[[], None]]]


@dataclass
class Converted:
    """A converted checkpoint, ready to write.

    Args:
        state (OrderedDict): Tensors, with ``_metadata``.
        meta (dict): The checkpoint's ``meta`` (kept) plus a ``mmfusionload`` entry.
        report (SourceReport, optional): The plan's report (with a model).
        sparse (dict): Key -> (layout in the file, layout written) of sparse kernels.
        notes (list[str]): Remarks for the user.
        layout_evidence (str): Why the file's sparse kernels are in the layout read
            (without a model).
    """
    state: 'OrderedDict[str, torch.Tensor]'
    meta: Dict[str, Any]
    report: Optional[SourceReport] = None
    sparse: Dict[str, tuple] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    layout_evidence: str = ''


def convert_state(ckpt: Unwrapped,
                  preset: Optional[str] = None,
                  strip_prefix: Optional[str] = None,
                  add_prefix: Optional[str] = None,
                  spconv_layout: str = 'auto',
                  to_layout: Optional[str] = None,
                  filename: str = '') -> Converted:
    """Rename and re-layout a checkpoint without a model.

    Args:
        ckpt (Unwrapped): The source's tensors.
        preset (str, optional): A registered key preset.
        strip_prefix (str, optional): Removed from the keys that start with it.
        add_prefix (str, optional): Prepended to every key (after stripping).
        spconv_layout (str): Layout of the file's sparse kernels: ``'auto'`` (the
            preset's, else what the file shows) or one of
            :data:`~mmfusionload.sparse.layouts.LAYOUTS`.
        to_layout (str, optional): Layout to write (default: as in the file).
        filename (str): For messages.

    Returns:
        Converted: The tensors and metadata.
    """
    p = get_preset(preset) if preset else None
    state: Mapping[str, torch.Tensor] = ckpt.state
    if p is not None and p.convert is not None:
        state = p.convert(dict(state))
    said_by = ''
    if spconv_layout == 'auto' and p is not None and p.spconv_layout:
        spconv_layout = p.spconv_layout
        said_by = f'preset {preset!r}: spconv_layout={spconv_layout!r}'
    mapping = rename_keys(list(state), (), p, filename)  # new -> file key
    if strip_prefix and not any(k.startswith(strip_prefix) for k in mapping):
        raise FusionLoadError([f'{filename}: no key starts with {strip_prefix!r} '
                               f'(keys look like {", ".join(list(mapping)[:3])})'],
                              'bad prefix')
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    file_key: Dict[str, str] = {}
    problems = []
    for new, old in mapping.items():
        key = new
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        key = (add_prefix or '') + key
        if key in file_key:
            problems.append(f'{filename}: {file_key[key]!r} and {old!r} both become {key!r}')
            continue
        file_key[key] = old
        out[key] = state[old]
    if problems:
        raise FusionLoadError(problems, 'key collision')

    metadata: 'OrderedDict[str, dict]' = OrderedDict()
    src_meta = ckpt.metadata
    for key, old in file_key.items():
        mod, old_mod = key.rpartition('.')[0], old.rpartition('.')[0]
        if old_mod in src_meta and mod not in metadata:
            metadata[mod] = dict(src_meta[old_mod])
    result = Converted(out, {})
    shapes = {k: tuple(t.shape) for k, t in out.items()}
    mod_versions = {}
    for key in shapes:
        mod = key.rpartition('.')[0]
        if mod not in mod_versions:
            mod_versions[mod] = (src_meta.get(file_key[key].rpartition('.')[0])
                                 or {}).get('version')
    facts = file_kernels(shapes, mod_versions)
    kernels = [k.key for k in facts]
    decision = decide_layout(facts, spconv_layout, said_by)
    src = decision.layout
    result.layout_evidence = decision.evidence
    choices = '|'.join(LAYOUTS)
    if decision.misfits:
        raise FusionLoadError(
            [f'{filename}: {k}: shape {list(shapes[k])} is not a {src} sparse kernel '
             f'({LAYOUT_DEFS[src].stored} with kernel dims <= {MAX_KERNEL}); pass '
             '--config to let the model decide' for k in decision.misfits[:5]], 'bad layout')
    if decision.conflict:
        raise FusionLoadError(
            [f'{filename}: {decision.evidence}; pass --spconv-layout {choices} or --config'],
            'ambiguous layout')
    if decision.undecided and to_layout:
        raise FusionLoadError(
            [f'{filename}: cannot tell the layout of {len(decision.undecided)} sparse '
             f'kernel(s) ({", ".join(decision.undecided[:3])}): {decision.evidence}; pass '
             f'--spconv-layout {choices} or --config'], 'ambiguous layout')
    if decision.undecided:
        result.notes.append(f'{len(decision.undecided)} sparse kernel(s) of unknown layout '
                            f'written as they are, without a layout version '
                            f'({", ".join(decision.undecided[:3])})')
    pointwise = 0
    for key in kernels if src is not None else ():
        t, mod = out[key], key.rpartition('.')[0]
        dst = to_layout or src
        if dst != src:
            pointwise += volume(LAYOUT_DEFS[src].geometry(t.shape).kernel) == 1
            out[key] = convert_kernel(t, src, dst)
        result.sparse[key] = (src, dst)
        metadata.setdefault(mod, {})['version'] = LAYOUT_VERSION[dst]
    if pointwise:
        result.notes.append(
            f'{pointwise} volume-1 kernel(s) converted as spconv 2.x reads a submanifold or '
            'stride-1 one (its conv1x1 path); for a volume-1 conv with stride > 1 pass --config')
    dense = [k for k, s in shapes.items() if k.endswith('.weight') and k not in kernels
             and len(s) in (4, 5, 6) and file_readings(s)]
    if dense and to_layout:
        result.notes.append(
            f'{len(dense)} weight(s) that could be sparse kernels were read as dense conv '
            f'weights and left as they are ({", ".join(dense[:3])}); if they are sparse '
            'kernels, pass --config')
    out._metadata = metadata  # type: ignore[attr-defined]
    return result


# ---------------------------------------------------------------- export to a format

def _encoder_order(shapes: Mapping[str, Tuple[int, ...]], kernels: Mapping[str, Tuple[int, ...]],
                   layout: Optional[str]) -> Tuple[Optional[str], str]:
    """The axis order the file's sparse encoder shows: its ``conv_out`` kernel reduces
    the height alone (``(3, 1, 1)``: z-y-x, ``(1, 1, 3)``: x-y-z)."""
    if layout is None:
        return None, 'no sparse-kernel layout'
    for k in kernels:
        if 'conv_out' in k and len(shapes[k]) == 5:
            order = kernel_order(LAYOUT_DEFS[layout].geometry(shapes[k]).kernel)
            if order is not None:
                return order, f'{k} {list(shapes[k])}'
    return None, 'no conv_out kernel shows it'


def export_state(ckpt: Unwrapped,
                 to_format: str,
                 spconv_layout: str = 'auto',
                 to_layout: Optional[str] = None,
                 spatial_order: Optional[str] = None,
                 filename: str = '') -> Converted:
    """An MMDetection3D checkpoint under a foreign format's names (the preset's reverse).

    Sparse kernels are written in ``to_layout`` (default: the format's) and in
    ``spatial_order`` (default: the format's encoder order); when that differs from the
    order the file's encoder shows, every sparse kernel's spatial axes are reversed and
    the 2-D kernels of ``pts_backbone``/``pts_neck`` transposed, as their BEV map is.

    Args:
        ckpt (Unwrapped): The source's tensors, MMDetection3D names.
        to_format (str): A registered preset that states its reverse.
        spconv_layout (str): Layout of the file's sparse kernels (``'auto'``: decided
            by ``_metadata`` and the shapes).
        to_layout (str, optional): Layout to write.
        spatial_order (str, optional): ``'zyx'`` or ``'xyz'`` to write.
        filename (str): For messages.

    Returns:
        Converted: The format's tensors (with ``_metadata``); the keys left out in
        ``notes``.
    """
    from ..load.repairs.bev_order import transpose_bev_kernel
    preset = get_preset(to_format)
    if not preset.exports:
        raise FusionLoadError([f'preset {to_format!r} states no reverse: it converts into '
                               'MMDetection3D only'], 'bad option')
    if spatial_order is not None and spatial_order not in ORDERS:
        raise FusionLoadError([f'--spatial-order must be zyx or xyz, got {spatial_order!r}'],
                              'bad option')
    state = ckpt.state
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    facts = file_kernels(shapes, {k.rpartition('.')[0]: (ckpt.metadata.get(
        k.rpartition('.')[0]) or {}).get('version') for k in shapes})
    kernels = {k.key: shapes[k.key] for k in facts}
    decision = decide_layout(facts, spconv_layout)
    src = decision.layout
    if decision.misfits:
        raise FusionLoadError([f'{filename}: {k}: shape {list(shapes[k])} is not a {src} sparse '
                               'kernel' for k in decision.misfits[:5]], 'bad layout')
    if src is None and kernels:
        raise FusionLoadError(
            [f'{filename}: cannot tell the layout of {len(kernels)} sparse kernel(s) '
             f'({", ".join(list(kernels)[:3])}): {decision.evidence}; pass --spconv-layout '
             f'{"|".join(LAYOUTS)}'], 'ambiguous layout')
    dst = to_layout or preset.export_layout or preset.spconv_layout or SPCONV2
    want = spatial_order or preset.order
    have, evidence = _encoder_order(shapes, kernels, src)
    if want and kernels and have is None:
        raise FusionLoadError([f'{filename}: the sparse encoder does not show its axis order '
                               f'({evidence}); cannot write {want}'], 'ambiguous order')
    flip = bool(want and have and want != have)
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    result = Converted(out, {})
    sparse_ids = {}
    for k, t in state.items():
        if k in kernels:
            t = convert_kernel(t, src, dst)
            if flip:
                t = reverse_axes(t, dst)
            sparse_ids[id(t)] = k
        elif flip and t.dim() == 4 and k.endswith('.weight') and (
                k.startswith('pts_backbone.') or k.startswith('pts_neck.')):
            t = transpose_bev_kernel(t)
        out[k] = t
    try:
        named, left = preset.export_state(out)
    except FusionLoadError as e:
        raise FusionLoadError([f'{filename}: {p}' for p in e.problems], e.title) from None
    metadata: 'OrderedDict[str, dict]' = OrderedDict()
    final: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    for k, t in named.items():
        final[k] = t
        if id(t) in sparse_ids:
            result.sparse[k] = (src, dst)
            metadata[k.rpartition('.')[0]] = {'version': LAYOUT_VERSION[dst]}
    final._metadata = metadata  # type: ignore[attr-defined]
    result.state = final
    if flip:
        result.notes.append(f'the encoder is {have} ({evidence}); written {want}: sparse '
                            "kernels' spatial axes reversed, the BEV layers' 2-D kernels "
                            'transposed')
    if left:
        groups = OrderedDict()
        for k in left:
            g = k.split('.', 1)[0] + '.'
            groups[g] = groups.get(g, 0) + 1
        result.notes.append(f'left out, no place in {to_format}: '
                            + ', '.join(f'{g} ({n})' for g, n in groups.items()))
    return result


# ---------------------------------------------------------------- with a model

def convert_with_model(model: nn.Module,
                       source: Dict[str, Any],
                       to_layout: Optional[str] = None,
                       progress: Progress = None) -> Converted:
    """What :func:`~mmfusionload.load_sources` would copy into ``model``, as a state dict.

    Args:
        model (nn.Module): The target model.
        source (dict): One source (``checkpoint``, ``preset``, ``prefix``,
            ``spconv_layout``, ``modality``...).
        to_layout (str, optional): Write sparse kernels in this layout instead of
            the model's (for an install with the other sparse-conv backend).
        progress: ``progress(description, total)`` returning an ``advance()``.

    Returns:
        Converted: Tensors under the model's names in the model's layout (or
        ``to_layout``), regenerated tensors with the model's own values, and the
        model's ``_metadata``.

    Raises:
        FusionLoadError: Anything the load would refuse.
    """
    spec = parse_source(dict(source))
    ckpt = read_source(spec)
    model_state = dict(model.state_dict(keep_vars=True))
    plan = plan_source(model, spec, ckpt, model_state)
    problems = validate([plan])
    if problems:
        err = FusionLoadError(problems, 'the checkpoint does not fit the model; nothing written')
        err.report = plan.report  # type: ignore[attr-defined]
        raise err
    entries = {e.key: e for e in plan.entries}
    advance = progress('materializing', len(entries)) if progress else (lambda: None)
    state: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    result = Converted(state, dict(ckpt.meta), plan.report)
    model_meta = getattr(model.state_dict(), '_metadata', None) or {}
    metadata = OrderedDict((k, dict(v)) for k, v in model_meta.items())
    for key in model_state:
        e = entries.get(key)
        if e is None:
            continue
        t = e.materialize() if e.skip is None else e.target
        t = t.detach().clone() if t is e.source or t is e.target else t.detach()
        layout = module_layout(e.module)
        if layout is not None and e.param_name == 'weight' and t.dim() >= 3:
            dst = to_layout or layout
            if dst != layout:
                t = convert_kernel(t, layout, dst, module_pointwise(e.module))
            result.sparse[key] = (layout, dst)
            metadata.setdefault(e.module_name, {})['version'] = LAYOUT_VERSION[dst]
        state[key] = t
        advance()
    state._metadata = metadata  # type: ignore[attr-defined]
    return result


def convert_checkpoint(src: str,
                       dst: str,
                       preset: Optional[str] = None,
                       spconv_layout: str = 'auto',
                       to_layout: Optional[str] = None,
                       strip_prefix: Optional[str] = None,
                       add_prefix: Optional[str] = None,
                       model: Optional[nn.Module] = None,
                       source_options: Optional[Dict[str, Any]] = None,
                       trust_checkpoint: bool = False,
                       weights: str = 'auto',
                       progress: Progress = None,
                       extra_meta: Optional[Dict[str, Any]] = None,
                       to_format: Optional[str] = None,
                       spatial_order: Optional[str] = None) -> Converted:
    """Convert ``src`` and write it to ``dst`` (atomically; never over ``src``).

    With ``model`` the model decides names and layout (see
    :func:`convert_with_model`); ``strip_prefix``/``add_prefix`` then become the
    source's explicit ``prefix`` rewrite and ``source_options`` (``modality``,
    ``modules``, ``strict``, ``exclude``...) are passed through. Without it see
    :func:`convert_state`. ``to_format`` writes a foreign format instead (the
    preset's reverse, :func:`export_state`; no model, no preset, no prefix options),
    in its container. The checkpoint's ``meta`` is kept, with a
    ``mmfusionload`` entry recording the conversion. ``weights`` picks the copy of
    the weights (``'auto'``, ``'ema'``, ``'raw'``; see
    :func:`~mmfusionload.checkpoint.trainers.choose_copy`).

    Returns:
        Converted: What was written.
    """
    bad = [p for p in (check_layout_option(spconv_layout, '--spconv-layout'),
                       check_layout_option(to_layout, '--to-layout', auto=False)
                       if to_layout is not None else None) if p]
    if bad:
        raise FusionLoadError(bad, 'bad option')
    check_destination(dst, [src])
    container = None
    if to_format is not None:
        if model is not None or preset or strip_prefix or add_prefix:
            raise FusionLoadError(['--to-format takes an MMDetection3D checkpoint as it is: '
                                   'no --config, --preset, --strip-prefix or --add-prefix'],
                                  'bad option')
        ckpt = unwrap(read_checkpoint(src, trust_checkpoint=trust_checkpoint), src,
                      weights=weights)
        result = export_state(ckpt, to_format, spconv_layout, to_layout, spatial_order, src)
        result.meta = dict(ckpt.meta)
        copy = ckpt.copy
        container = get_preset(to_format).container
        extra_meta = dict(extra_meta or {}, to_format=to_format)
    elif spatial_order is not None:
        raise FusionLoadError(['--spatial-order goes with --to-format'], 'bad option')
    elif model is not None:
        source = dict(source_options or {}, checkpoint=src, spconv_layout=spconv_layout,
                      trust_checkpoint=trust_checkpoint, weights=weights)
        if preset:
            source['preset'] = preset
        if strip_prefix or add_prefix:
            source['prefix'] = {strip_prefix or '': add_prefix or ''}
        result = convert_with_model(model, source, to_layout, progress)
        copy = result.report.weights if result.report is not None else ''
    else:
        ckpt = unwrap(read_checkpoint(src, trust_checkpoint=trust_checkpoint), src,
                      weights=weights)
        result = convert_state(ckpt, preset, strip_prefix, add_prefix, spconv_layout,
                               to_layout, src)
        result.meta = dict(ckpt.meta)
        copy = ckpt.copy
    result.meta = plain_metadata(result.meta, result.notes)
    layouts = sorted({d for _, d in result.sparse.values()})
    result.meta['mmfusionload'] = dict(
        converted_from=osp.abspath(src), preset=preset,
        spconv_layout=layouts[0] if len(layouts) == 1 else (layouts or None),
        verified_against_model=model is not None, weights=copy or None, **(extra_meta or {}))
    save_checkpoint(dst, result.state, result.meta, container)
    return result
