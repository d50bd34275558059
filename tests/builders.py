"""Real models and checkpoints for the tests: MMDetection3D/MMDetection modules, BEVFusion names."""
import copy
import json
import os.path as osp
from typing import Dict

import torch
import torch.nn as nn

from mmfusionload.cli.demo import (SECOND_CFG, SECONDFPN_CFG, SPARSE_ENCODER, SWIN_T,  # noqa: F401
                               BEVFusionLike, ViewTransform, build, randomize, to_mmcv_layout)

DATA = osp.join(osp.dirname(__file__), 'data')


def manifest(name: str) -> dict:
    with open(osp.join(DATA, 'manifests', name + '.json')) as f:
        return json.load(f)


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], keys=None) -> None:
    keys = list(a) if keys is None else list(keys)
    for k in keys:
        assert torch.equal(a[k], b[k]), f'{k} differs'


def sparse_conv_names(model: nn.Module):
    from mmfusionload.load.repairs import module_layout
    return [n for n, m in model.named_modules() if module_layout(m) is not None]


def mmcv_sparse_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose spconv 2.x sparse convs are replaced by MMCV's own
    (same kernel, channels, stride, padding), which hold ``[*k, in, out]`` weights."""
    import mmcv.ops as ops
    import spconv.pytorch as spconv
    model = copy.deepcopy(model)
    kinds = {spconv.SubMConv3d: ops.SubMConv3d, spconv.SparseConv3d: ops.SparseConv3d,
             spconv.SubMConv2d: ops.SubMConv2d, spconv.SparseConv2d: ops.SparseConv2d}
    for name, m in list(model.named_modules()):
        for src, dst in kinds.items():
            if type(m) is src or (isinstance(m, src) and type(m).__mro__[1] is src):
                new = dst(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                          padding=m.padding, dilation=m.dilation, bias=m.bias is not None,
                          indice_key=m.indice_key)
                parent, _, attr = name.rpartition('.')
                setattr(model.get_submodule(parent) if parent else model, attr, new)
                break
    return model
