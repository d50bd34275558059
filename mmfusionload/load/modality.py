"""Modality presets and the resolution of a source's target submodules."""
from typing import Iterable, List, Optional, Sequence, Union

import torch.nn as nn

from ..errors import FusionLoadError
from ..registry import MODALITIES


def register_modality(name: str, modules: Sequence[str], force: bool = False) -> None:
    """Register a modality preset: a name for a group of top-level submodules.

    Args:
        name (str): Preset name used as ``modality=`` in a source.
        modules (Sequence[str]): Submodule names (dotted paths allowed); the
            preset takes those the model has.
        force (bool): Replace an existing preset of that name.
    """
    names = tuple(modules)

    def preset() -> tuple:
        return names

    preset.__name__ = f'modality_{name}'
    MODALITIES.register_module(name=name, module=preset, force=force)


register_modality('camera', ('img_backbone', 'img_neck', 'view_transform'))
register_modality('lidar', ('pts_voxel_encoder', 'pts_middle_encoder',
                            'pts_backbone', 'pts_neck'))
register_modality('fusion', ('fusion_layer', ))
register_modality('head', ('bbox_head', 'pts_bbox_head'))


def modality_modules(name: str) -> tuple:
    """Submodule names of a registered modality preset."""
    # MMEngine 0.10.7 ``Registry.get``: a key without a scope that the registry itself
    # holds is that entry (its lazy import is a no-op here: no import locations, and the
    # scope names no OpenMMLab package); ``get`` itself costs a debug log record.
    preset = MODALITIES.module_dict.get(name) if isinstance(name, str) and '.' not in name \
        else None
    if preset is None:
        preset = MODALITIES.get(name)
    if preset is None:
        raise FusionLoadError(
            [f'unknown modality {name!r}; registered: '
             f'{", ".join(sorted(MODALITIES.module_dict))}'], 'bad source')
    return tuple(preset())


def has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _children(model: nn.Module) -> str:
    return ', '.join(n for n, _ in model.named_children()) or '(none)'


def resolve_targets(model: nn.Module,
                    modality: Union[None, str, Iterable[str]] = None,
                    modules: Optional[Iterable[str]] = None) -> List[str]:
    """Submodule names a source loads into.

    Args:
        model (nn.Module): The (unwrapped) model.
        modality (str | list[str], optional): Preset name(s); their union.
        modules (list[str], optional): Explicit submodule names.

    Returns:
        list[str]: Target names in model order; ``['']`` for the whole model
        when neither ``modality`` nor ``modules`` is given.
    """
    if modality is None and modules is None:
        return ['']
    wanted: List[str] = []
    problems = []
    if modality is not None:
        for name in [modality] if isinstance(modality, str) else list(modality):
            present = [m for m in modality_modules(name) if has_submodule(model, m)]
            if not present:
                problems.append(
                    f'modality {name!r} ({", ".join(modality_modules(name))}) '
                    f'matches no submodule of {type(model).__name__}; its '
                    f'children are: {_children(model)}')
            wanted += present
    for name in list(modules or []):
        if not has_submodule(model, name):
            problems.append(f'{type(model).__name__} has no submodule {name!r}; '
                            f'its children are: {_children(model)}')
        wanted.append(name)
    if problems:
        raise FusionLoadError(problems, 'bad source')
    out: List[str] = []
    for name in wanted:
        if name not in out:
            out.append(name)
    return out
