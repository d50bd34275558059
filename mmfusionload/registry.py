"""Registries of the loading machinery, extended by users like any MMEngine registry.

- ``MODALITIES``: modality presets, functions returning the top-level submodule names.
- ``KEY_PRESETS``: key-mapping presets (:class:`~mmfusionload.load.presets.KeyPreset`).
- ``REPAIRS``: tensor repairs run on every planned tensor, in ``priority`` order.
- ``HEAD_CLASS_RULES``: per head class (by class name), where its class-indexed
  tensors keep one row (or input column) per class
  (:mod:`mmfusionload.load.classes`).
- ``POINT_FEATURE_LAYERS``: per module class (by class name), its first layer reading
  raw point features (:mod:`mmfusionload.load.features`).
"""
from mmengine.registry import Registry

MODALITIES = Registry('fusionload modality')
KEY_PRESETS = Registry('fusionload key preset')
REPAIRS = Registry('fusionload repair')
HEAD_CLASS_RULES = Registry('fusionload head class rule')
POINT_FEATURE_LAYERS = Registry('fusionload point feature layer')
