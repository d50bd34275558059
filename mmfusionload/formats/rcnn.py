"""MMDetection Mask R-CNN and Cascade (Mask) R-CNN files, e.g. MMDetection3D's nuImages
camera pretraining (``configs/nuimages/mask-rcnn_*_nuim.py``,
``cascade-mask-rcnn_*_nuim.py``): a camera backbone under ``backbone.``.

Names read from MMDetection 3.3.0 (``StandardRoIHead``, ``CascadeRoIHead``): ``backbone.*``,
``neck.*``, ``rpn_head.*``, and ``roi_head.bbox_head.*`` + ``roi_head.mask_head.*`` (Mask
R-CNN) or one ``roi_head.bbox_head.<stage>.*`` per cascade stage (Cascade R-CNN). The
class count (nuImages 10, COCO 80) is in ``fc_cls``'s shape, not in the names, so the
fingerprint names the detector, not the data set. ``modality='camera'`` with
``prefix='auto'`` loads the backbone into ``img_backbone``.
"""
from ..checkpoint.identify import Fingerprint, having, register_fingerprint
from .fcos3d import camera_backbone_note

MASK_RCNN_FINGERPRINT = register_fingerprint(
    Fingerprint('MMDetection Mask R-CNN', None, 'camera',
                having(r'^backbone\.', r'^rpn_head\.', r'^roi_head\.bbox_head\.(?!\d)',
                       r'^roi_head\.mask_head\.', all_of=True), notes=camera_backbone_note))

CASCADE_RCNN_FINGERPRINT = register_fingerprint(
    Fingerprint('MMDetection Cascade R-CNN', None, 'camera',
                having(r'^backbone\.', r'^rpn_head\.', r'^roi_head\.bbox_head\.\d+\.',
                       all_of=True), notes=camera_backbone_note))
