"""Spatial axis order of a sparse encoder: z-y-x or x-y-z.

MMDetection3D 1.4.0 has two conventions for the same layers:

- ``SparseEncoder`` (CenterPoint, SECOND, PointPillars-free configs) and
  OpenPCDet's backbones: coordinates ``(z, y, x)``, e.g. ``sparse_shape=[41,
  1440, 1440]``, stage-3 padding ``(0, 1, 1)``, ``conv_out`` kernel ``(3, 1, 1)``
  stride ``(2, 1, 1)``;
- ``BEVFusionSparseEncoder`` (``projects/BEVFusion``): coordinates
  ``(x, y, z)``, ``sparse_shape=[1440, 1440, 41]``, padding ``(1, 1, 0)``,
  ``conv_out`` kernel ``(1, 1, 3)`` stride ``(1, 1, 2)``; its BEV output is the
  other's transposed in (x, y).

A kernel trained in one order computes the same function in the other once its
spatial axes are reversed. The order of an encoder is a property of the whole
encoder: it is read from its ``sparse_shape`` and from every anisotropic
kernel size, stride and padding of its sparse convs (the axis that differs
from the two others is z), and the order of a checkpoint from its kernels'
shapes compared with the live modules' kernel sizes.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .layouts import ORDERS, XYZ, ZYX

Orders = Tuple[Optional[str], Optional[str]]


def source_order_option(options: Any) -> str:
    """The source's ``spatial_order`` option (``'auto'`` when absent)."""
    return getattr(options, 'spatial_order', 'auto') or 'auto'


def _odd_axis(values: Sequence[int]) -> Optional[int]:
    """Index of the one value that differs from the two others (3 values), else None."""
    v = [int(x) for x in values]
    if len(v) != 3 or len(set(v)) != 2:
        return None
    for i in range(3):
        if v.count(v[i]) == 1:
            return i
    return None


def _order_of_axis(i: Optional[int]) -> Optional[str]:
    return {0: ZYX, 2: XYZ}.get(i) if i is not None else None


def kernel_order(kernel: Sequence[int]) -> Optional[str]:
    """The order an anisotropic 3-D kernel size shows: z is the one extent that
    differs from the two others (``(3, 1, 1)``: z-y-x); None otherwise."""
    return _order_of_axis(_odd_axis(kernel))


def shape_order(sparse_shape: Sequence[int]) -> Optional[str]:
    """The order a ``sparse_shape`` implies: z is the odd extent, or the one far smaller."""
    s = [int(x) for x in sparse_shape]
    if len(s) != 3:
        return None
    order = _order_of_axis(_odd_axis(s))
    if order is None and len(set(s)) == 3:
        small = min(range(3), key=lambda i: s[i])
        if all(2 * s[small] <= s[j] for j in range(3) if j != small):
            order = _order_of_axis(small)
    return order


def _triple(v: Any, n: int = 3) -> Optional[Tuple[int, ...]]:
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) if len(v) == n else None
    return (int(v), ) * n


def live_order(encoder: nn.Module) -> Tuple[Optional[str], List[str]]:
    """The axis order of a live sparse encoder, with the facts that decided it.

    Args:
        encoder (nn.Module): The encoder (a module with ``sparse_shape``, or
            any module holding 3-D sparse convs).

    Returns:
        tuple: ``('zyx' | 'xyz' | None, reasons)``; None when there is no
        evidence or the evidence disagrees.
    """
    votes: Dict[str, List[str]] = {}
    shape = getattr(encoder, 'sparse_shape', None)
    if shape is not None:
        order = shape_order(shape)
        if order:
            votes.setdefault(order, []).append(f'sparse_shape {list(shape)}')
    for name, m in encoder.named_modules():
        if getattr(m, 'ndim', None) != 3 or not hasattr(m, 'kernel_size'):
            continue
        for attr in ('kernel_size', 'stride', 'padding'):
            v = _triple(getattr(m, attr, 1))
            order = _order_of_axis(_odd_axis(v)) if v else None
            if order:
                votes.setdefault(order, []).append(f'{name} {attr} {v}')
    if len(votes) == 1:
        order = next(iter(votes))
        return order, votes[order]
    return None, [f'{o}: {", ".join(r[:2])}' for o, r in votes.items()]


def encoder_of(model: Optional[nn.Module], module_name: str,
               memo: Optional[Dict[str, Optional[bool]]] = None) -> str:
    """The encoder a sparse conv belongs to: its nearest ancestor with a
    ``sparse_shape``, else the model's top-level child holding it.

    Args:
        model (nn.Module, optional): The live model.
        module_name (str): The sparse conv's name in ``model``.
        memo (dict, optional): Module name -> whether it has a ``sparse_shape``
            (None: no such module), filled and read by the calls sharing it.
    """
    parts = module_name.split('.') if module_name else []
    if model is not None:
        for i in range(len(parts) - 1, -1, -1):
            name = '.'.join(parts[:i])
            if memo is not None and name in memo:
                has = memo[name]
            else:
                try:
                    has = hasattr(model.get_submodule(name), 'sparse_shape')
                except AttributeError:
                    has = None
                if memo is not None:
                    memo[name] = has
            if has is None:
                break
            if has:
                return name
    return parts[0] if len(parts) > 1 else ''


def _reverse(order: str) -> str:
    return XYZ if order == ZYX else ZYX


def decide_axis_order(ctx: Any, enc: str, members: List[Any], revs: Dict[str, set],
                      option: str) -> Tuple[bool, Orders, Optional[str]]:
    """Whether the checkpoint's kernels of encoder ``enc`` have reversed spatial axes.

    Args:
        ctx: The source context (filename, model, meta).
        enc (str): Encoder name in the model.
        members (list): The encoder's mapped sparse kernels.
        revs (dict): Model key -> the set of ``reversed`` values under which the
            kernel's shape fits its live module (in the file's layout).
        option (str): The source's ``spatial_order`` (``'auto'``, ``'zyx'``, ``'xyz'``).

    Returns:
        tuple: ``(reversed, (checkpoint order, model order), problem or None)``.
    """
    fname, label = ctx.filename, enc or 'the model'
    live: Optional[str] = None
    reasons: List[str] = []
    if ctx.model is not None:
        try:
            live, reasons = live_order(ctx.model.get_submodule(enc) if enc else ctx.model)
        except AttributeError:
            live = None
    proof: Dict[bool, str] = {}
    for m in members:
        r = revs.get(m.key) or set()
        if len(r) == 1:
            rev = next(iter(r))
            proof.setdefault(rev, f'{m.file_key} {list(m.shape)}')
    if len(proof) == 2:
        return False, (None, live), (
            f'{fname}: the spatial axis order of {label} cannot be decided: '
            f'{proof[False]} fits the model with its axes as they are, {proof[True]} only '
            "with them reversed; set spatial_order='zyx' or 'xyz' on this source")
    declared = declared_order(ctx, [m.file_key for m in members])
    if declared is not None and proof:
        rev = next(iter(proof))
        if live is not None and (declared[0] != live) != rev:
            return rev, (declared[0], live), (
                f'{fname}: the axis order of {label} cannot be decided: the file says '
                f'{declared[0]} ({declared[1]}) and the model\'s {label} is {live}, but '
                f'{proof[rev]} fits only with the axes {"reversed" if rev else "as they are"}; '
                "set spatial_order='zyx' or 'xyz' on this source")
    if option in ORDERS:
        if live is None:
            if proof:
                rev = next(iter(proof))
                return rev, (option, _reverse(option) if rev else option), None
            return False, (option, None), (
                f'{fname}: spatial_order={option!r}, but the axis order of the model\'s '
                f'{label} cannot be decided (no sparse_shape, kernel size, stride or padding '
                f'that tells z; {"; ".join(reasons) or "no evidence"})')
        rev = option != live
        if proof and rev not in proof:
            return rev, (option, live), (
                f'{fname}: spatial_order={option!r} and the model\'s {label} is {live} '
                f'({", ".join(reasons[:2])}), but {proof[not rev]} fits only with the axes '
                f'{"reversed" if not rev else "as they are"}')
        return rev, (option, live), None
    if proof:
        rev = next(iter(proof))
        src = (_reverse(live) if rev else live) if live else None
        return rev, (src, live), None
    src = declared[0] if declared is not None else _meta_order(ctx)
    if src is not None and live is not None:
        return src != live, (src, live), None
    return False, (src or live, live), None


def _meta_order(ctx: Any) -> Optional[str]:
    """The order of the checkpoint's config, when its ``meta`` carries one
    (MMEngine's Runner saves the config text as ``meta['cfg']``)."""
    import re
    cfg = (getattr(ctx, 'meta', None) or {}).get('cfg')
    if not isinstance(cfg, str):
        return None
    found = {shape_order([int(x) for x in m.groups()]) for m in re.finditer(
        r'sparse_shape\s*=\s*[\[(]\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*[\])]', cfg)}
    found.discard(None)
    return next(iter(found)) if len(found) == 1 else None


def declared_order(ctx: Any, file_keys: Sequence[str]) -> Optional[Tuple[str, str]]:
    """The order the source's preset read from the file for these (converted)
    checkpoint keys: ``(order, evidence)``, or None when it says nothing or
    the keys' prefixes disagree."""
    found = set()
    for key in file_keys:
        for prefix, fact in (getattr(ctx, 'orders', None) or {}).items():
            if key.startswith(prefix):
                found.add(tuple(fact))
    return next(iter(found)) if len({f[0] for f in found}) == 1 else None


def _is_pillar_scatter(m: nn.Module) -> bool:
    """MMDetection3D 1.4.0's ``PointPillarsScatter`` writes pillar ``(b, z, y, x)``
    coordinates to ``y * nx + x`` and views the canvas as ``(C, ny, nx)``: a
    ``(y, x)`` BEV map, the map of a z-y-x encoder."""
    cls = type(m)
    return cls.__name__ == 'PointPillarsScatter' and cls.__module__.startswith('mmdet3d.')


def model_order(model: Optional[nn.Module]) -> Tuple[Optional[str], List[str]]:
    """The axis order of the model's sparse encoders (every module with a
    ``sparse_shape``, and MMDetection3D's pillar scatter), which is also the
    order of the BEV map they produce: z-y-x encoders give ``(y, x)`` maps,
    x-y-z ones ``(x, y)``.

    Returns:
        tuple: ``(order or None, reasons)``; None when the model has no such
        encoder, an encoder's order cannot be decided, or two encoders disagree.
    """
    if model is None:
        return None, ['no model']
    found: Dict[str, List[str]] = {}
    for name, m in model.named_modules():
        if _is_pillar_scatter(m):
            found.setdefault(ZYX, []).append(f'{name} (PointPillarsScatter: (y, x) canvas)')
            continue
        if getattr(m, 'sparse_shape', None) is None:
            continue
        order, reasons = live_order(m)
        if order is None:
            return None, [f'{name or "the model"}: {"; ".join(reasons) or "no evidence"}']
        found.setdefault(order, []).append(f'{name or "the model"} ({", ".join(reasons[:2])})')
    if len(found) == 1:
        order = next(iter(found))
        return order, found[order]
    if not found:
        return None, ['no sparse encoder (a module with a sparse_shape) or pillar scatter '
                      'in the model']
    return None, [f'{o}: {", ".join(r)}' for o, r in found.items()]
