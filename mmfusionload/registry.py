"""Registries of the loading machinery, extended by users like any MMEngine registry.

- ``MODALITIES``: modality presets, functions returning the top-level submodule names.
- ``KEY_PRESETS``: key-mapping presets (:class:`~mmfusionload.load.presets.KeyPreset`).
- ``REPAIRS``: tensor repairs run on every planned tensor, in ``priority`` order.
"""
from mmengine.registry import Registry

MODALITIES = Registry('fusionload modality')
KEY_PRESETS = Registry('fusionload key preset')
REPAIRS = Registry('fusionload repair')
