"""Smoke tests proving the OpenMMLab 3-D stack is installed for real.

Nothing here is mocked: MMCV's compiled ops, MMDetection / MMDetection3D
registries and spconv 2.x are imported and run. The models are built with the
values of MMDetection3D's BEVFusion nuScenes configs and compared with the
state-dict manifest measured on the real BEVFusion model
(``tests/data/manifests``).
"""
from typing import Dict, Tuple

import pytest
import torch

import mmcv
import mmcv.ops
from mmfusionload.cli import demo
from mmfusionload.sparse.compat import patch_spconv_cpu_stream, spconv_available

MANIFEST = 'mmdet3d_bevfusion_lidar-cam_spconv2'

# BEVFusion nuScenes config values (projects/BEVFusion/configs), built here
# straight through the registries: MMDetection3D's own SparseEncoder and
# MMDetection's SwinTransformer.
SPARSE_ENCODER = dict(demo.SPARSE_ENCODER, type='SparseEncoder')
SECOND_CFG = demo.SECOND_CFG
SECONDFPN_CFG = demo.SECONDFPN_CFG
SWIN_T = dict(demo.SWIN_T, type='SwinTransformer')

# BEVFusion's own ``BEVFusionSparseEncoder`` works in (x, y, z) order, so its
# ``conv_out`` kernel is (1, 1, 3); MMDetection3D's ``SparseEncoder`` (z, y, x)
# has (3, 1, 1). Every other key and shape is the same.
ZYX_VS_XYZ = {'conv_out.0.weight': ([128, 3, 1, 1, 128], [128, 1, 1, 3, 128])}


def _mmdet3d_models():
    from mmdet3d.registry import MODELS
    from mmdet3d.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS


def _skip_unless_runs_on(device: torch.device) -> None:
    if device.type != 'cuda':
        return
    if mmcv.ops.get_compiling_cuda_version() == 'not available':
        pytest.skip('MMCV was built without CUDA ops')
    from spconv.cppconstants import CPU_ONLY_BUILD
    if CPU_ONLY_BUILD:
        pytest.skip('spconv is a CPU-only build')


# --- MMCV compiled ops ---
def test_mmcv_ops_are_compiled():
    import mmcv._ext as ext
    assert mmcv.__version__ == '2.1.0'
    assert hasattr(ext, 'hard_voxelize_forward')
    assert ext.__file__.endswith('.so')


def _random_cloud(n: int, generator: torch.Generator) -> torch.Tensor:
    # x, y, z spread a little beyond the range so some points are dropped,
    # plus intensity and time channels.
    xyz = torch.rand(n, 3, generator=generator) * torch.tensor(
        [7.0, 7.0, 4.6]) - torch.tensor([3.5, 3.5, 2.3])
    extra = torch.rand(n, 2, generator=generator)
    return torch.cat([xyz, extra], dim=1)


def test_hard_voxelization(device):
    _skip_unless_runs_on(device)
    voxel_size = [0.4, 0.4, 0.5]
    pc_range = [-3.2, -3.2, -2.0, 3.2, 3.2, 2.0]
    max_points = 4
    g = torch.Generator().manual_seed(0)
    points = _random_cloud(3000, g)
    voxelize = mmcv.ops.Voxelization(
        voxel_size=voxel_size,
        point_cloud_range=pc_range,
        max_num_points=max_points,
        max_voxels=20000)
    voxels, coors, num_points = voxelize(points.to(device))
    assert voxels.device.type == device.type
    voxels, coors, num_points = voxels.cpu(), coors.cpu(), num_points.cpu()
    m = voxels.shape[0]
    assert voxels.shape == (m, max_points, 5)
    assert coors.shape == (m, 3) and num_points.shape == (m, )
    assert ((num_points >= 1) & (num_points <= max_points)).all()

    # reference in float32, as MMCV computes it: grid index (x, y, z)
    vs, lo = torch.tensor(voxel_size), torch.tensor(pc_range[:3])
    grid = torch.round((torch.tensor(pc_range[3:]) - lo) / vs).long()
    idx = torch.floor((points[:, :3] - lo) / vs).long()
    inside = ((idx >= 0) & (idx < grid)).all(dim=1)
    ref: Dict[Tuple[int, int, int], list] = {}
    for i in torch.nonzero(inside).flatten().tolist():
        ref.setdefault(tuple(idx[i].flip(0).tolist()), []).append(i)  # zyx
    assert m == len(ref)  # max_voxels not reached: every voxel is returned

    for v in range(m):
        key = tuple(coors[v].tolist())  # (z, y, x)
        n = int(num_points[v])
        assert n == min(len(ref[key]), max_points)
        pts = voxels[v, :n]
        # every returned point lies inside its voxel's bounds
        low = lo + torch.tensor(key[::-1], dtype=torch.float32) * vs
        assert (pts[:, :3] >= low - 1e-5).all()
        assert (pts[:, :3] < low + vs + 1e-5).all()
        # they are the first points of that voxel, in input order
        torch.testing.assert_close(pts, points[ref[key][:n]])
        assert (voxels[v, n:] == 0).all()  # padding

    # max_voxels caps the count
    capped = mmcv.ops.Voxelization(
        voxel_size=voxel_size,
        point_cloud_range=pc_range,
        max_num_points=max_points,
        max_voxels=50)
    assert capped(points.to(device))[0].shape[0] == 50


# --- registries, BEVFusion config values, manifest ---
@pytest.mark.parametrize('prefix,cfg', [
    pytest.param('pts_middle_encoder.', SPARSE_ENCODER, id='SparseEncoder'),
    pytest.param('pts_backbone.', SECOND_CFG, id='SECOND'),
    pytest.param('pts_neck.', SECONDFPN_CFG, id='SECONDFPN'),
    pytest.param('img_backbone.', SWIN_T, id='SwinTransformer'),
])
def test_bevfusion_modules_match_manifest(prefix, cfg, manifest):
    from mmengine.registry import DefaultScope
    if cfg['type'] == 'SwinTransformer':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        scope = 'mmdet'
    else:
        MODELS, scope = _mmdet3d_models(), 'mmdet3d'
    with DefaultScope.overwrite_default_scope(scope):  # whatever scope an earlier Runner left
        model = MODELS.build(cfg)
    state = model.state_dict()
    expected = {
        e['key'][len(prefix):]: e
        for e in manifest(MANIFEST)['tensors'] if e['key'].startswith(prefix)
    }
    assert len(state) == len(expected)
    assert set(state) == set(expected)
    for key, tensor in state.items():
        shape, dtype = list(tensor.shape), str(tensor.dtype)[len('torch.'):]
        assert dtype == expected[key]['dtype'], key
        if prefix == 'pts_middle_encoder.' and key in ZYX_VS_XYZ:
            assert (shape, expected[key]['shape']) == ZYX_VS_XYZ[key]
        else:
            assert shape == expected[key]['shape'], key


def test_sparse_encoder_is_spconv2(manifest):
    assert spconv_available()
    from mmdet3d.models.layers.spconv import IS_SPCONV2_AVAILABLE
    assert IS_SPCONV2_AVAILABLE
    import spconv.pytorch as spconv
    encoder = _mmdet3d_models().build(SPARSE_ENCODER)
    assert isinstance(encoder.conv_input[0], spconv.SubMConv3d)
    state = encoder.state_dict()
    assert state['conv_input.0.weight'].shape == (16, 3, 3, 3, 5)
    sparse_modules = manifest(MANIFEST)['sparse_conv_modules']
    assert len(sparse_modules) == 21
    for name, version in sparse_modules.items():
        local = name[len('pts_middle_encoder.'):]
        assert version == 2
        assert state._metadata[local]['version'] == 2, local
        assert isinstance(
            encoder.get_submodule(local), spconv.conv.SparseConvolution)
    # BatchNorm also says version 2: only sparse-conv versions mean a layout
    assert state._metadata['conv_input.1']['version'] == 2


def test_manifest_layouts_are_permutations(manifest):
    spconv2 = manifest(MANIFEST)
    mmcv_layout = manifest('mmdet3d_bevfusion_lidar-cam_mmcv')
    assert spconv2['sparse_conv_layout'].startswith('spconv2')
    assert mmcv_layout['sparse_conv_layout'].startswith('mmcv')
    a = {e['key']: e['shape'] for e in spconv2['tensors']}
    b = {e['key']: e['shape'] for e in mmcv_layout['tensors']}
    assert set(a) == set(b)
    for key in a:
        module = key.rsplit('.', 1)[0]
        if module in spconv2['sparse_conv_modules']:
            out_c, kd, kh, kw, in_c = a[key]
            assert b[key] == [kd, kh, kw, in_c, out_c], key
        else:
            assert a[key] == b[key], key


# --- kernel layouts ---
def test_mmcv_and_spconv_kernel_layouts():
    import spconv.pytorch as spconv
    from mmcv.ops import SparseConv3d as MMCVSparseConv3d
    from mmcv.ops import SubMConv3d as MMCVSubMConv3d
    assert MMCVSubMConv3d(5, 16, 3).weight.shape == (3, 3, 3, 5, 16)
    assert MMCVSparseConv3d(16, 32, 3, stride=2).weight.shape == (3, 3, 3,
                                                                   16, 32)
    assert spconv.SubMConv3d(5, 16, 3).weight.shape == (16, 3, 3, 3, 5)
    assert spconv.SparseConv3d(16, 32, 3, stride=2).weight.shape == (32, 3, 3,
                                                                      3, 16)


# --- spconv 2.x SparseEncoder forward + backward ---
def test_sparse_encoder_forward_backward(device, one_thread):
    _skip_unless_runs_on(device)
    # True on a CPU-only machine; a no-op (False) when CUDA is present
    assert patch_spconv_cpu_stream() is not torch.cuda.is_available()
    torch.manual_seed(0)
    # a small grid in MMDetection3D's (z, y, x) order: 41 x 64 x 64 voxels
    cfg = dict(SPARSE_ENCODER, sparse_shape=[41, 64, 64])
    encoder = _mmdet3d_models().build(cfg).to(device).train()
    voxelize = mmcv.ops.Voxelization(
        voxel_size=[0.1, 0.1, 0.1],
        point_cloud_range=[-3.2, -3.2, -2.0, 3.2, 3.2, 2.1],
        max_num_points=10,
        max_voxels=20000)
    g = torch.Generator().manual_seed(1)
    feats, coors = [], []
    for b in range(2):
        voxels, coor, num = voxelize(_random_cloud(1500, g).to(device))
        # HardSimpleVFE: the mean of each voxel's points
        feats.append(voxels.sum(1) / num.type_as(voxels).unsqueeze(1))
        coors.append(torch.nn.functional.pad(coor, (1, 0), value=b))
    feats, coors = torch.cat(feats), torch.cat(coors)
    assert feats.shape[1] == 5 and coors.shape[1] == 4

    out = encoder(feats, coors, batch_size=2)
    # z: 41 -> 21 -> 11 -> 5 -> conv_out 2; with (1, 1, 0) padding in the
    # third stage, 64 x 64 becomes 8 x 7 (the 180 x 179 of nuScenes' grid)
    assert out.shape == (2, 256, 8, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()

    weights = {
        n: p
        for n, p in encoder.named_parameters() if p.dim() == 5
    }
    assert len(weights) == 21
    for name, w in weights.items():
        assert w.grad is not None, name
        assert torch.isfinite(w.grad).all(), name
    assert weights['conv_input.0.weight'].grad.abs().sum() > 0
    assert weights['conv_out.0.weight'].grad.abs().sum() > 0
