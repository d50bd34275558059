"""The original mit-han-lab BEVFusion checkpoints -> MMDetection3D ``projects/BEVFusion``.

mit-han-lab's release keeps the model in ``encoders.{camera,lidar}``, ``fuser``,
``decoder.{backbone,neck}`` and ``heads.object``; its TransFusion decoder layers are
built from ``nn.MultiheadAttention``/``nn.Linear``/``nn.LayerNorm`` named like PyTorch's
``TransformerDecoderLayer``. Its sparse encoder is spconv 1.x code, so the kernels are
``[kD, kH, kW, in, out]`` (MMCV's layout); the spconv-layout repair permutes them when
the live model runs spconv 2.x.
"""
from ..checkpoint.identify import Fingerprint, having, register_fingerprint
from ..load.presets import KeyPreset, register_preset

# A decoder layer of the object head, before or after the top-level rename.
_LAYER = r'^((?:heads\.object|bbox_head)\.decoder\.\d+\.)'

MIT_BEVFUSION_RULES = [
    # TransFusion decoder layers (MMCV's attention / FFN wrappers in MMDetection3D);
    # the negative look-aheads keep the rules idempotent on converted keys.
    (_LAYER + r'self_attn\.(?!attn\.)', r'\1self_attn.attn.'),
    (_LAYER + r'multihead_attn\.', r'\1cross_attn.attn.'),
    (_LAYER + r'linear1\.', r'\1ffn.layers.0.0.'),
    (_LAYER + r'linear2\.', r'\1ffn.layers.1.'),
    (_LAYER + r'norm1\.', r'\1norms.0.'),
    (_LAYER + r'norm2\.', r'\1norms.1.'),
    (_LAYER + r'norm3\.', r'\1norms.2.'),
    # top-level modules
    (r'^encoders\.camera\.backbone\.', 'img_backbone.'),
    (r'^encoders\.camera\.neck\.', 'img_neck.'),
    (r'^encoders\.camera\.vtransform\.', 'view_transform.'),
    (r'^encoders\.lidar\.backbone\.', 'pts_middle_encoder.'),
    (r'^fuser\.', 'fusion_layer.'),
    (r'^decoder\.backbone\.', 'pts_backbone.'),
    (r'^decoder\.neck\.', 'pts_neck.'),
    (r'^heads\.object\.', 'bbox_head.'),
]

MIT_BEVFUSION = register_preset('mit-bevfusion',
                                KeyPreset(MIT_BEVFUSION_RULES, spconv_layout='mmcv'))


MIT_BEVFUSION_FINGERPRINT = register_fingerprint(
    Fingerprint('mit-han-lab BEVFusion', 'mit-bevfusion', None,
                having(r'^encoders\.(lidar|camera)\.', r'^fuser\.', r'^decoder\.backbone\.',
                       r'^heads\.object\.', least=1)))
