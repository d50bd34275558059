"""Foreign-format key presets on real modules: mit-han-lab BEVFusion, Microsoft Swin, Cream
EfficientViT; and derived tensors (frustum, index tables) regenerated instead of loaded."""
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from builders import (SECOND_CFG, SECONDFPN_CFG, SPARSE_ENCODER, SWIN_T, BEVFusionLike,
                      ViewTransform, build, manifest, randomize, snapshot, sparse_conv_names)
from mmfusionload import FusionLoadError, load_sources
from mmfusionload.load.presets import get_preset, rename_keys
from mmfusionload.load.repairs import convert_kernel

pytest.importorskip('spconv')


def save(obj, tmp_path, name):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def renamed(state, rules):
    """``state`` with every key rewritten by ``(regex, replacement)`` rules, in order."""
    out = OrderedDict()
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# ---------------------------------------------------------------- mit-bevfusion

# MMDetection3D -> mit-han-lab, the inverse of the preset (BEVFUSION.md's table read
# right to left): decoder-layer names first, while the head is still ``bbox_head.``.
MMDET3D_TO_MIT = [
    (r'^(bbox_head\.decoder\.\d+\.)self_attn\.attn\.', r'\1self_attn.'),
    (r'^(bbox_head\.decoder\.\d+\.)cross_attn\.attn\.', r'\1multihead_attn.'),
    (r'^(bbox_head\.decoder\.\d+\.)ffn\.layers\.0\.0\.', r'\1linear1.'),
    (r'^(bbox_head\.decoder\.\d+\.)ffn\.layers\.1\.', r'\1linear2.'),
    (r'^(bbox_head\.decoder\.\d+\.)norms\.0\.', r'\1norm1.'),
    (r'^(bbox_head\.decoder\.\d+\.)norms\.1\.', r'\1norm2.'),
    (r'^(bbox_head\.decoder\.\d+\.)norms\.2\.', r'\1norm3.'),
    (r'^img_backbone\.', 'encoders.camera.backbone.'),
    (r'^img_neck\.', 'encoders.camera.neck.'),
    (r'^view_transform\.', 'encoders.camera.vtransform.'),
    (r'^pts_middle_encoder\.', 'encoders.lidar.backbone.'),
    (r'^fusion_layer\.', 'fuser.'),
    (r'^pts_backbone\.', 'decoder.backbone.'),
    (r'^pts_neck\.', 'decoder.neck.'),
    (r'^bbox_head\.', 'heads.object.'),
]
DERIVED = ('view_transform.frustum', 'view_transform.dx', 'view_transform.bx',
           'view_transform.nx')


class ManifestStandIn(nn.Module):
    """Plain Parameters and buffers with exactly the names, shapes, dtypes and kinds the
    manifest lists for one submodule of MMDetection3D's BEVFusion. Stands in for the
    ``projects/BEVFusion`` modules that cannot be built without the MMDetection3D source
    tree and its CUDA extensions (``GeneralizedLSSFPN``, ``DepthLSSTransform``,
    ``ConvFuser``, ``TransFusionHead``); no forward."""

    def __init__(self, tensors):
        super().__init__()
        for t in tensors:
            *path, leaf = t['key'].split('.')
            mod = self
            for name in path:
                if name not in mod._modules:
                    mod.add_module(name, nn.Module())
                mod = mod._modules[name]
            value = torch.zeros(t['shape'], dtype=getattr(torch, t['dtype']))
            if t['kind'] == 'param':
                mod.register_parameter(
                    leaf, nn.Parameter(value, requires_grad=value.is_floating_point()))
            else:
                mod.register_buffer(leaf, value)


class BEVFusionKeysModel(nn.Module):
    """MMDetection3D BEVFusion's state-dict names and shapes (LiDAR+camera, spconv 2.x):
    the LiDAR branch and the Swin-T are the real modules, the rest manifest stand-ins."""

    STAND_INS = ('img_neck', 'view_transform', 'fusion_layer', 'bbox_head')

    def __init__(self, tensors):
        super().__init__()
        self.img_backbone = build(SWIN_T)
        self.pts_voxel_encoder = build(dict(type='HardSimpleVFE', num_features=5))
        self.pts_middle_encoder = build(SPARSE_ENCODER)
        self.pts_backbone = build(SECOND_CFG)
        self.pts_neck = build(SECONDFPN_CFG)
        for name in self.STAND_INS:
            n = len(name) + 1
            self.add_module(name, ManifestStandIn(
                [dict(t, key=t['key'][n:]) for t in tensors if t['key'].startswith(name + '.')]))


def random_state(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for t in tensors:
        dtype = getattr(torch, t['dtype'])
        if dtype.is_floating_point:
            out[t['key']] = torch.rand(t['shape'], generator=g, dtype=dtype) * 2 - 1
        else:
            out[t['key']] = torch.randint(0, 1000, t['shape'], generator=g, dtype=dtype)
    return out


def test_mit_bevfusion_inverse_names_are_the_original_ones():
    keys = [t['key'] for t in manifest('mmdet3d_bevfusion_lidar-cam_mmcv')['tensors']]
    original = list(renamed(OrderedDict.fromkeys(keys), MMDET3D_TO_MIT))
    assert all(k.startswith(('encoders.camera.', 'encoders.lidar.backbone.', 'fuser.',
                             'decoder.backbone.', 'decoder.neck.', 'heads.object.'))
               for k in original)
    for k in ('heads.object.decoder.0.self_attn.in_proj_weight',
              'heads.object.decoder.0.multihead_attn.out_proj.bias',
              'heads.object.decoder.0.linear1.weight', 'heads.object.decoder.0.linear2.bias',
              'heads.object.decoder.0.norm3.weight',
              'encoders.lidar.backbone.conv_input.0.weight',
              'encoders.camera.vtransform.frustum'):
        assert k in original, k
    assert not [k for k in original if k.startswith('heads.object.decoder.')
                and re.search(r'\.(attn\.attn|cross_attn|ffn\.layers|norms)\.', k)]
    # the preset maps them back one to one (and is idempotent on converted names)
    mapping = rename_keys(original, preset=get_preset('mit-bevfusion'))
    assert sorted(mapping) == sorted(keys)
    assert sorted(rename_keys(keys, preset=get_preset('mit-bevfusion'))) == sorted(keys)


def test_mit_bevfusion_full_model(tmp_path):
    """Every tensor of an original-named lidar+camera checkpoint (sparse kernels
    [*k, in, out]) lands bit for bit, the sparse kernels permuted to spconv 2.x."""
    mmcv_tensors = manifest('mmdet3d_bevfusion_lidar-cam_mmcv')['tensors']
    spconv2 = manifest('mmdet3d_bevfusion_lidar-cam_spconv2')
    model = BEVFusionKeysModel(spconv2['tensors']).eval()
    want = {t['key']: (t['shape'], t['dtype']) for t in spconv2['tensors']}
    assert {k: (list(v.shape), str(v.dtype)[6:])
            for k, v in model.state_dict().items()} == want
    assert len(want) == 582

    source = random_state(mmcv_tensors, seed=3)  # MMDetection3D names, MMCV layout
    with torch.no_grad():  # same image size and depth bins: derived tensors agree
        for k in DERIVED:
            model.get_parameter(k).copy_(source[k])
    before = snapshot(model)
    original = renamed(source, MMDET3D_TO_MIT)
    path = save({'state_dict': original, 'meta': {'epoch': 6}}, tmp_path, 'bevfusion-det.pth')

    report = load_sources(model, [dict(checkpoint=path, preset='mit-bevfusion')], logger=None)
    rep = report.sources[0]
    assert report.ok and rep.missing == [] and rep.unexpected == [] and rep.mismatched == []
    index = {k for k in source if k.endswith('relative_position_index')}
    assert len(index) == 12 and set(rep.regenerated) == index  # rebuilt, never loaded
    assert len(rep.loaded) == 582 - 12
    sparse = {n + '.weight' for n in sparse_conv_names(model)}
    assert len(sparse) == 21 and set(rep.adapted['spconv_layout']) == sparse
    got = model.state_dict()
    for key, value in source.items():
        if key in index:
            assert torch.equal(got[key], before[key]), key
            continue
        expected = convert_kernel(value, 'mmcv', 'spconv2') if key in sparse else value
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key


def test_mit_bevfusion_lidar_only_with_explicit_layout_wins(tmp_path):
    """The preset's 'mmcv' applies to 'auto' sources only; an explicit layout is checked."""
    src = randomize(BEVFusionLike(camera=False), seed=1)
    sd = src.state_dict()
    lidar = OrderedDict((k, v) for k, v in sd.items() if k.startswith('pts_'))
    path = save({'state_dict': renamed(lidar, MMDET3D_TO_MIT)}, tmp_path, 'lidar.pth')
    model = randomize(BEVFusionLike(camera=False), seed=2)
    # kernels saved in spconv 2.x layout: the preset's mmcv default must not apply
    load_sources(model, [dict(modality='lidar', checkpoint=path, preset='mit-bevfusion',
                              spconv_layout='spconv2')], logger=None)
    got = model.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in lidar)
    before = snapshot(model)
    with pytest.raises(FusionLoadError, match='mmcv layout'):
        load_sources(model, [dict(modality='lidar', checkpoint=path, preset='mit-bevfusion')],
                     logger=None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- swin-original

def _undo_reduction_order(x):
    """Inverse of swin_converter's ``correct_unfold_reduction_order``."""
    out_c, in_c = x.shape
    return x.reshape(out_c, in_c // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(out_c, in_c)


def _undo_norm_order(x):
    """Inverse of swin_converter's ``correct_unfold_norm_order``."""
    c = x.shape[0]
    return x.reshape(c // 4, 4).transpose(0, 1)[[0, 2, 1, 3], :].reshape(c)


def mmdet_swin_to_original(state):
    """An MMDetection Swin state dict in Microsoft's release format (inverse of
    ``swin_converter``): renames back, PatchMerging channels back in unfold order,
    without MMDetection's output norms ``norm0..3``."""
    out = OrderedDict()
    for k, v in state.items():
        if re.match(r'norm\d+\.', k):
            continue
        if k.startswith('stages.'):
            k = k.replace('stages', 'layers', 1)
            if '.attn.w_msa.' in k:
                k = k.replace('attn.w_msa.', 'attn.')
            elif '.ffn.layers.0.0.' in k:
                k = k.replace('ffn.layers.0.0.', 'mlp.fc1.')
            elif '.ffn.layers.1.' in k:
                k = k.replace('ffn.layers.1.', 'mlp.fc2.')
            elif '.downsample.reduction.' in k:
                v = _undo_reduction_order(v)
            elif '.downsample.norm.' in k:
                v = _undo_norm_order(v)
        elif k.startswith('patch_embed.projection.'):
            k = k.replace('projection', 'proj')
        out[k] = v
    return out


def swin_release(mmdet_state, seed=5):
    """What ``swin_tiny_patch4_window7_224.pth``'s ``model`` holds: the backbone in the
    original names plus its final ``norm``, the ``head`` and the shifted-window masks."""
    g = torch.Generator().manual_seed(seed)
    sd = mmdet_swin_to_original(mmdet_state)
    sd['norm.weight'], sd['norm.bias'] = torch.rand(768, generator=g), torch.rand(768, generator=g)
    for stage, side in ((0, 56), (1, 28), (2, 14)):
        sd[f'layers.{stage}.blocks.1.attn_mask'] = torch.zeros((side // 7)**2, 49, 49)
    sd['head.weight'] = torch.rand(1000, 768, generator=g)
    sd['head.bias'] = torch.rand(1000, generator=g)
    return sd


@pytest.fixture(scope='module')
def swin_source():
    return {k: v.clone() for k, v in randomize(build(SWIN_T), seed=1).state_dict().items()}


def test_swin_inverse_round_trips_through_mmdet_converter(swin_source):
    from mmdet.models.backbones.swin import swin_converter
    original = swin_release(swin_source)
    assert 'layers.1.downsample.reduction.weight' in original
    assert 'layers.0.blocks.0.mlp.fc1.weight' in original
    back = swin_converter(original)
    for k, v in swin_source.items():
        if not re.match(r'norm\d+\.', k):
            assert torch.equal(back['backbone.' + k], v), k


def test_swin_original_release(tmp_path, swin_source):
    path = save({'model': swin_release(swin_source)}, tmp_path, 'swin_tiny_patch4_window7_224.pth')
    model = randomize(BEVFusionLike(lidar=False), seed=2)
    before = snapshot(model)
    report = load_sources(model, [dict(modality='camera', checkpoint=path,
                                       preset='swin-original')], logger=None)
    rep = report.sources[0]
    new = [f'img_backbone.norm{i}.{p}' for i in (1, 2, 3) for p in ('bias', 'weight')]
    assert sorted(rep.new) == new and rep.missing == [] and rep.unexpected == []
    assert rep.kept == ['img_neck', 'view_transform'] and rep.container == 'model'
    assert sorted(rep.regenerated) == sorted(
        'img_backbone.' + k for k in swin_source if k.endswith('relative_position_index'))
    got = model.state_dict()
    for k, v in swin_source.items():
        key = 'img_backbone.' + k
        if re.match(r'norm\d+\.', k):
            assert torch.equal(got[key], before[key]), key  # new: kept
        else:
            assert torch.equal(got[key], v), key
    for k in got:
        if not k.startswith('img_backbone.'):
            assert torch.equal(got[k], before[k]), k


def test_swin_original_preset_is_harmless_on_mmdet_checkpoints(tmp_path, swin_source):
    sd = OrderedDict(('backbone.' + k, v) for k, v in swin_source.items())
    path = save({'state_dict': sd}, tmp_path, 'swin_det.pth')
    model = randomize(BEVFusionLike(lidar=False), seed=2)
    load_sources(model, [dict(modality='camera', checkpoint=path, preset='swin-original')],
                 logger=None)
    got = model.state_dict()
    assert all(torch.equal(got['img_backbone.' + k], v) for k, v in swin_source.items())


# ---------------------------------------------------------------- cream-efficientvit

class CameraOnly(nn.Module):

    def __init__(self, backbone):
        super().__init__()
        self.img_backbone = backbone


def _randomize_cream(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if 'running_var' in k else -0.5))
    return model


def test_cream_classification_release(tmp_path):
    from mmfusionload.models import EfficientViT
    from reference.cream_efficientvit import build as build_reference
    sd = _randomize_cream(build_reference('m0'), seed=1).state_dict()
    assert any(k.startswith('head.') for k in sd)
    path = save({'model': sd, 'epoch': 299, 'args': {'model': 'EfficientViT_M0'}},
                tmp_path, 'efficientvit_m0.pth')
    model = CameraOnly(EfficientViT('m0', img_size=224))
    report = load_sources(model, [dict(modality='camera', checkpoint=path,
                                       preset='cream-efficientvit')], logger=None)
    rep = report.sources[0]
    assert rep.unexpected == [] and rep.missing == [] and rep.ignored == 0
    assert rep.regenerated and all(k.endswith('attention_bias_idxs') for k in rep.regenerated)
    got = model.state_dict()
    backbone = [k for k in sd if not k.startswith('head.')]
    assert len(got) == len(backbone)
    for k in backbone:
        assert torch.equal(got['img_backbone.' + k], sd[k]), k


def test_cream_detection_checkpoint_and_window_resize(tmp_path):
    """A Cream detector file (backbone./neck./bbox_head.) loads its backbone only; a
    classification file into the 7x7-window detection backbone resizes stage-3 biases."""
    from mmfusionload.models import EfficientViT
    from reference.cream_efficientvit import build as build_reference
    det = _randomize_cream(EfficientViT('m0'), seed=4).state_dict()
    sd = OrderedDict(('backbone.' + k, v) for k, v in det.items())
    sd['neck.lateral_convs.0.conv.weight'] = torch.rand(8, 192, 1, 1)
    sd['bbox_head.cls.weight'] = torch.rand(3, 8)
    path = save({'state_dict': sd}, tmp_path, 'retinanet_efficientvit_m0.pth')
    model = CameraOnly(EfficientViT('m0'))
    rep = load_sources(model, [dict(modality='camera', checkpoint=path,
                                    preset='cream-efficientvit')], logger=None).sources[0]
    assert rep.unexpected == [] and rep.missing == []
    got = model.state_dict()
    assert all(torch.equal(got['img_backbone.' + k], v) for k, v in det.items())

    cls = _randomize_cream(build_reference('m0'), seed=1).state_dict()
    path = save({'model': cls}, tmp_path, 'efficientvit_m0_cls.pth')
    model = CameraOnly(EfficientViT('m0'))
    rep = load_sources(model, [dict(modality='camera', checkpoint=path,
                                    preset='cream-efficientvit')], logger=None).sources[0]
    resized = rep.adapted['resize']
    assert resized and all(k.startswith('img_backbone.blocks3.') for k in resized)
    assert all(tuple(cls[k[len('img_backbone.'):]].shape) == (4, 16)
               and tuple(model.state_dict()[k].shape) == (4, 49) for k in resized)


# ---------------------------------------------------------------- derived tensors

class CameraView(nn.Module):

    def __init__(self, **vt):
        super().__init__()
        self.view_transform = ViewTransform(**vt)


def _mit_camera_ckpt(tmp_path, src, name='vt.pth'):
    sd = OrderedDict(('encoders.camera.vtransform.' + k[len('view_transform.'):], v)
                     for k, v in src.state_dict().items())
    return save({'state_dict': sd}, tmp_path, name)


@pytest.mark.parametrize('other', [dict(image_size=(384, 1056)),
                                   dict(image_size=(384, 1056), feature_size=(48, 132))])
def test_view_transform_derived_regenerated(tmp_path, other):
    """A checkpoint trained at another image size: frustum is rebuilt, not loaded (also
    when its shape differs); dx/bx/nx agree and load; the learned convs load."""
    src = randomize(CameraView(**other), seed=1)
    path = _mit_camera_ckpt(tmp_path, src)
    model = randomize(CameraView(), seed=2)
    frustum = model.view_transform.frustum.detach().clone()
    rep = load_sources(model, [dict(modality='camera', checkpoint=path, preset='mit-bevfusion')],
                       logger=None).sources[0]
    assert rep.regenerated == ['view_transform.frustum'] and rep.mismatched == []
    assert torch.equal(model.view_transform.frustum, frustum)
    got, sd = model.state_dict(), src.state_dict()
    for k in sd:
        if k != 'view_transform.frustum':
            assert torch.equal(got[k], sd[k]), k


def test_view_transform_other_grid_regenerates_dx_bx(tmp_path):
    src = randomize(CameraView(), seed=1)
    with torch.no_grad():
        src.view_transform.dx.mul_(2)
        src.view_transform.bx.mul_(2)
    path = _mit_camera_ckpt(tmp_path, src)
    model = CameraView()
    rep = load_sources(model, [dict(modality='camera', checkpoint=path, preset='mit-bevfusion')],
                       logger=None).sources[0]
    assert sorted(rep.regenerated) == ['view_transform.bx', 'view_transform.dx']
    assert torch.equal(model.view_transform.dx, CameraView().view_transform.dx)
    assert 'view_transform.frustum' in rep.loaded and 'view_transform.nx' in rep.loaded
