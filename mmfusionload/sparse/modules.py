"""What a live sparse-conv module is: its library's kernel layout, kernel size, channels.

The layout a module holds its ``weight`` in is read from its class (spconv 2.x's and
MMCV's ``SparseConvolution`` subclasses); users may add a library to
:data:`SPARSE_CONV_CLASSES`.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .layouts import MMCV, SPCONV2, Geometry, convert, is_pointwise, stored_shape

__all__ = ['SPARSE_CONV_CLASSES', 'SPCONV_VOXEL_COUNT', 'module_layout', 'module_geometry',
           'module_pointwise',
           'kernel_shape', 'convert_kernel']

# (module prefix, base class name) -> layout its ``weight`` is held in.
SPARSE_CONV_CLASSES: Dict[Tuple[str, str], str] = {
    ('spconv.pytorch', 'SparseConvolution'): SPCONV2,
    ('mmcv.ops', 'SparseConvolution'): MMCV,
}

#: spconv >= 2.2 (read from 2.3.8, ``spconv/pytorch/conv.py`` and ``pool.py``): a
#: non-submanifold, non-inverse conv (and a max pool) built with ``record_voxel_count=True``
#: registers this ``int32 [1]`` buffer, the most output sites it has seen; spconv's own
#: load hook puts a zero in its place when a file lacks it. A statistic, not a weight:
#: a model may have it where the file does not, and the other way round.
SPCONV_VOXEL_COUNT = 'max_num_voxels_during_training'

# class (and the size of SPARSE_CONV_CLASSES, which may grow) -> layout, found once
_LAYOUT_OF_CLASS: Dict[Tuple[type, int], Optional[str]] = {}


def module_layout(module: nn.Module) -> Optional[str]:
    """The kernel layout of a sparse-conv module, from its class; None otherwise."""
    key = (type(module), len(SPARSE_CONV_CLASSES))
    if key not in _LAYOUT_OF_CLASS:
        _LAYOUT_OF_CLASS[key] = next(
            (layout for cls in key[0].__mro__
             for (prefix, name), layout in SPARSE_CONV_CLASSES.items()
             if cls.__name__ == name and cls.__module__.startswith(prefix)), None)
    return _LAYOUT_OF_CLASS[key]


def module_geometry(module: nn.Module) -> Geometry:
    """Kernel size and channels of a sparse-conv module."""
    k = module.kernel_size
    k = tuple(int(v) for v in k) if isinstance(k, (tuple, list)) else (int(k), ) * module.ndim
    cin, cout = module.in_channels, module.out_channels
    if getattr(module, 'groups', 1) not in (1, None):
        cin = cin // module.groups
    return Geometry(k, cin, cout)


def module_pointwise(module: nn.Module) -> bool:
    """Whether spconv 2.x would run ``module``'s config as a per-site ``mm``
    (:func:`~mmfusionload.sparse.layouts.is_pointwise`)."""
    g = module_geometry(module)
    stride = getattr(module, 'stride', 1)
    stride = tuple(stride) if isinstance(stride, (list, tuple)) else (int(stride), ) * g.ndim
    return is_pointwise(g.kernel, stride, bool(getattr(module, 'subm', False)))


def kernel_shape(module: nn.Module, layout: str) -> Tuple[int, ...]:
    """The weight shape ``module`` would have in ``layout``."""
    return stored_shape(module_geometry(module), layout)


def convert_kernel(t: torch.Tensor, src: str, dst: str,
                   pointwise: Optional[bool] = None) -> torch.Tensor:
    """A sparse-conv kernel stored in ``src`` as the ``dst`` kernel computing the same
    function (see :mod:`mmfusionload.sparse.layouts`); the result is contiguous.
    ``pointwise``: :func:`module_pointwise` of the module (None: kernel volume 1)."""
    return convert(t, src, dst, pointwise)
