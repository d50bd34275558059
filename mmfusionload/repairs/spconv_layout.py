"""spconv kernel layout: spconv 2.x ``[out, *k, in]`` vs MMCV/spconv 1.x ``[*k, in, out]``."""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..registry import REPAIRS
from .base import Entry, Repair, RepairProblem

SPCONV2 = 'spconv2'
MMCV = 'mmcv'
LAYOUTS = (SPCONV2, MMCV)

# ``_metadata`` version of a sparse-conv module saved in each layout: MMDetection3D's
# spconv 2.x override permutes a kernel whose version is below 2.
LAYOUT_VERSION = {SPCONV2: 2, MMCV: 1}


def layout_of_version(version: int) -> str:
    """The kernel layout a sparse-conv module's ``_metadata`` version stands for."""
    return SPCONV2 if version >= 2 else MMCV


# (module prefix, base class name) -> layout its ``weight`` is held in.
SPARSE_CONV_CLASSES: Dict[Tuple[str, str], str] = {
    ('spconv.pytorch', 'SparseConvolution'): SPCONV2,
    ('mmcv.ops', 'SparseConvolution'): MMCV,
}


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


def kernel_shape(module: nn.Module, layout: str) -> Tuple[int, ...]:
    """The weight shape ``module`` would have in ``layout``."""
    k = module.kernel_size
    k = tuple(k) if isinstance(k, (tuple, list)) else (k, ) * module.ndim
    cin, cout = module.in_channels, module.out_channels
    if getattr(module, 'groups', 1) not in (1, None):
        cin = cin // module.groups
    return (cout, *k, cin) if layout == SPCONV2 else (*k, cin, cout)


def convert_kernel(t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Permute a sparse-conv kernel between layouts; the result is contiguous."""
    if src == dst:
        return t
    # the same permutation as a 2-D transpose, several times faster than an N-D permute
    if src == SPCONV2:  # [out, k.., in] -> [k.., in, out]
        return t.reshape(t.shape[0], -1).t().contiguous().view(*t.shape[1:], t.shape[0])
    return t.reshape(-1, t.shape[-1]).t().contiguous().view(t.shape[-1], *t.shape[:-1])


def source_layout(module: nn.Module, shape: Tuple[int, ...], option: str,
                  file_version: Optional[int], where: str) -> str:
    """Decide the layout of a checkpoint kernel.

    In order: an explicit option, the checkpoint's ``_metadata`` version for the
    module (2 means spconv 2.x), then the shape given the module's kernel size
    and channels.

    Args:
        module (nn.Module): The live sparse-conv module.
        shape (tuple): The checkpoint tensor's shape.
        option (str): ``'auto'``, ``'spconv2'`` or ``'mmcv'``.
        file_version (int, optional): ``_metadata`` version, if recorded.
        where (str): File and key, for messages.

    Returns:
        str: ``'spconv2'`` or ``'mmcv'``.
    """
    fits = {lay: kernel_shape(module, lay) == tuple(shape) for lay in LAYOUTS}
    if option != 'auto':
        layout, why = option, f'spconv_layout={option!r}'
    elif file_version is not None:
        layout = layout_of_version(file_version)
        why = f'checkpoint _metadata version {file_version}'
    elif fits[SPCONV2] and fits[MMCV]:
        raise RepairProblem(
            f'{where}: shape {list(shape)} fits both the spconv2 [out,*k,in] and '
            'the mmcv [*k,in,out] kernel layout and the checkpoint has no '
            "_metadata; set spconv_layout='spconv2' or 'mmcv' on this source")
    elif fits[SPCONV2] or fits[MMCV]:
        return SPCONV2 if fits[SPCONV2] else MMCV
    else:
        raise RepairProblem(
            f'{where}: shape {list(shape)} is neither the spconv2 layout '
            f'{list(kernel_shape(module, SPCONV2))} nor the mmcv layout '
            f'{list(kernel_shape(module, MMCV))} of this module')
    if not fits[layout]:
        raise RepairProblem(
            f'{where}: {why} says {layout} layout, expected shape '
            f'{list(kernel_shape(module, layout))}, but the checkpoint has {list(shape)}')
    return layout


@REPAIRS.register_module()
class SpconvLayout(Repair):
    """Permute sparse-conv kernels into the live module's layout."""
    name = 'spconv_layout'
    priority = 10

    def __call__(self, entry: Entry) -> None:
        dst = module_layout(entry.module)
        if dst is None or entry.param_name != 'weight' or len(entry.shape) < 3:
            return
        where = f'{entry.filename}: {entry.file_key} -> {entry.key}'
        if tuple(entry.target.shape) != kernel_shape(entry.module, dst):
            raise RepairProblem(
                f'{where}: the live {type(entry.module).__name__} holds '
                f'{list(entry.target.shape)}, not its class layout {dst}')
        option = getattr(entry.options, 'spconv_layout', 'auto')
        src = source_layout(entry.module, entry.shape, option, entry.file_version, where)
        if src != dst:
            entry.add_step(self.name,
                           lambda t, s=src, d=dst: convert_kernel(t, s, d),
                           shape=entry.target.shape)
