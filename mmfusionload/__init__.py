"""mmfusionload: per-modality, layout-aware checkpoint loading for MMDetection3D.

Importing the package registers ``FusionLoadHook`` (MMEngine ``HOOKS``), the
``EfficientViT`` backbone (MMDetection ``MODELS``), the modality presets, the
key-mapping presets and the tensor repairs.
"""
from .errors import FusionLoadError
from . import models  # noqa: F401  (registers EfficientViT)
from . import formats  # noqa: F401
from .hooks import FusionLoadHook
from .load.load_from import repair_checkpoint
from .load.pipeline import load_sources, plan_source, read_source
from .load.modality import register_modality
from .load.presets import KeyPreset, register_preset
from .files.reader import install_checkpoint_loader, read_checkpoint
from .registry import KEY_PRESETS, MODALITIES, REPAIRS
from .report import LoadReport, SourceReport, compress_keys
from .load.repairs import Repair, register_derived
from .load.source import SourceSpec

__version__ = '0.1.0'

__all__ = [
    'FusionLoadError', 'FusionLoadHook', 'KEY_PRESETS', 'KeyPreset', 'LoadReport',
    'MODALITIES', 'REPAIRS', 'Repair', 'SourceReport', 'SourceSpec', 'compress_keys',
    'install_checkpoint_loader', 'load_sources', 'plan_source', 'read_checkpoint',
    'read_source', 'register_derived', 'register_modality', 'register_preset',
    'repair_checkpoint'
]
