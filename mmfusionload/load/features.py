"""Point features by name: the first layer reading raw point features, adapted column by column.

A LiDAR branch trained on 5 point features (x, y, z, intensity, time) used on a sensor
with 4, or the reverse: the first layer that reads the raw features gets, for each of
the model's features, the checkpoint's weights of the feature with that name; a feature
the model adds gets zero weights (the output does not depend on it), a feature the
model lacks is dropped (the output equals the checkpoint model's on points where that
feature is 0). Repeating filters (as for RGB images) would be wrong for point features.

Layers, registered in ``POINT_FEATURE_LAYERS`` by the owning module's class name (a
function ``module -> [(relative key, kind)]``; ``kind`` is ``'linear'`` for an
``[out, in]`` weight, ``'sparse'`` for a sparse-conv kernel). Facts read from
MMDetection3D 1.4.0:

- ``SparseEncoder`` (and BEVFusion's subclass): ``conv_input.0`` is the first sparse
  conv, fed the voxel features of ``HardSimpleVFE`` (the mean of the raw features).
- ``HardVFE`` (``vfe_layers.0.linear``), ``DynamicVFE`` (``vfe_layers.0.0``),
  ``PillarFeatureNet`` (``pfn_layers.0.linear``), ``DynamicPillarFeatureNet``
  (``pfn_layers.0.0``): bias-free linear layers whose inputs are the raw features,
  then the decorations (cluster offset 3, voxel-centre offset 3, distance 1, each
  when enabled, in that order), all computed from x, y, z only.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import FusionLoadError
from ..registry import POINT_FEATURE_LAYERS

FEATURE_PRESETS: Dict[str, Tuple[str, ...]] = {
    'nuscenes': ('x', 'y', 'z', 'intensity', 'time'),
    'kitti': ('x', 'y', 'z', 'intensity'),
    'waymo': ('x', 'y', 'z', 'intensity', 'elongation'),
}


def feature_names(value: Any) -> List[str]:
    """A preset name or a list of distinct feature names, as a list.

    Raises:
        ValueError: Unknown preset, not strings, or a name given twice.
    """
    if isinstance(value, str):
        if value not in FEATURE_PRESETS:
            raise ValueError(f'unknown preset {value!r}; presets: '
                             f'{", ".join(sorted(FEATURE_PRESETS))}, or a list of names')
        return list(FEATURE_PRESETS[value])
    if not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(v, str) for v in value):
        raise ValueError(f'expected a preset name or a list of feature names, got {value!r}')
    if len(set(value)) != len(value):
        raise ValueError(f'{list(value)} names a feature twice')
    return list(value)


def feature_pair(value: Any) -> Dict[str, List[str]]:
    """``dict(checkpoint=..., model=...)`` (or a pair) as two lists of feature names.

    Raises:
        ValueError: Another form, or a bad side.
    """
    if isinstance(value, dict):
        if set(value) != {'checkpoint', 'model'}:
            raise ValueError(f'expected dict(checkpoint=..., model=...), got {value!r}')
        pair = (value['checkpoint'], value['model'])
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError(f'expected dict(checkpoint=..., model=...), got {value!r}')
    return dict(checkpoint=feature_names(pair[0]), model=feature_names(pair[1]))


def _sparse_encoder(module: nn.Module) -> List[Tuple[str, str]]:
    return [('conv_input.0.weight', 'sparse')]


def _linear(rel: str) -> Callable[[nn.Module], List[Tuple[str, str]]]:
    return lambda module: [(rel, 'linear')]


POINT_FEATURE_LAYERS.register_module(name='SparseEncoder', module=_sparse_encoder)
POINT_FEATURE_LAYERS.register_module(name='HardVFE', module=_linear('vfe_layers.0.linear.weight'))
POINT_FEATURE_LAYERS.register_module(name='DynamicVFE', module=_linear('vfe_layers.0.0.weight'))
POINT_FEATURE_LAYERS.register_module(name='PillarFeatureNet',
                                     module=_linear('pfn_layers.0.linear.weight'))
POINT_FEATURE_LAYERS.register_module(name='DynamicPillarFeatureNet',
                                     module=_linear('pfn_layers.0.0.weight'))


def layers_of(module: nn.Module) -> Optional[Callable[[nn.Module], List[Tuple[str, str]]]]:
    """The registered first-layer function of ``module``'s class or nearest base class."""
    for cls in type(module).__mro__:
        fn = POINT_FEATURE_LAYERS.module_dict.get(cls.__name__)
        if fn is not None:
            return fn
    return None


def adapt_columns(t: torch.Tensor, dim: int, src: Sequence[str], dst: Sequence[str]
                  ) -> torch.Tensor:
    """``t`` with its raw-feature inputs along ``dim`` rearranged from ``src`` to ``dst`` by name.

    The inputs after the raw features (decorations) follow unchanged; a feature only
    ``dst`` names gets zeros.
    """
    dim = dim % t.dim()
    parts = []
    for name in dst:
        if name in src:
            parts.append(t.narrow(dim, list(src).index(name), 1))
        else:
            parts.append(torch.zeros_like(t.narrow(dim, 0, 1)))
    rest = t.shape[dim] - len(src)
    if rest:
        parts.append(t.narrow(dim, len(src), rest))
    return torch.cat(parts, dim).contiguous()


@dataclass
class FeatureStep:
    """One adapted tensor: the input dimension in the checkpoint's layout and the shape after."""
    dim: int
    shape: Tuple[int, ...]
    src: List[str]
    dst: List[str]

    #: ``verify`` proves the adapted kernel against the checkpoint's with the same
    #: columns taken (:data:`~mmfusionload.sparse.verify.CHANGES_FUNCTION`).
    changes_function_on_purpose = True

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return adapt_columns(t, self.dim, self.src, self.dst)


def describe(src: Sequence[str], dst: Sequence[str]) -> str:
    """What the adapted layer computes, in words."""
    added = [f for f in dst if f not in src]
    dropped = [f for f in src if f not in dst]
    parts = [f'checkpoint ({", ".join(src)}) -> model ({", ".join(dst)})']
    if added:
        parts.append(f'added {", ".join(added)}: zero weights, the output does not depend '
                     'on ' + ('it' if len(added) == 1 else 'them'))
    if dropped:
        parts.append(f'dropped {", ".join(dropped)}: equal on points whose '
                     + ' and '.join(dropped) + ' ' + ('is' if len(dropped) == 1 else 'are')
                     + ' 0')
    if not added and not dropped and list(src) != list(dst):
        parts.append('reordered')
    return '; '.join(parts)


def _sparse_dim(key: str, shape: Tuple[int, ...], module: nn.Module, n_src: int,
                layout: str, filename: str) -> int:
    """The input-channel dimension of a stored sparse kernel: -1 in spconv 2.x's
    ``[out, *k, in]``, -2 in MMCV's ``[*k, in, out]`` (``sparse/layouts``)."""
    out = int(getattr(module, 'out_channels', -1))
    fits = []
    if shape[0] == out and shape[-1] == n_src:
        fits.append(('spconv2', -1))
    if shape[-1] == out and shape[-2] == n_src:
        fits.append(('mmcv', -2))
    if layout in ('spconv2', 'mmcv'):
        fits = [f for f in fits if f[0] == layout]
    if len(fits) == 1:
        return fits[0][1]
    raise FusionLoadError(
        [f'{filename}: {key}: checkpoint kernel {list(shape)} with {n_src} input features and '
         f'{out} outputs fits ' + ('both the spconv2 and the mmcv layout; set spconv_layout'
                                   if fits else 'neither the spconv2 [out, *k, in] nor the '
                                   'mmcv [*k, in, out] layout')], 'bad point features')


def plan_features(model: nn.Module, spec, mapping: Dict[str, str],
                  shapes: Dict[str, Tuple[int, ...]], targeted: Dict[str, torch.Tensor],
                  under: Callable[[str], bool], filename: str
                  ) -> Tuple[Dict[str, FeatureStep], List[str]]:
    """Plan the first point-feature layer of every registered module under the targets.

    Returns:
        tuple: Model key -> :class:`FeatureStep`, and one report line per layer.

    Raises:
        FusionLoadError: Nothing to adapt, or a layer whose sizes do not fit the names.
    """
    if spec.point_features is None:
        return {}, []
    src, dst = spec.point_features['checkpoint'], spec.point_features['model']
    steps: Dict[str, FeatureStep] = {}
    lines: List[str] = []
    problems: List[str] = []
    for name, module in model.named_modules():
        fn = layers_of(module) if name and under(name) else None
        if fn is None:
            continue
        for rel, kind in fn(module):
            key = f'{name}.{rel}'
            if key not in mapping or key not in targeted:
                continue
            shape, live = tuple(shapes[mapping[key]]), tuple(targeted[key].shape)
            owner = model.get_submodule(key.rpartition('.')[0])
            try:
                if kind == 'sparse':
                    dim = _sparse_dim(key, shape, owner, len(src), spec.spconv_layout,
                                      filename)
                    extra_src = extra_dst = 0
                else:
                    dim = 1
                    extra_src, extra_dst = shape[1] - len(src), live[1] - len(dst)
                    if extra_src < 0 or extra_src != extra_dst:
                        raise FusionLoadError(
                            [f'{filename}: {key}: checkpoint {list(shape)}, model {list(live)}: '
                             f'{len(src)} checkpoint and {len(dst)} model features do not '
                             'leave the same decorations on both sides'], 'bad point features')
            except FusionLoadError as e:
                problems += e.problems
                continue
            new_shape = list(shape)
            new_shape[dim] = len(dst) + extra_src
            steps[key] = FeatureStep(dim, tuple(new_shape), list(src), list(dst))
            lines.append(f'{key}: {describe(src, dst)}')
    if problems:
        raise FusionLoadError(problems, 'bad point features')
    if not steps:
        raise FusionLoadError(
            [f'{filename}: point_features given, but no first point-feature layer '
             f'({", ".join(sorted(POINT_FEATURE_LAYERS.module_dict))}) under the targets '
             'gets a tensor from this checkpoint'], 'bad point features')
    return steps, lines
