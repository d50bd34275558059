"""EfficientViT pretrained loading: Cream ImageNet release files, MMDetection / BEVFusion
detector checkpoints and bare state dicts go into the backbone through
``init_cfg=dict(type='Pretrained')`` and ``load_sources`` with no per-file option.

The checkpoints are made here from the reference Cream classification network
(``tests/reference/cream_efficientvit.py``) with random weights and BN statistics.
"""
import argparse
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfusionload import FusionLoadError, load_sources
from mmfusionload.models import EfficientViT
from reference.cream_efficientvit import build as build_reference

ARCHS = ['m0', 'm1', 'm2', 'm3', 'm4', 'm5']
EMBED_DIMS = {'m0': (64, 128, 192), 'm1': (128, 144, 192), 'm2': (128, 192, 224),
              'm3': (128, 240, 320), 'm4': (128, 256, 384), 'm5': (192, 288, 384)}
NUM_HEADS = {'m0': (4, 4, 4), 'm1': (2, 3, 3), 'm2': (4, 3, 2), 'm3': (4, 3, 4),
             'm4': (4, 4, 4), 'm5': (3, 3, 4)}
# The key of Cream's issue: KeyError 'backbone.blocks1.0.mixer.m.attn.attention_biases'.
ISSUE_KEY = 'blocks1.0.mixer.m.attn.attention_biases'


# ---------------------------------------------------------------- checkpoint makers
def randomize(state, seed):
    """A copy of ``state`` with random weights, attention biases and BN statistics.

    Scales keep activations O(1) so forward passes stay finite. Index tables are kept.
    """
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for k, t in state.items():
        if k.endswith('attention_bias_idxs'):
            out[k] = t.clone()
        elif k.endswith('num_batches_tracked'):
            out[k] = torch.randint(1, 100000, (), generator=g, dtype=t.dtype)
        elif k.endswith('running_var'):
            out[k] = 0.5 + torch.rand(t.shape, generator=g)
        elif k.endswith('bn.weight'):
            out[k] = 0.2 + 0.4 * torch.rand(t.shape, generator=g)
        elif k.endswith('attention_biases'):
            out[k] = torch.randn(t.shape, generator=g)
        elif t.dim() > 1:  # conv / linear weights
            out[k] = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        else:  # BN bias / running mean, conv and linear biases
            out[k] = 0.1 * torch.randn(t.shape, generator=g)
    return out


_CREAM_STATES = {}


def cream_state(arch, seed=0):
    """State dict of a random Cream classification net (``head.*`` and index tables in)."""
    if (arch, seed) not in _CREAM_STATES:
        _CREAM_STATES[arch, seed] = randomize(build_reference(arch).state_dict(),
                                              seed=1000 * seed + ARCHS.index(arch))
    return _CREAM_STATES[arch, seed]


def cream_release(model, model_ema=None, args=None):
    """What Cream's classification ``main.py`` saves (DeiT style)."""
    return {
        'model': model,
        'optimizer': {'state': {0: {'step': torch.tensor(5.),
                                    'exp_avg': torch.zeros(3)}},
                      'param_groups': [{'lr': 1e-5, 'weight_decay': 0.025,
                                        'params': [0]}]},
        'lr_scheduler': {'t_initial': 300, 'warmup_t': 5, 'base_values': [1e-3]},
        'epoch': 299,
        'model_ema': model if model_ema is None else model_ema,
        'scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                   'growth_interval': 2000, '_growth_tracker': 17},
        'max_accuracy': 79.8,
        'args': (dict(model='EfficientViT_M4', input_size=224, lr=1e-3, epochs=300)
                 if args is None else args),
    }


def backbone_keys(state):
    return {k: v for k, v in state.items() if not k.startswith('head.')}


def save(obj, path):
    torch.save(obj, str(path))
    return str(path)


def pretrained(arch, checkpoint, img_size=None, **options):
    return EfficientViT(arch, img_size=img_size,
                        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, **options))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- expectations
def bias_idxs(w):
    """``|dy| * w + |dx|`` for every pair of positions of a w x w window (row-major)."""
    pts = [(y, x) for y in range(w) for x in range(w)]
    return torch.tensor([[abs(y1 - y2) * w + abs(x1 - x2) for (y2, x2) in pts]
                         for (y1, x1) in pts])


def bicubic(t, size):
    """Cream's detection-loader resize of ``attention_biases`` ``[h, s1*s1]``."""
    h, n = t.shape
    s1 = math.isqrt(n)
    return F.interpolate(t.view(1, h, s1, s1), size=(size, size), mode='bicubic',
                         align_corners=False).view(h, size * size)


def assert_loaded(model, source, prefix=''):
    """Every tensor of ``model`` equals ``source[prefix + key]``; attention biases of a
    different window equal the bicubic resize; index tables are the model's own.

    Returns:
        list[str]: The model keys whose attention biases were resized.
    """
    resized = []
    for k, v in model.state_dict().items():
        if k.endswith('attention_bias_idxs'):
            w = math.isqrt(v.shape[0])
            assert torch.equal(v, bias_idxs(w)), k
            continue
        src = source[prefix + k]
        if k.endswith('attention_biases') and src.shape != v.shape:
            resized.append(k)
            src = bicubic(src, math.isqrt(v.shape[1]))
        assert v.dtype == src.dtype and torch.equal(v, src), k
    return resized


def stage3_bias_keys(model):
    return [k for k in model.state_dict()
            if k.startswith('blocks3.') and k.endswith('attention_biases')]


def stage_sizes(h, w):
    down = lambda r: (r - 1) // 2 + 1  # noqa: E731
    for _ in range(4):
        h, w = down(h), down(w)
    sizes = [(h, w)]
    for _ in range(2):
        h, w = down(h), down(w)
        sizes.append((h, w))
    return sizes


def check_forward(model, arch, size, x=None):
    """Run ``model`` (eval) on ``x`` or a random image of ``size``; check shapes, finiteness."""
    model.eval()
    if x is None:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = model(x)
    expected = [(1, c, h, w) for c, (h, w) in zip(EMBED_DIMS[arch], stage_sizes(*size))]
    assert [tuple(o.shape) for o in outs] == expected
    assert all(bool(torch.isfinite(o).all()) for o in outs)
    return outs


# ---------------------------------------------------------------- Cream release files
@pytest.mark.parametrize('arch', ARCHS)
def test_cream_release_into_detection_and_224_backbones(arch, tmp_path):
    state = cream_state(arch)
    ckpt = save(cream_release(state), tmp_path / f'efficientvit_{arch}.pth')

    # detection backbone (img_size=None): 7x7 windows everywhere, stage 3 resized 4x4 -> 7x7
    det = pretrained(arch, ckpt)
    det.init_weights()
    assert det.is_init
    resized = assert_loaded(det, state)
    assert resized == stage3_bias_keys(det) and len(resized) == 3 + (arch == 'm5')
    h3 = NUM_HEADS[arch][2]
    assert state[resized[0]].shape == (h3, 16) and det.state_dict()[resized[0]].shape == (h3, 49)

    # what the report says (same planning as init_weights, without writing)
    report = load_sources(EfficientViT(arch), [dict(checkpoint=ckpt)], dry_run=True,
                          logger=None)
    assert report.ok, report.problems
    (src, ) = report.sources
    keys = [k for k in det.state_dict() if not k.endswith('attention_bias_idxs')]
    idxs = [k for k in det.state_dict() if k.endswith('attention_bias_idxs')]
    assert src.container == 'model'
    assert sorted(src.loaded) == sorted(keys)
    assert src.adapted == {'resize': resized}
    assert sorted(src.regenerated) == sorted(idxs)
    assert sorted(src.unexpected) == sorted(k for k in state if k.startswith('head.'))
    assert src.missing == [] and src.mismatched == [] and src.excluded == []

    # classification-window backbone (img_size=224): everything exactly equal
    cls = pretrained(arch, ckpt, img_size=224)
    cls.init_weights()
    assert assert_loaded(cls, state) == []
    report = load_sources(EfficientViT(arch, img_size=224), [dict(checkpoint=ckpt)],
                          dry_run=True, logger=None)
    assert report.sources[0].adapted == {}

    # features: the 224 backbone reproduces the Cream network it was loaded from
    ref = build_reference(arch).eval()
    ref.load_state_dict(state)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref.forward_features(x)
    outs = check_forward(cls, arch, (224, 224), x)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp)
    # the detection backbone runs at 224 and at BEVFusion's 256 x 704
    check_forward(det, arch, (224, 224))
    check_forward(det, arch, (256, 704))


def test_model_ema_is_taken_with_prefer_ema(tmp_path):
    arch = 'm4'
    model, ema = cream_state(arch, seed=0), cream_state(arch, seed=1)
    ckpt = save(cream_release(model, model_ema=ema), tmp_path / 'cream_ema.pth')

    plain = pretrained(arch, ckpt)
    plain.init_weights()
    assert_loaded(plain, model)

    via_init_cfg = pretrained(arch, ckpt, prefer_ema=True)
    via_init_cfg.init_weights()
    assert_loaded(via_init_cfg, ema)

    backbone = EfficientViT(arch)
    report = load_sources(backbone, [dict(checkpoint=ckpt, prefer_ema=True)], logger=None)
    assert report.sources[0].container == 'model_ema'
    assert_loaded(backbone, ema)


def test_bare_cream_state_dict(tmp_path):
    arch = 'm2'
    state = cream_state(arch)
    ckpt = save(state, tmp_path / 'bare.pth')
    model = pretrained(arch, ckpt)
    model.init_weights()
    assert len(assert_loaded(model, state)) == 3
    report = load_sources(EfficientViT(arch), [dict(checkpoint=ckpt)], dry_run=True,
                          logger=None)
    assert report.sources[0].container == '<bare>'
    assert len(report.sources[0].unexpected) == 7  # head.bn.* (5), head.l.* (2)
    # a bare state dict of the backbone alone (no head, no index tables)
    only = {k: v for k, v in backbone_keys(state).items()
            if not k.endswith('attention_bias_idxs')}
    model = pretrained(arch, save(only, tmp_path / 'bare_backbone.pth'))
    model.init_weights()
    assert len(assert_loaded(model, state)) == 3


# ---------------------------------------------------------------- detector checkpoints
def detection_state(arch, seed):
    """A trained detection backbone's state dict: 7x7 tables everywhere."""
    return randomize(EfficientViT(arch).state_dict(), seed)


def detector_checkpoint(backbone_state, prefix='backbone.'):
    g = torch.Generator().manual_seed(11)
    state = OrderedDict((prefix + k, v) for k, v in backbone_state.items())
    state['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 128, 1, 1, generator=g)
    state['neck.lateral_convs.0.conv.bias'] = torch.randn(256, generator=g)
    state['bbox_head.retina_cls.weight'] = torch.randn(720, 256, 3, 3, generator=g)
    state['bbox_head.retina_cls.bias'] = torch.randn(720, generator=g)
    return {'meta': {'epoch': 12, 'iter': 87960, 'mmdet_version': '3.3.0'},
            'state_dict': state}


@pytest.mark.parametrize('arch', ['m0', 'm4', 'm5'])
def test_mmdet_detector_checkpoint_with_backbone_prefix(arch, tmp_path):
    state = detection_state(arch, seed=5)
    ckpt = save(detector_checkpoint(state), tmp_path / 'retinanet.pth')
    model = pretrained(arch, ckpt)
    model.init_weights()
    assert assert_loaded(model, state) == []

    report = load_sources(EfficientViT(arch), [dict(checkpoint=ckpt)], dry_run=True,
                          logger=None)
    (src, ) = report.sources
    assert src.container == 'state_dict' and src.prefix == 'backbone. -> <none>'
    assert src.unexpected == [] and src.adapted == {} and src.missing == []
    assert src.ignored == 4  # neck.* and bbox_head.* are outside the backbone

    # MMEngine's own spelling, prefix='backbone.', means the same
    model = pretrained(arch, ckpt, prefix='backbone.')
    model.init_weights()
    assert_loaded(model, state)


def test_cream_issue_keyerror_backbone_prefix_regression(tmp_path):
    """Cream's detection loader looks up ``model_state_dict[k]`` with the file's
    ``backbone.`` key and raises ``KeyError:
    'backbone.blocks1.0.mixer.m.attn.attention_biases'``; stripping ``backbone.`` only in
    that lookup stops the crash but then loads nothing. Here the values land."""
    arch = 'm4'
    # classification weights under `backbone.` (e.g. a converted classifier), head too
    state = cream_state(arch, seed=2)
    ckpt = {'state_dict': OrderedDict(('backbone.' + k, v) for k, v in state.items())}
    assert 'backbone.' + ISSUE_KEY in ckpt['state_dict']
    path = save(ckpt, tmp_path / 'issue.pth')
    model = EfficientViT(arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    before = model.state_dict()[ISSUE_KEY].clone()
    model.init_weights()
    after = model.state_dict()[ISSUE_KEY]
    assert not torch.equal(before, after)
    assert torch.equal(after, state[ISSUE_KEY])
    assert len(assert_loaded(model, state)) == 3  # and everything else, stage 3 resized

    # the file of the issue holding that one tensor only: it lands with strict=False,
    # and the strict default refuses it, naming what would be left out
    single = save({'state_dict': {'backbone.' + ISSUE_KEY: state[ISSUE_KEY]}},
                  tmp_path / 'issue_single.pth')
    model = pretrained(arch, single, strict=False)
    untouched = snapshot(model)
    model.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[ISSUE_KEY] if k == ISSUE_KEY else untouched[k]), k
    model = pretrained(arch, single)
    untouched = snapshot(model)
    with pytest.raises(FusionLoadError, match='get nothing from this checkpoint'):
        model.init_weights()
    for k, v in model.state_dict().items():
        assert torch.equal(v, untouched[k]), k


# ---------------------------------------------------------------- BEVFusion camera branch
class TinyBEVFusion(nn.Module):
    """The submodule names of MMDetection3D's BEVFusion that the loader looks at."""

    def __init__(self, arch):
        super().__init__()
        self.img_backbone = EfficientViT(arch)
        self.img_neck = nn.Conv2d(EMBED_DIMS[arch][0], 8, 1)
        self.pts_backbone = nn.Conv2d(4, 4, 3)


def test_bevfusion_img_backbone_checkpoint_into_camera_branch(tmp_path):
    arch = 'm4'
    state = detection_state(arch, seed=9)
    g = torch.Generator().manual_seed(12)
    file_state = OrderedDict(('img_backbone.' + k, v) for k, v in state.items())
    file_state['img_neck.weight'] = torch.randn(8, 128, 1, 1, generator=g)
    file_state['img_neck.bias'] = torch.randn(8, generator=g)
    file_state['pts_backbone.weight'] = torch.randn(4, 4, 3, 3, generator=g)
    file_state['pts_backbone.bias'] = torch.randn(4, generator=g)
    file_state['fusion_layer.0.weight'] = torch.randn(256, 336, 3, 3, generator=g)
    ckpt = save({'state_dict': file_state, 'meta': {}}, tmp_path / 'bevfusion.pth')

    model = TinyBEVFusion(arch)
    pts_before = snapshot(model.pts_backbone)
    report = load_sources(model, [dict(modality='camera', checkpoint=ckpt)], logger=None)
    (src, ) = report.sources
    assert src.targets == ['img_backbone', 'img_neck'] and src.kept == []
    assert src.missing == [] and src.unexpected == []
    assert_loaded(model.img_backbone, state)
    assert torch.equal(model.img_neck.weight, file_state['img_neck.weight'])
    for k, v in model.pts_backbone.state_dict().items():
        assert torch.equal(v, pts_before[k]), k  # not a camera module
    check_forward(model.img_backbone, arch, (256, 704))


def test_cream_release_into_camera_branch(tmp_path):
    """What the BEVFusion EfficientViT config's camera source does."""
    arch = 'm4'
    state = cream_state(arch)
    ckpt = save(cream_release(state), tmp_path / 'efficientvit_m4.pth')
    model = TinyBEVFusion(arch)
    neck_before = snapshot(model.img_neck)
    report = load_sources(model, [dict(modality='camera', checkpoint=ckpt)], logger=None)
    (src, ) = report.sources
    assert src.prefix == '<none> -> img_backbone.'
    assert src.kept == ['img_neck'] and src.missing == []
    assert src.adapted == {'resize': ['img_backbone.' + k
                                      for k in stage3_bias_keys(model.img_backbone)]}
    assert sorted(src.unexpected) == sorted('img_backbone.' + k for k in state
                                            if k.startswith('head.'))
    assert len(assert_loaded(model.img_backbone, state)) == 3
    for k, v in model.img_neck.state_dict().items():
        assert torch.equal(v, neck_before[k]), k


# ---------------------------------------------------------------- errors
def test_head_count_mismatch_names_the_key_and_leaves_the_model(tmp_path):
    arch = 'm4'
    state = dict(cream_state(arch))
    bad = 'blocks2.3.mixer.m.attn.attention_biases'  # model: [4, 49]
    state[bad] = torch.randn(3, 49)
    bad3 = 'blocks3.4.mixer.m.attn.attention_biases'  # model: [4, 49], file window 4
    state[bad3] = torch.randn(3, 16)
    ckpt = save(cream_release(state), tmp_path / 'heads.pth')
    model = pretrained(arch, ckpt)
    before = snapshot(model)
    with pytest.raises(FusionLoadError) as err:
        model.init_weights()
    msg = str(err.value)
    assert bad in msg and bad3 in msg
    assert '3 heads in the checkpoint [3, 49], 4 in the model [4, 49]' in msg
    assert '3 heads in the checkpoint [3, 16], 4 in the model [4, 49]' in msg
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    report = load_sources(EfficientViT(arch), [dict(checkpoint=ckpt)], dry_run=True,
                          logger=None)
    assert len(report.problems) == 2
    assert any(m.key == bad for m in report.sources[0].mismatched)


def test_unknown_pretrained_option_is_an_error(tmp_path):
    ckpt = save(cream_state('m0'), tmp_path / 'm0.pth')
    model = pretrained('m0', ckpt, prefer_emma=True)
    with pytest.raises(FusionLoadError, match='prefer_emma'):
        model.init_weights()


# ---------------------------------------------------------------- the file as released
def test_cream_release_with_argparse_namespace_args(tmp_path):
    arch = 'm1'
    state = cream_state(arch)
    args = argparse.Namespace(model='EfficientViT_M1', input_size=224, lr=1e-3,
                              epochs=300, data_path='/data/imagenet', repeated_aug=True,
                              clip_grad=None, teacher_model='regnety_160')
    ckpt = save(cream_release(state, args=args), tmp_path / 'efficientvit_m1.pth')
    model = pretrained(arch, ckpt)
    model.init_weights()
    assert len(assert_loaded(model, state)) == 3
