"""Sparse-conv kernels: the checkpoint's layout and spatial axis order, decided per file.

The layouts themselves (what a stored kernel computes, and the conversions) are
defined in :mod:`mmfusionload.sparse.layouts`. Here the repairs decide, for one
source, which layout its sparse kernels are in and whether an encoder's
spatial axes are reversed with respect to the live model:

- **layout, per file**: :func:`~mmfusionload.sparse.decide.decide_layout`, the
  one decider ``identify`` and ``convert`` call too: an explicit
  ``spconv_layout`` wins; otherwise the file's shapes, output widths and
  ``_metadata`` version 2 (version 1 is every ``nn.Module``'s default and
  proves nothing), then the live modules' geometry, decide for the whole file,
  ambiguous kernels included. Kernels allowing no common layout are an error
  naming them; a file they leave undecided (e.g. every kernel ``in == out``,
  which reads as ``mmcv`` and ``spconv2_rskc`` alike) is refused naming the
  option to set.
- **axis order, per encoder** (:mod:`mmfusionload.sparse.axis_order`).
"""
from typing import Dict, List, Optional, Tuple

from ...sparse.axis_order import decide_axis_order, encoder_of, source_order_option
from ...registry import REPAIRS
from ...sparse.decide import KernelFacts, decide_layout, model_readings, out_width
from ...sparse.layouts import (LAYOUT_VERSION, LAYOUTS, MMCV, SPCONV2, convert,
                               layout_of_version, reverse_axes, stored_shape, volume)
from ...sparse.modules import (convert_kernel, kernel_shape, module_geometry, module_layout,
                               module_pointwise)
from .base import Entry, Mapped, Repair, RepairProblem, SourceContext

__all__ = ['SPCONV2', 'MMCV', 'LAYOUTS', 'LAYOUT_VERSION', 'layout_of_version', 'module_layout',
           'module_geometry', 'module_pointwise', 'kernel_shape', 'convert_kernel',
           'decide_sparse', 'SpconvLayout',
           'AxisOrder']

def _is_kernel(m: Mapped) -> bool:
    return (len(m.shape) >= 3 and module_layout(m.module) is not None
            and m.key.rsplit('.', 1)[-1] == 'weight')


class SparseDecision:
    """The layout and axis order of one source's sparse kernels.

    Attributes:
        layout (str, optional): The file's layout.
        why (str): What decided it.
        reversed (dict): Encoder name -> whether its spatial axes are reversed.
        orders (dict): Encoder name -> (checkpoint order, model order), when known.
        encoder (dict): Model key -> encoder name.
        problems (dict): Model key -> the message its entry raises.
        decision (LayoutDecision, optional): The layout decision with its evidence.
    """

    def __init__(self):
        self.layout: Optional[str] = None
        self.why = ''
        self.decision = None
        self.reversed: Dict[str, bool] = {}
        self.orders: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
        self.encoder: Dict[str, str] = {}
        self.problems: Dict[str, str] = {}


def _fits(m: Mapped) -> List[Tuple[str, bool]]:
    """(layout, axes reversed) pairs under which the checkpoint shape fits the module."""
    return list(model_readings(m.shape, module_geometry(m.module)))


def _decide_layout(ctx: SourceContext, kernels: List[Mapped], d: SparseDecision) -> None:
    option = getattr(ctx.options, 'spconv_layout', 'auto') or 'auto'
    fname = ctx.filename
    shapes = {m.file_key: m.shape for m in ctx.mapped if len(m.shape) == 1}
    facts = []
    for m in kernels:
        width = out_width(m.file_key, shapes)
        facts.append(KernelFacts(m.file_key, tuple(m.shape), m.file_version,
                                 width[0] if width else None, module_geometry(m.module),
                                 m.module_name, width[1] if width else ''))
    decision = decide_layout(facts, option)
    d.decision, d.layout, d.why = decision, decision.layout, decision.evidence
    choices = ' or '.join(repr(lay) for lay in LAYOUTS)
    if decision.conflict:
        msg = (f'{fname}: {decision.evidence}; a file holds one layout (set spconv_layout='
               f'{choices} on this source if you know it)')
        for m in kernels:
            d.problems[m.key] = msg
    elif decision.layout is None and decision.undecided:
        msg = f'{fname}: {decision.evidence}; set spconv_layout={choices} on this source'
        undecided = set(decision.undecided)
        for m in kernels:
            if m.file_key in undecided:
                d.problems[m.key] = msg


def decide_sparse(ctx: SourceContext) -> SparseDecision:
    """Decide (once per source) the layout and axis order of its sparse kernels."""
    if 'sparse' in ctx.cache:
        return ctx.cache['sparse']
    d = SparseDecision()
    ctx.cache['sparse'] = d
    kernels = [m for m in ctx.mapped if _is_kernel(m)]
    fits = {m.key: _fits(m) for m in kernels}
    for m in kernels:
        if not fits[m.key]:
            g = module_geometry(m.module)
            d.problems[m.key] = (
                f'{ctx.filename}: {m.file_key} -> {m.key}: shape {list(m.shape)} is none of '
                'the layouts of this module ('
                + ', '.join(f'{lay} {list(stored_shape(g, lay))}' for lay in LAYOUTS)
                + '), nor any with the spatial axes reversed')
    kernels = [m for m in kernels if fits[m.key]]
    _decide_layout(ctx, kernels, d)
    if d.layout is None:
        return d
    groups: Dict[str, List[Mapped]] = {}
    ancestors: Dict[str, Optional[bool]] = {}
    for m in kernels:
        enc = encoder_of(ctx.model, m.module_name, ancestors)
        d.encoder[m.key] = enc
        groups.setdefault(enc, []).append(m)
    option = source_order_option(ctx.options)
    for enc, members in groups.items():
        revs = {m.key: {rev for lay, rev in fits[m.key] if lay == d.layout} for m in members}
        rev, orders, problem = decide_axis_order(ctx, enc, members, revs, option)
        d.reversed[enc], d.orders[enc] = rev, orders
        for m in members:
            if m.key in d.problems:
                continue
            if problem:
                d.problems[m.key] = problem
            elif not revs[m.key]:
                g = module_geometry(m.module)
                d.problems[m.key] = (
                    f'{ctx.filename}: {m.file_key} -> {m.key}: {d.why}: the file is in the '
                    f'{d.layout} layout, so expected shape {list(stored_shape(g, d.layout))}, '
                    f'but the checkpoint has {list(m.shape)}')
            elif rev not in revs[m.key]:
                g = module_geometry(m.module)
                d.problems[m.key] = (
                    f'{ctx.filename}: {m.file_key} -> {m.key}: {list(m.shape)} fits this '
                    f'module (kernel {list(g.kernel)}) only with the spatial axes '
                    f'{"as they are" if rev else "reversed"}, but the axis order of '
                    f'{enc or "the model"} '
                    f'was decided as {"reversed" if rev else "the same"} ({orders}); set '
                    "spatial_order='zyx' or 'xyz' on this source")
    return d


def _context(entry: Entry) -> SourceContext:
    if entry.context is None:  # a lone entry: its own evidence only
        entry.context = SourceContext(entry.filename, entry.options, None, [Mapped(
            entry.key, entry.file_key, tuple(entry.source.shape), entry.module,
            entry.module_name, entry.file_version)])
    return entry.context


@REPAIRS.register_module()
class SpconvLayout(Repair):
    """Convert sparse-conv kernels from the file's layout into the live module's."""
    name = 'spconv_layout'
    priority = 10

    def __call__(self, entry: Entry) -> None:
        if len(entry.shape) < 3:  # the cheapest of the three tests first
            return
        dst = module_layout(entry.module)
        if dst is None or entry.param_name != 'weight':
            return
        where = f'{entry.filename}: {entry.file_key} -> {entry.key}'
        if tuple(entry.target.shape) != kernel_shape(entry.module, dst):
            raise RepairProblem(
                f'{where}: the live {type(entry.module).__name__} holds '
                f'{list(entry.target.shape)}, not its class layout {dst}')
        ctx = _context(entry)
        if not any(m.key == entry.key for m in ctx.mapped):
            ctx.mapped.append(Mapped(entry.key, entry.file_key, tuple(entry.source.shape),
                                     entry.module, entry.module_name, entry.file_version))
            ctx.cache.pop('sparse', None)
        d = decide_sparse(ctx)
        if entry.key in d.problems:
            raise RepairProblem(d.problems[entry.key])
        src, enc = d.layout, d.encoder[entry.key]
        rev = d.reversed[enc]
        entry.facts['spconv_layout'] = (src, dst)
        entry.facts['axis_order'] = (rev, d.orders[enc])
        if src != dst:
            g, pw = module_geometry(entry.module), module_pointwise(entry.module)
            entry.add_step(self.name, lambda t, s=src, t_=dst, p=pw: convert(t, s, t_, p),
                           shape=stored_shape(g.reversed() if rev else g, dst))


@REPAIRS.register_module()
class AxisOrder(Repair):
    """Reverse the spatial axes of a sparse kernel whose encoder's order is reversed."""
    name = 'axis_order'
    priority = 11

    def __call__(self, entry: Entry) -> None:
        rev = entry.facts.get('axis_order', (False, None))[0]
        if not rev or volume(module_geometry(entry.module).kernel) == 1:
            return
        dst, pw = module_layout(entry.module), module_pointwise(entry.module)
        entry.add_step(self.name, lambda t, lay=dst, p=pw: reverse_axes(t, lay, p),
                       shape=entry.target.shape)
