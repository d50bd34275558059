"""MMDetection3D FCOS3D files (``FCOSMono3D``): a camera backbone under ``backbone.``.

Names read from MMDetection3D 1.4.0 (``configs/fcos3d/fcos3d_r101-caffe-dcn_fpn_head-gn_8xb2-
1x_nus-mono3d.py``, ``FCOSMono3DHead`` / ``AnchorFreeMono3DHead``): ``backbone.*`` (ResNet-101
with DCNv2 in stages 3 and 4: ``backbone.layer3.0.conv2.conv_offset.*``), ``neck.*`` (FPN)
and ``bbox_head.*`` with the mono-3D branches ``conv_centerness``, ``conv_dir_cls``,
``conv_attr`` and ``conv_reg_prevs``. The backbone's names are MMDetection's ``ResNet``'s,
so ``modality='camera'`` with ``prefix='auto'`` loads it into ``img_backbone``.
"""
from typing import List, Sequence

from ..checkpoint.identify import Fingerprint, having, register_fingerprint


def camera_backbone_note(keys: Sequence[str]) -> List[str]:
    """What ``identify`` says of a detector file whose backbone the camera branch takes."""
    rest = sorted({k.split('.', 1)[0] + '.' for k in keys if not k.startswith('backbone.')})
    dcn = any('.conv_offset.' in k for k in keys if k.startswith('backbone.'))
    return [f"backbone.* loads into img_backbone with modality='camera'"
            + (' (its DCN layers need dcn= and stage_with_dcn= in the img_backbone config)'
               if dcn else '') + f'; not loaded: {", ".join(rest) or "nothing else"}']


FCOS3D_FINGERPRINT = register_fingerprint(
    Fingerprint('MMDetection3D FCOS3D', None, 'camera',
                having(r'^backbone\.', r'^bbox_head\.conv_centerness\.',
                       r'^bbox_head\.conv_dir_cls\.', r'^bbox_head\.conv_reg_prevs\.',
                       all_of=True), notes=camera_backbone_note))
