"""Tests for :mod:`mmfusionload.sparse.compat` (spconv 2.x backward on CPU)."""
import sys
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from mmfusionload.sparse.compat import patch_spconv_cpu_stream, spconv_available

spconv = pytest.importorskip('spconv.pytorch')
cppcore = pytest.importorskip('spconv.pytorch.cppcore')
ops = pytest.importorskip('spconv.pytorch.ops')


def _spconv_modules_with_stream():
    return [
        module for name, module in list(sys.modules.items())
        if module is not None and (name == 'spconv' or name.startswith(
            'spconv.')) and hasattr(module, 'get_current_stream')
    ]


@pytest.fixture
def unpatched(monkeypatch) -> Callable[[], int]:
    """spconv as shipped for the test; the previous state comes back after.

    Returns:
        The original ``spconv.pytorch.cppcore.get_current_stream``.
    """
    current = cppcore.get_current_stream
    original = getattr(current, '__wrapped__', current)
    for module in _spconv_modules_with_stream():
        monkeypatch.setattr(module, 'get_current_stream', original)
    return original


def _subm_backward() -> None:
    conv = spconv.SubMConv3d(2, 3, 3, bias=False)
    indices = torch.tensor([[0, 1, 1, 1], [0, 1, 2, 1], [0, 2, 2, 2]],
                           dtype=torch.int32)
    features = torch.randn(3, 2, requires_grad=True)
    x = spconv.SparseConvTensor(features, indices, [4, 4, 4], 1)
    conv(x).features.sum().backward()


def test_spconv_available(monkeypatch):
    assert spconv_available()
    monkeypatch.setitem(sys.modules, 'spconv.pytorch', None)
    assert not spconv_available()


def test_patch_without_spconv_is_noop(unpatched, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setitem(sys.modules, 'spconv.pytorch.cppcore', None)
    assert patch_spconv_cpu_stream() is False
    assert ops.get_current_stream is unpatched


def test_patch_is_noop_when_cuda_is_available(unpatched, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert patch_spconv_cpu_stream() is False
    assert ops.get_current_stream is unpatched
    assert cppcore.get_current_stream is unpatched


@pytest.mark.skipif(
    torch.cuda.is_available(), reason='only a CUDA-less machine fails')
def test_backward_fails_on_cpu_without_patch(unpatched):
    # spconv asks torch.cuda.current_stream() in indice_conv_backward
    with pytest.raises((AssertionError, RuntimeError)):
        _subm_backward()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason='the patch applies without CUDA only')
def test_patch_rebinds_every_module(unpatched):
    assert ops.get_current_stream is unpatched  # from cppcore import ...
    assert patch_spconv_cpu_stream() is True
    patched = cppcore.get_current_stream
    assert patched is not unpatched
    assert patched.__wrapped__ is unpatched
    assert patched() == 0
    modules = _spconv_modules_with_stream()
    names = {m.__name__ for m in modules}
    assert {'spconv.pytorch.cppcore', 'spconv.pytorch.ops'} <= names
    assert all(m.get_current_stream is patched for m in modules)

    # idempotent: no second wrapper, same answer
    assert patch_spconv_cpu_stream() is True
    assert cppcore.get_current_stream is patched
    assert ops.get_current_stream is patched
    _subm_backward()


def test_patched_gradients_match_dense_conv3d(device, one_thread):
    """SubM conv on a fully active grid is a dense 'same' conv3d."""
    if device.type == 'cuda':
        from spconv.cppconstants import CPU_ONLY_BUILD
        if CPU_ONLY_BUILD:
            pytest.skip('spconv is a CPU-only build')
    assert patch_spconv_cpu_stream() is not torch.cuda.is_available()
    torch.manual_seed(0)
    batch, c_in, c_out, shape = 2, 3, 4, (4, 5, 6)  # (D, H, W)
    conv = spconv.SubMConv3d(c_in, c_out, 3, bias=True).to(device)
    assert conv.weight.shape == (c_out, 3, 3, 3, c_in)  # [out,kD,kH,kW,in]
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()

    dense_in = torch.randn(batch, c_in, *shape, device=device)
    # every voxel of the grid is active, in (b, z, y, x) order
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(n) for n in (batch, ) + shape],
                       indexing='ij'),
        dim=-1).reshape(-1, 4)
    indices = grid.int().to(device)
    features = dense_in.permute(0, 2, 3, 4, 1).reshape(-1, c_in)
    features = features.clone().requires_grad_(True)
    x = spconv.SparseConvTensor(features, indices, list(shape), batch)
    out = conv(x).dense()  # [B, C_out, D, H, W]

    ref_weight = conv.weight.detach().permute(0, 4, 1, 2,
                                              3).clone().requires_grad_(True)
    ref_bias = conv.bias.detach().clone().requires_grad_(True)
    ref_in = dense_in.clone().requires_grad_(True)
    ref_out = F.conv3d(ref_in, ref_weight, ref_bias, padding=1)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)

    upstream = torch.randn_like(ref_out)
    (out * upstream).sum().backward()
    (ref_out * upstream).sum().backward()
    assert torch.isfinite(conv.weight.grad).all()
    # the weight gradient, back in spconv's [out, kD, kH, kW, in] layout
    torch.testing.assert_close(
        conv.weight.grad,
        ref_weight.grad.permute(0, 2, 3, 4, 1),
        rtol=1e-4,
        atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, ref_bias.grad)
    torch.testing.assert_close(
        features.grad,
        ref_in.grad.permute(0, 2, 3, 4, 1).reshape(-1, c_in),
        rtol=1e-4,
        atol=1e-4)
