"""One decision of a file's sparse-kernel layout, for ``identify``, ``convert`` and loads.

A file holds its sparse kernels in one layout (:data:`~.layouts.LAYOUTS`) and
writes no marker of which. What tells:

- **the source**: an explicit ``spconv_layout`` option, or the preset of a
  format that always stores one layout;
- **shapes**: a kernel reads under a layout when its kernel dims are all in
  ``1..MAX_KERNEL`` and, when the file shows the conv's output width (its own
  ``bias``, or the BatchNorm right after it: :func:`out_width`), the layout's
  ``out`` is that width; with a model, when it is exactly the live module's
  stored shape (spatial axes as they are or reversed);
- **_metadata version 2**, written only by MMDetection3D's spconv 2.x override:
  a spconv 2.x module, so ``spconv2`` or ``spconv2_rskc``, never ``mmcv``.
  Version 1 is every ``nn.Module``'s default and proves nothing.

The file's layout is the one every kernel allows. The file's own facts decide
first (the same on ``identify``, ``convert`` and a load); a model's geometry
decides only what they leave open. ``mmcv`` ``[*k, in, out]`` and
``spconv2_rskc`` ``[*k, out, in]`` have one shape whenever ``in == out``, and
without a model or an output width no shape tells them apart.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .layouts import LAYOUT_DEFS, LAYOUTS, Geometry, layout_of_version

__all__ = ['MAX_KERNEL', 'KernelFacts', 'LayoutDecision', 'file_readings', 'model_readings',
           'out_width', 'file_kernels', 'decide_layout', 'describe_layouts']

#: Largest kernel extent taken for a sparse-conv kernel dim from a shape alone.
MAX_KERNEL = 7
#: Tensor ranks of 2-D, 3-D and 4-D sparse kernels.
KERNEL_RANKS = (4, 5, 6)

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class KernelFacts:
    """What is known of one sparse kernel of a file.

    Args:
        key (str): Its key (named in the evidence).
        shape (tuple[int]): Its shape in the file.
        version (int, optional): Its module's ``_metadata`` version in the file.
        out (int, optional): Its output width as the file shows it (:func:`out_width`).
        out_from (str): The key that shows ``out``.
        geometry (Geometry, optional): The live module's, when there is a model.
        module (str): The live module's name (for the evidence).
    """
    key: str
    shape: Shape
    version: Optional[int] = None
    out: Optional[int] = None
    geometry: Optional[Geometry] = None
    module: str = ''
    out_from: str = ''


@dataclass
class LayoutDecision:
    """A file's sparse-kernel layout and why.

    Attributes:
        layout (str, optional): The layout, None when undecided or contradictory.
        evidence (str): What decided it (or why nothing did).
        readings (dict): Key -> the layouts its shape and version allow.
        undecided (list[str]): Keys that read under several layouts, when nothing decides.
        conflict (bool): The kernels allow no common layout.
        by_model (bool): The live modules' geometry decided.
        misfits (list[str]): Keys that do not read under the layout the source named.
    """
    layout: Optional[str]
    evidence: str
    readings: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    undecided: List[str] = field(default_factory=list)
    conflict: bool = False
    by_model: bool = False
    misfits: List[str] = field(default_factory=list)


def describe_layouts(layouts: Sequence[str]) -> str:
    """``'mmcv [*k, in, out] or spconv2_rskc [*k, out, in]'``."""
    return ' or '.join(f'{lay} {LAYOUT_DEFS[lay].stored}' for lay in LAYOUTS if lay in layouts)


def file_readings(shape: Sequence[int], out: Optional[int] = None) -> Tuple[str, ...]:
    """Layouts under which ``shape`` reads as a 2-D, 3-D or 4-D sparse kernel from the
    file alone: kernel dims in ``1..MAX_KERNEL`` and, when ``out`` (the module's
    bias width) is known and some layout fits it, that layout's ``out`` is it."""
    if len(shape) not in KERNEL_RANKS:
        return ()
    found = tuple(lay for lay in LAYOUTS
                  if all(1 <= d <= MAX_KERNEL for d in LAYOUT_DEFS[lay].geometry(shape).kernel))
    if out is not None:
        fitting = tuple(lay for lay in found if LAYOUT_DEFS[lay].geometry(shape).cout == out)
        found = fitting or found  # a bias that fits no reading tells nothing
    return found


def model_readings(shape: Sequence[int], geom: Geometry) -> Tuple[Tuple[str, bool], ...]:
    """``(layout, spatial axes reversed)`` pairs under which ``shape`` is the stored
    kernel of a live module of geometry ``geom``."""
    out = []
    for lay in LAYOUTS:
        for rev in (False, True):
            if rev and geom.ndim < 2:
                continue
            if LAYOUT_DEFS[lay].shape(geom.reversed() if rev else geom) == tuple(shape):
                out.append((lay, rev))
    return tuple(out)


def out_width(key: str, shapes: Mapping[str, Sequence[int]]) -> Optional[Tuple[int, str]]:
    """A sparse kernel's output width as the file shows it, with the key that shows it:
    its module's own ``bias``, else the running mean of the BatchNorm right after it
    (``<seq>.<i+1>`` after ``<seq>.<i>``, as MMDetection3D's ``make_sparse_convmodule``
    and OpenPCDet's ``post_act_block`` build them; ``bnN`` after ``convN``, as in their
    ``SparseBasicBlock``s), which normalises the conv's output channels."""
    mod = key[:-len('.weight')] if key.endswith('.weight') else key.rpartition('.')[0]
    parent, _, last = mod.rpartition('.')
    near = [f'{mod}.bias']
    if last.isdigit():
        near.append(f'{parent}.{int(last) + 1}.running_mean' if parent
                    else f'{int(last) + 1}.running_mean')
    elif last.startswith('conv') and last[4:].isdigit():
        near.append(f'{parent + "." if parent else ""}bn{last[4:]}.running_mean')
    for k in near:
        s = shapes.get(k)
        if s is not None and len(s) == 1:
            return int(s[0]), k
    return None


def _dense_conv2d(shape: Sequence[int]) -> bool:
    """Whether a 4-D tensor also reads as a dense ``Conv2d`` weight ``[out, in, kh, kw]``."""
    return len(shape) == 4 and all(1 <= d <= MAX_KERNEL for d in shape[2:])


def file_kernels(shapes: Mapping[str, Sequence[int]],
                 versions: Mapping[str, Optional[int]]) -> List[KernelFacts]:
    """The sparse kernels of a file, without a model.

    5-D and 6-D ``*.weight`` tensors whose kernel dims fit are 3-D and 4-D
    sparse kernels (BEVFusion's and MMDetection3D's LiDAR encoders hold no dense
    ``Conv3d``; torch has no ``Conv4d``). A 4-D one is a 2-D sparse kernel when it
    cannot be a dense ``Conv2d`` weight, when its module has ``_metadata``
    version 2 (MMDetection3D's spconv 2.x modules; MMCV's ``DeformConv2dPack``
    and ``ModulatedDeformConv2dPack`` write it too and are told by their
    ``conv_offset``), or when it sits under the same top-level module as a
    certain sparse kernel.

    Args:
        shapes (Mapping): Key -> shape, every tensor of the file.
        versions (Mapping): Module name -> its ``_metadata`` version.

    Returns:
        list[KernelFacts]: The kernels, in the file's order.
    """
    def version(key: str) -> Optional[int]:
        v = versions.get(key.rpartition('.')[0])
        return int(v) if v is not None else None

    candidates = [k for k, s in shapes.items() if k.endswith('.weight') and file_readings(s)]

    def sure(k: str) -> bool:
        s = shapes[k]
        if not _dense_conv2d(s):
            return True
        mod = k.rpartition('.')[0]
        return (layout_of_version(version(k)) is not None
                and f'{mod}.conv_offset.weight' not in shapes)

    heads = {k.split('.', 1)[0] for k in candidates if sure(k)}
    out = []
    for k in candidates:
        if not sure(k) and k.split('.', 1)[0] not in heads:
            continue
        width = out_width(k, shapes)
        out.append(KernelFacts(k, tuple(int(d) for d in shapes[k]), version(k),
                               width[0] if width else None, out_from=width[1] if width else ''))
    return out


def _narrow(k: KernelFacts, found: Tuple[str, ...]) -> Tuple[Tuple[str, ...], bool]:
    """The readings a kernel's ``_metadata`` version leaves, and whether it narrowed them
    (a version that contradicts the shape is set aside: the shape is the fact)."""
    spconv = layout_of_version(k.version)
    if spconv:
        kept = tuple(lay for lay in found if lay in spconv)
        if kept and kept != found:
            return kept, True
    return found, False


def _reads(lays: Sequence[str]) -> str:
    return f'only as {lays[0]}' if len(lays) == 1 else 'as ' + ' or '.join(lays)


def _v2(narrowed: bool) -> str:
    return ' with _metadata version 2 (a spconv 2.x module)' if narrowed else ''


def _decide(kernels: Sequence[KernelFacts], readings: Dict[str, Tuple[str, ...]],
            narrowed: Dict[str, bool], by_model: bool) -> LayoutDecision:
    sets = [k for k in kernels if readings[k.key]]
    if not sets:
        return LayoutDecision(None, 'no sparse-conv kernels', dict(readings))
    where = ({k.key: f' in {k.module} (kernel {list(k.geometry.kernel)}, {k.geometry.cin} -> '
              f'{k.geometry.cout})' for k in sets if k.geometry is not None} if by_model else {})

    def name(k: KernelFacts) -> str:
        told = (f' (out {k.out}: {k.out_from})' if k.out is not None and not by_model
                and file_readings(k.shape, k.out) != file_readings(k.shape) else '')
        return f'{k.key} {list(k.shape)}{told}{where.get(k.key, "")}{_v2(narrowed[k.key])}'

    common = set(LAYOUTS)
    path: List[KernelFacts] = []
    for k in sets:
        left = common & set(readings[k.key])
        if left != common:
            path.append(k)
        if not left:
            parts = [f'{name(p)} reads {_reads(readings[p.key])}' for p in path]
            text = ', '.join(parts[:-1]) + ', but ' + parts[-1] if len(parts) > 1 else parts[0]
            return LayoutDecision(
                None, f'the sparse kernels disagree on their layout: {text}', dict(readings),
                conflict=True, by_model=by_model)
        common = left
    if len(common) == 1:
        lay = next(iter(common))
        single = [k for k in sets if readings[k.key] == (lay, )]
        form = f'{lay} layout {LAYOUT_DEFS[lay].stored}'
        if single:
            fit = 'fit their modules only in the' if by_model else 'fit only the'
            text = (f'{len(single)} of {len(sets)} sparse kernels {fit} {form}, '
                    f'e.g. {name(single[0])}')
        else:
            text = (f'the readings of the sparse kernels meet only in the {form}: '
                    + ', '.join(f'{name(p)} reads {_reads(readings[p.key])}' for p in path))
        return LayoutDecision(lay, text, dict(readings), by_model=by_model)
    lays = [lay for lay in LAYOUTS if lay in common]
    undecided = [k.key for k in sets if len(readings[k.key]) > 1]
    example = next(k for k in sets if k.key in undecided)
    fit = 'fit their modules' if by_model else 'read'
    text = (f'all {len(sets)} sparse kernels {fit} as {describe_layouts(lays)} alike, '
            f'e.g. {name(example)}; nothing in the file decides '
            f'({"nor in the model; " if by_model else ""}no layout is written in a file, '
            "and _metadata version 1 is every module's default)")
    return LayoutDecision(None, text, dict(readings), undecided=undecided, by_model=by_model)


def decide_layout(kernels: Sequence[KernelFacts], option: str = 'auto',
                  said_by: str = '') -> LayoutDecision:
    """The layout of a file's sparse kernels, and why.

    Args:
        kernels (Sequence[KernelFacts]): The kernels (with their live geometry
            when there is a model).
        option (str): ``'auto'``, or the layout the source names.
        said_by (str): Who named it, for the evidence (default:
            ``spconv_layout=<option>``).

    Returns:
        LayoutDecision: The decision. ``option`` wins; otherwise the file's own
        facts (shapes, bias widths, ``_metadata`` version 2), then, where they
        leave several layouts, the live modules' geometry.
    """
    readings: Dict[str, Tuple[str, ...]] = {}
    narrowed: Dict[str, bool] = {}
    for k in kernels:
        readings[k.key], narrowed[k.key] = _narrow(k, file_readings(k.shape, k.out))
    if option != 'auto':
        misfits = [k.key for k in kernels if option not in (
            {lay for lay, _ in model_readings(k.shape, k.geometry)} if k.geometry is not None
            else file_readings(k.shape))]
        return LayoutDecision(option, said_by or f'spconv_layout={option!r}', readings,
                              misfits=misfits)
    decision = _decide(kernels, readings, narrowed, False)
    with_model = [k for k in kernels if k.geometry is not None]
    if decision.layout is not None or decision.conflict or not with_model:
        return decision
    fits: Dict[str, Tuple[str, ...]] = {}
    for k in with_model:
        found = tuple(dict.fromkeys(lay for lay, _ in model_readings(k.shape, k.geometry)))
        fits[k.key], narrowed[k.key] = _narrow(k, found)
    by_model = _decide(with_model, fits, narrowed, True)
    by_model.readings = dict(readings, **fits)
    return by_model
