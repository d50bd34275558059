"""Microsoft Cream EfficientViT files -> :class:`mmfusionload.models.EfficientViT`.

Classification releases hold ``model`` with the backbone's names plus ``head.*``;
Cream's detection checkpoints hold ``state_dict`` with ``backbone.``-prefixed keys
next to ``neck.*`` and the detector heads. The preset keeps the backbone tensors under
the backbone's own names and drops the rest, so nothing is reported unexpected.
Stage-3 ``attention_biases`` of a classification checkpoint (``[h, 16]``) are resized
to the live window by the position-bias repair; ``attention_bias_idxs`` is rebuilt.
"""
from collections import OrderedDict
from typing import Dict

import torch

from ..checkpoint.identify import Fingerprint, having, register_fingerprint, unprefixed
from ..load.presets import KeyPreset, register_preset

BACKBONE = 'backbone.'


def cream_to_backbone(state: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Keep the backbone's tensors of a Cream checkpoint, without ``backbone.``.

    With ``backbone.``-prefixed keys present (a detector), only those are kept;
    otherwise (a classifier) everything but ``head.*`` is.
    """
    if any(k.startswith(BACKBONE) for k in state):
        return OrderedDict((k[len(BACKBONE):], v) for k, v in state.items()
                           if k.startswith(BACKBONE))
    return OrderedDict((k, v) for k, v in state.items() if not k.startswith('head.'))


CREAM_EFFICIENTVIT = register_preset('cream-efficientvit',
                                     KeyPreset(convert=cream_to_backbone))


CREAM_EFFICIENTVIT_FINGERPRINT = register_fingerprint(
    Fingerprint('Cream EfficientViT', 'cream-efficientvit', 'camera',
                unprefixed(having(r'^patch_embed\.0\.c\.weight',
                                  r'^blocks\d\.\d+\..*attention_biases', all_of=True))))
