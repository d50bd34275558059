"""EfficientViT backbone: Cream key names/shapes, numerical parity with Cream's
classification network, detection-mode shapes, freezing and registry build."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from mmfusionload.models import EfficientViT, attention_bias_idxs
from mmfusionload.models.efficientvit import LocalWindowAttention
from reference.cream_efficientvit import build as build_reference

ARCHS = ['m0', 'm1', 'm2', 'm3', 'm4', 'm5']
EMBED_DIMS = {'m0': (64, 128, 192), 'm1': (128, 144, 192), 'm2': (128, 192, 224),
              'm3': (128, 240, 320), 'm4': (128, 256, 384), 'm5': (192, 288, 384)}
MANIFESTS = Path(__file__).parent / 'data' / 'manifests'


def load_manifest(arch):
    return json.loads((MANIFESTS / f'cream_efficientvit_{arch}_cls.json').read_text())


def manifest_spec(arch):
    return {t['key']: (tuple(t['shape']), t['dtype'], t['kind'])
            for t in load_manifest(arch)['tensors']}


def model_spec(model):
    params = {k for k, _ in model.named_parameters()}
    return {k: (tuple(v.shape), str(v.dtype).replace('torch.', ''),
                'param' if k in params else 'buffer')
            for k, v in model.state_dict().items()}


def randomize_(model, seed=0):
    """Random weights, biases, attention biases and BN running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('num_batches_tracked') or name.endswith('attention_bias_idxs'):
                continue
            rand = torch.rand(t.shape, generator=g)
            randn = torch.randn(t.shape, generator=g)
            if name.endswith('bn.weight'):  # small enough to keep activations O(1)
                t.copy_(0.2 + 0.4 * rand)
            elif name.endswith('running_var'):
                t.copy_(0.5 + rand)
            elif name.endswith('attention_biases'):
                t.copy_(randn)
            elif t.dim() > 1:  # conv / linear weights
                t.copy_(randn / math.sqrt(t[0].numel()))
            else:  # BN bias / running mean, conv bias
                t.copy_(0.1 * randn)


def stage_sizes(h, w):
    """Output sizes of the three stages: four stride-2 convs, then two subsamples."""
    down = lambda r: (r - 1) // 2 + 1  # noqa: E731
    sizes = []
    for _ in range(4):
        h, w = down(h), down(w)
    sizes.append((h, w))
    for _ in range(2):
        h, w = down(h), down(w)
        sizes.append((h, w))
    return sizes


@pytest.mark.parametrize('arch', ARCHS)
def test_state_dict_matches_manifest(arch):
    spec = manifest_spec(arch)
    ref = build_reference(arch)
    assert model_spec(ref) == spec
    n_params = sum(p.numel() for p in ref.parameters())
    assert n_params == load_manifest(arch)['num_params']

    backbone_spec = {k: v for k, v in spec.items() if not k.startswith('head.')}
    assert model_spec(EfficientViT(arch, img_size=224)) == backbone_spec

    detection_spec = dict(backbone_spec)
    for k, (shape, dtype, kind) in backbone_spec.items():
        if k.endswith('attention_biases'):
            detection_spec[k] = ((shape[0], 49), dtype, kind)
        elif k.endswith('attention_bias_idxs'):
            detection_spec[k] = ((49, 49), dtype, kind)
    assert any(v != detection_spec[k] for k, v in backbone_spec.items())  # stage 3 differs
    assert model_spec(EfficientViT(arch.upper())) == detection_spec


@pytest.mark.parametrize('arch', ARCHS)
def test_matches_cream_classification_features(arch):
    ref = build_reference(arch).eval()
    randomize_(ref, seed=ARCHS.index(arch))
    backbone = EfficientViT(arch, img_size=224).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith('head.')}
    backbone.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.forward_features(x)
        outs = backbone(x)
    assert len(outs) == 3
    for out, exp in zip(outs, expected):
        assert out.abs().max() > 1e-3  # not trivially zero
        torch.testing.assert_close(out, exp)


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('size', [(224, 224), (256, 704)])
def test_detection_forward_shapes(arch, size):
    model = EfficientViT(arch).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    expected = [(1, c, h, w) for c, (h, w) in zip(EMBED_DIMS[arch], stage_sizes(*size))]
    assert [tuple(o.shape) for o in outs] == expected
    assert outs[0].shape[-2:] == (math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert all(torch.isfinite(o).all() for o in outs)


def test_small_inputs_are_padded_to_one_window():
    model = EfficientViT('m0').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 4, 4), (1, 128, 2, 2), (1, 192, 1, 1)]
    # the classification-window model also accepts other sizes (padded windows)
    model = EfficientViT('m0', img_size=224).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 100, 150))
    assert [tuple(o.shape[-2:]) for o in outs] == stage_sizes(100, 150)


def test_window_attention_pads_and_crops():
    torch.manual_seed(0)
    lwa = LocalWindowAttention(32, 2, 7, (5, 3)).eval()
    randomize_(lwa)
    x = torch.randn(2, 32, 9, 16)
    with torch.no_grad():
        out = lwa(x)
        padded = F.pad(x, (0, 5, 0, 5))  # 14 x 21
        expected = torch.zeros(2, 32, 14, 21)
        for i in range(2):
            for j in range(3):
                win = (slice(None), slice(None), slice(7 * i, 7 * i + 7),
                       slice(7 * j, 7 * j + 7))
                expected[win] = lwa.attn(padded[win])
    torch.testing.assert_close(out, expected[:, :, :9, :16])


def test_frozen_stages_and_norm_eval():
    model = EfficientViT('m0', frozen_stages=1, norm_eval=True)
    model.train()
    for name, p in model.named_parameters():
        frozen = name.startswith(('patch_embed.', 'blocks1.'))
        assert p.requires_grad != frozen, name
    for name, m in model.named_modules():
        if name.startswith(('patch_embed', 'blocks1')) or isinstance(m, _BatchNorm):
            assert not m.training, name
    assert model.blocks2.training and model.blocks2[1].conv1.c.training
    model.eval()
    assert not any(m.training for m in model.modules())

    model = EfficientViT('m0').train()
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    model = EfficientViT('m0', frozen_stages=0).train()
    assert not model.patch_embed.training and model.blocks1.training
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    model = EfficientViT('m0', frozen_stages=3).train()
    assert not any(p.requires_grad for p in model.parameters())


def test_out_indices():
    model = EfficientViT('m0', out_indices=(1, 2)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 128, 128))
    assert [o.shape[1] for o in outs] == [128, 192]


def test_build_from_registry_and_dict_arch():
    import mmfusionload.models  # noqa: F401
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope('mmdet'):  # whatever scope an earlier Runner left
        model = MODELS.build(dict(type='EfficientViT', arch='m4'))
        model3d = MODELS.build(dict(type='mmdet.EfficientViT', arch='m0'))
    assert isinstance(model3d, EfficientViT)
    assert isinstance(model, EfficientViT) and model.embed_dims == (128, 256, 384)
    arch = dict(embed_dim=[32, 48, 64], depth=[1, 1, 1], num_heads=[2, 2, 2],
                kernels=[5, 3])
    model = EfficientViT(arch=arch, out_indices=(2, )).eval()
    with torch.no_grad():
        (out, ) = model(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 64, 2, 2)
    assert model.state_dict()['blocks2.3.mixer.m.attn.dws.1.c.weight'].shape == (16, 1, 3, 3)
    with pytest.raises(KeyError):
        EfficientViT('m9')
    with pytest.raises(KeyError):
        EfficientViT(dict(embed_dim=[32, 48, 64], depth=[1, 1, 1]))


def test_init_weights_without_init_cfg():
    model = EfficientViT('m0')
    model.init_weights()
    sd = model.state_dict()
    zero_init = ('dw0.m.bn.weight', 'dw1.m.bn.weight', 'pw2.bn.weight', 'proj.1.bn.weight')
    for k, v in sd.items():
        if k.endswith('bn.weight'):
            assert torch.equal(v, torch.zeros_like(v) if k.endswith(zero_init)
                               else torch.ones_like(v)), k
        elif k.endswith('bn.bias') or k.endswith('attention_biases'):
            assert not v.any(), k
    assert sd['blocks2.0.0.m.bn.weight'].eq(1).all()  # the depthwise before merging


@pytest.mark.parametrize('w', [1, 2, 4, 7])
def test_attention_bias_idxs(w):
    idxs = attention_bias_idxs(w)
    assert idxs.dtype == torch.long and idxs.shape == (w * w, w * w)
    points = [(y, x) for y in range(w) for x in range(w)]
    for a, (y1, x1) in enumerate(points):
        for b, (y2, x2) in enumerate(points):
            assert idxs[a, b] == abs(y1 - y2) * w + abs(x1 - x2)
    ref_ab = build_reference('m0').blocks3[3].mixer.m.attn.attention_bias_idxs  # window 4
    assert torch.equal(attention_bias_idxs(4), ref_ab)
    model = EfficientViT('m0')
    assert torch.equal(model.blocks3[3].mixer.m.attn.attention_bias_idxs,
                       attention_bias_idxs(7))
