"""Build what a Runner builds from a config, without running it: the config, the model."""
import os.path as osp
from typing import List, Optional

import torch.nn as nn

from ..errors import FusionLoadError

__all__ = ['load_config', 'build_model', 'config_classes']


def load_config(config: str, cfg_options: Optional[dict] = None):
    """Read a config file and merge ``--cfg-options`` into it."""
    from mmengine.config import Config
    if not osp.isfile(config):
        raise FusionLoadError([f'{config}: no such config file'], 'cannot read config')
    try:
        cfg = Config.fromfile(config, import_custom_modules=False)  # build_model imports them
    except SyntaxError as e:  # MMEngine's parser may not name the file
        raise FusionLoadError([f'{config}: line {e.lineno}: {e.msg}'],
                              'cannot read config') from e
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model(cfg, stand_ins: Optional[List[str]] = None) -> nn.Module:
    """Build ``cfg.model`` as MMEngine's Runner does (no ``init_weights``).

    Honours ``custom_imports``, initialises the default scope
    (``cfg.default_scope``, else ``'mmdet3d'``) and builds with MMEngine's root
    ``MODELS``, which resolves the type in the scope's registry.

    Args:
        cfg (Config): The config.
        stand_ins (list, optional): Structure-only build: when given, compiled
            extensions that ``custom_imports`` cannot import because they are
            not built are replaced by inert stand-ins
            (:mod:`mmfusionload.cli.standins`) and their names appended here.
            Without it such an import error is raised.
    """
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import import_modules_from_strings
    imports = cfg.get('custom_imports')
    if imports and stand_ins is not None:
        from .standins import import_with_stand_ins
        stand_ins += import_with_stand_ins(**imports)
    elif imports:
        import_modules_from_strings(**imports)
    if 'model' not in cfg:
        raise FusionLoadError(['the config has no "model"'], 'cannot build the model')
    init_default_scope(cfg.get('default_scope', 'mmdet3d'))
    model = MODELS.build(cfg.model)
    return model.eval()


def config_classes(cfg) -> Optional[List[str]]:
    """The model's class names as the run's dataset would give them: the train (else val,
    test) dataset's ``metainfo.classes`` (through dataset wrappers), else the config's
    ``class_names`` or ``metainfo.classes``; None when the config names none."""
    def names(value) -> Optional[List[str]]:
        if isinstance(value, (list, tuple)) and value and all(isinstance(c, str) for c in value):
            return list(value)
        return None

    for split in ('train', 'val', 'test'):
        dataset = (cfg.get(f'{split}_dataloader') or {}).get('dataset')
        while isinstance(dataset, dict):
            found = names((dataset.get('metainfo') or {}).get('classes'))
            if found:
                return found
            dataset = dataset.get('dataset')
    return names(cfg.get('class_names')) or names((cfg.get('metainfo') or {}).get('classes'))
