"""2-D detector files for the camera branch: detectron2 / DD3D, MMDetection3D FCOS3D,
MMDetection nuImages Mask / Cascade R-CNN. Each is named by ``identify`` and its backbone
loads into ``img_backbone`` with ``modality='camera'`` and no other option, judged by
function: the loaded ``img_backbone`` computes what the detector's backbone computed."""
import pytest
import torch
import torch.nn as nn

from mmfusionload import load_sources
from mmfusionload.checkpoint.identify import identify
from camera_modules import DD3D, VoVNet, backbone_cfg, build_detector, randomize_  # noqa


class Camera(nn.Module):
    """A fusion model's camera branch: ``img_backbone`` and an ``img_neck``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.img_backbone = backbone
        self.img_neck = nn.Conv2d(4, 4, 1)


def _same_outputs(a, b):
    a = a if isinstance(a, (tuple, list)) else [a]
    b = b if isinstance(b, (tuple, list)) else [b]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert x.abs().sum() > 0


def _load(model, path):
    report = load_sources(model, [dict(checkpoint=path, modality='camera')], logger=None)
    s = report.sources[0]
    assert not s.missing and not s.unexpected and not s.mismatched
    return s


def test_dd3d_vovnet_from_backbone_bottom_up(tmp_path, one_thread):
    src = randomize_(DD3D(), 1).eval()
    path = str(tmp_path / 'dd3d_v99.pth')
    torch.save(dict(model=src.state_dict(), iteration=1000), path)
    ident = identify(path)
    assert ident.format == 'detectron2 / DD3D' and ident.family == 'detectron2'
    assert 'backbone.bottom_up.' in ident.formats[0][1]
    assert ident.options == dict(checkpoint=path, modality='camera')
    assert any('not loaded: backbone.fpn_lateral3., backbone.fpn_output3., fcos2d_head., '
               'fcos3d_head., pixel_mean' in n for n in ident.notes)
    model = Camera(VoVNet()).eval()
    s = _load(model, path)
    assert s.prefix == 'backbone.bottom_up. -> img_backbone.'
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _same_outputs(model.img_backbone(x), src.backbone.bottom_up(x))


@pytest.mark.parametrize('name,fmt', [('fcos3d', 'MMDetection3D FCOS3D'),
                                      ('mask-rcnn', 'MMDetection Mask R-CNN'),
                                      ('cascade-mask-rcnn', 'MMDetection Cascade R-CNN')])
def test_detector_backbone_into_img_backbone(name, fmt, tmp_path, one_thread):
    from mmdet3d.registry import MODELS
    src = randomize_(build_detector(name), 2).eval()
    path = str(tmp_path / f'{name}.pth')
    torch.save(dict(state_dict=src.state_dict(), meta=dict(mmengine_version='0.10.7')), path)
    ident = identify(path)
    assert ident.format == fmt, ident.formats
    assert ident.options == dict(checkpoint=path, modality='camera')
    assert any(n.startswith("backbone.* loads into img_backbone with modality='camera'")
               and 'neck.' in n for n in ident.notes)
    model = Camera(MODELS.build(backbone_cfg('fcos3d' if name == 'fcos3d' else 'mask-rcnn')))
    model.eval()
    s = _load(model, path)
    assert s.prefix == 'backbone. -> img_backbone.'
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _same_outputs(model.img_backbone(x), src.backbone(x))


def test_a_detector_of_none_of_these_formats_stays_generic(tmp_path):
    keys = dict(**{'backbone.conv1.weight': torch.zeros(2, 3, 3, 3),
                   'neck.lateral_convs.0.conv.weight': torch.zeros(2, 2, 1, 1),
                   'bbox_head.conv_cls.weight': torch.zeros(2, 2, 1, 1)})
    torch.save(dict(state_dict=keys), tmp_path / 'x.pth')
    assert identify(str(tmp_path / 'x.pth')).format == 'MMDetection detector'
