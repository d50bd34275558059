"""Microsoft's Swin Transformer release -> MMDetection's ``SwinTransformer``.

The renames and the PatchMerging channel reorder are MMDetection's own
``swin_converter`` (what ``convert_weights=True`` runs). On top of it the preset drops
what an MMDetection backbone has no place for: the classification ``head.*``, the final
``norm.*`` (MMDetection adds its own output norms ``norm0..3``, one per
``out_indices`` entry, which the original format lacks: they are declared new) and the
shifted-window ``attn_mask`` buffers (rebuilt by the model).
"""
import re
from collections import OrderedDict
from typing import Dict

import torch

from ..checkpoint.identify import Fingerprint, having, register_fingerprint, unprefixed
from ..load.presets import KeyPreset, register_preset

_ORIGINAL = re.compile(r'^(layers\.\d+\.|patch_embed\.proj\.)')
_DROP = re.compile(r'^(head\.|norm\.)|(^|\.)attn_mask$')


def swin_original_to_mmdet(state: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Convert a Swin state dict from Microsoft's names to MMDetection's.

    A dict that has no original-format key (``layers.N.``, ``patch_embed.proj.``) is
    returned unchanged, so the preset is harmless on an MMDetection checkpoint.

    Args:
        state (dict): Original-format tensors (``layers.N.blocks.M.attn.qkv.weight``...).

    Returns:
        OrderedDict: MMDetection names without a ``backbone.`` prefix
        (``stages.N.blocks.M.attn.w_msa.qkv.weight``...).
    """
    if not any(_ORIGINAL.match(k) for k in state):
        return OrderedDict(state)
    from mmdet.models.backbones.swin import swin_converter
    kept = OrderedDict((k, v) for k, v in state.items() if not _DROP.search(k))
    out = OrderedDict()
    for k, v in swin_converter(kept).items():
        out[k[len('backbone.'):] if k.startswith('backbone.') else k] = v
    return out


SWIN_ORIGINAL = register_preset(
    'swin-original',
    KeyPreset(new_keys=[r'(^|(^|\.)(img_)?backbone\.)norm\d+\.(weight|bias)$'],
              convert=swin_original_to_mmdet))


SWIN_ORIGINAL_FINGERPRINT = register_fingerprint(
    Fingerprint('Microsoft Swin', 'swin-original', 'camera',
                unprefixed(having(
                    r'^layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table',
                    r'^patch_embed\.proj\.weight', all_of=True))))
