"""2-D layers behind a sparse encoder: their BEV map is transposed when the orders differ.

A z-y-x encoder (MMDetection3D's ``SparseEncoder``, OpenPCDet) flattens its
output to a ``(C * D, Y, X)`` map, an x-y-z one (BEVFusion's) to ``(C * D, X,
Y)``, the same channels in the same order (see :mod:`mmfusionload.sparse.axis_order`).
A ``Conv2d`` / ``ConvTranspose2d`` whose stride, padding, dilation (and output
padding) are the same along both axes computes, on the transposed map with its
kernel's two spatial axes swapped, the transpose of what it computed before;
per-channel layers (norms, biases) do not see the orientation. So the dense
convs a preset declares to read a BEV map of the other order are loaded with
``weight.transpose(-1, -2)``; one whose geometry differs along the axes cannot be
and is an error, and so is a model whose BEV order cannot be decided.
"""
from typing import Optional

import torch
import torch.nn as nn

from ...sparse.axis_order import declared_order, model_order, source_order_option
from ...registry import REPAIRS
from ...sparse.layouts import ORDERS
from .base import Entry, Repair, RepairProblem

DENSE_2D = (nn.Conv2d, nn.ConvTranspose2d)


def _same_on_both_axes(module: nn.Module) -> Optional[str]:
    """None when ``module`` computes the transposed function on a transposed map
    with its kernel transposed; else what differs between the axes."""
    for attr in ('stride', 'padding', 'dilation', 'output_padding'):
        v = getattr(module, attr, None)
        if v is None:
            continue
        if isinstance(v, str) or (isinstance(v, (tuple, list)) and len(set(v)) != 1):
            return f'{attr} {v}'
    return None


def transpose_bev_kernel(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (transposed) conv kernel for the transposed BEV map."""
    return t.transpose(-1, -2).contiguous()


@REPAIRS.register_module()
class BevOrder(Repair):
    """Transpose the 2-D kernels a preset declares to read a BEV map of the other order."""
    name = 'bev_transpose'
    priority = 12

    def __call__(self, entry: Entry) -> None:
        ctx = entry.context
        if (ctx is None or not ctx.orders or not isinstance(entry.module, DENSE_2D)
                or entry.param_name != 'weight' or entry.source.dim() != 4):
            return
        declared = declared_order(ctx, [entry.file_key])
        if declared is None:
            return
        option = source_order_option(entry.options)
        src, why = (option, f'spatial_order={option!r}') if option in ORDERS else declared
        live, reasons = model_order(ctx.model)
        where = f'{entry.filename}: {entry.file_key} -> {entry.key}'
        if live is None:
            raise RepairProblem(
                f'{where}: this 2-D layer reads the BEV map of a {src} encoder ({why}), but '
                f"the BEV orientation of the model cannot be decided ({'; '.join(reasons)}); "
                'a BEV map that is transposed computes another function: load it only into a '
                "model whose sparse encoder tells its axis order, or exclude it")
        if src == live:
            return
        odd = _same_on_both_axes(entry.module)
        if odd is not None:
            raise RepairProblem(
                f'{where}: the BEV map is transposed (the file\'s layers read a {src} '
                f'encoder\'s map, {why}; the model\'s encoder is {live}, '
                f'{", ".join(reasons[:1])}), and this {type(entry.module).__name__} has '
                f'{odd}: transposing its kernel does not give the same function; exclude it, '
                "or set spatial_order= on this source if the file's order is another")
        entry.facts['bev_transpose'] = (src, live)
        entry.add_step(self.name, transpose_bev_kernel,
                       shape=tuple(entry.shape[:-2]) + tuple(entry.shape[-2:][::-1]))
