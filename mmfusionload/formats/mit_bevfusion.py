"""The original mit-han-lab BEVFusion checkpoints -> MMDetection3D ``projects/BEVFusion``.

mit-han-lab's release keeps the model in ``encoders.{camera,lidar}``, ``fuser``,
``decoder.{backbone,neck}`` and ``heads.object``; its TransFusion decoder layers are
built from ``nn.MultiheadAttention``/``nn.Linear``/``nn.LayerNorm`` named like PyTorch's
``TransformerDecoderLayer``. Its sparse encoder is spconv 1.x code, so the kernels are
``[kD, kH, kW, in, out]`` (MMCV's layout); the spconv-layout repair permutes them when
the live model runs spconv 2.x. Its encoder's coordinates are ``(x, y, z)``, as in
MMDetection3D's ``BEVFusionSparseEncoder``.

The preset states its reverse (``MIT_BEVFUSION_REVERSE``) for ``convert --to-format
mit-bevfusion``, which writes the kernels in MMCV's layout.
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

# The reverse: MMDetection3D names -> mit-han-lab's (top-level modules first, then the
# decoder layers under ``heads.object.``); a key none of them matches has no place in
# mit-han-lab's model (``pts_voxel_encoder``, ``data_preprocessor``...) and is left out.
MIT_BEVFUSION_REVERSE = [
    (r'^img_backbone\.', 'encoders.camera.backbone.'),
    (r'^img_neck\.', 'encoders.camera.neck.'),
    (r'^view_transform\.', 'encoders.camera.vtransform.'),
    (r'^pts_middle_encoder\.', 'encoders.lidar.backbone.'),
    (r'^fusion_layer\.', 'fuser.'),
    (r'^pts_backbone\.', 'decoder.backbone.'),
    (r'^pts_neck\.', 'decoder.neck.'),
    (r'^bbox_head\.', 'heads.object.'),
    (_LAYER + r'self_attn\.attn\.', r'\1self_attn.'),
    (_LAYER + r'cross_attn\.attn\.', r'\1multihead_attn.'),
    (_LAYER + r'ffn\.layers\.0\.0\.', r'\1linear1.'),
    (_LAYER + r'ffn\.layers\.1\.', r'\1linear2.'),
    (_LAYER + r'norms\.0\.', r'\1norm1.'),
    (_LAYER + r'norms\.1\.', r'\1norm2.'),
    (_LAYER + r'norms\.2\.', r'\1norm3.'),
]

MIT_BEVFUSION = register_preset('mit-bevfusion',
                                KeyPreset(MIT_BEVFUSION_RULES, spconv_layout='mmcv',
                                          reverse_rules=MIT_BEVFUSION_REVERSE, order='xyz'))


MIT_BEVFUSION_FINGERPRINT = register_fingerprint(
    Fingerprint('mit-han-lab BEVFusion', 'mit-bevfusion', None,
                having(r'^encoders\.(lidar|camera)\.', r'^fuser\.', r'^decoder\.backbone\.',
                       r'^heads\.object\.', least=1)))
