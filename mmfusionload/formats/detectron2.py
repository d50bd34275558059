"""detectron2 / DD3D files: a camera backbone under ``backbone.bottom_up.``.

detectron2's ``DetectionCheckpointer`` (fvcore ``Checkpointer.save``) writes ``{'model':
state_dict, 'optimizer', 'scheduler', 'iteration'}``; released weights often keep
``model`` alone. Its detectors hold the feature extractor as ``backbone.bottom_up`` inside
the FPN ``backbone`` (``backbone.fpn_lateral*``, ``backbone.fpn_output*``), next to the
heads (DD3D: ``fcos2d_head``, ``fcos3d_head``). DD3D's VoVNet-99 keeps detectron2's module
names (``stem.stem_1/conv``, ``stage2.OSA2_1.layers.0.OSA2_1_0/conv``...), as do the VoVNet
ports used as ``img_backbone`` in camera detectors, so no rename is needed:
``prefix='auto'`` finds ``backbone.bottom_up.`` -> ``img_backbone.``
(:func:`~mmfusionload.load.prefix.nested_prefixes`) and the FPN and heads are not loaded.
"""
from typing import List, Sequence

from ..checkpoint.identify import Fingerprint, having, register_fingerprint

BOTTOM_UP = 'backbone.bottom_up.'


def _group(key: str) -> str:
    """``fcos2d_head.``, ``backbone.fpn_lateral3.``, ``pixel_mean``."""
    parts = key.split('.')
    n = 2 if parts[0] == 'backbone' and len(parts) > 2 else 1
    return '.'.join(parts[:n]) + ('.' if len(parts) > n else '')


def detectron2_note(keys: Sequence[str]) -> List[str]:
    """What ``identify`` says of a detectron2 file: which part loads where."""
    rest = sorted({_group(k) for k in keys if not k.startswith(BOTTOM_UP)})
    return [f"{BOTTOM_UP}* loads into img_backbone with modality='camera' (prefix='auto' finds "
            f'{BOTTOM_UP} -> img_backbone.); not loaded: {", ".join(rest) or "nothing else"}']


DETECTRON2_FINGERPRINT = register_fingerprint(
    Fingerprint('detectron2 / DD3D', None, 'camera', having(r'^backbone\.bottom_up\.'),
                notes=detectron2_note))
