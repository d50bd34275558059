"""Fast paths: one private read per file, lazy safetensors, repairs on the target device."""
import os.path as osp
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import mmfusionload.load.pipeline as loading
from mmfusionload import load_sources
from mmfusionload.files.lazy import SafetensorsState
from mmfusionload.files.reader import read_checkpoint
from mmfusionload.load.values import all_finite

safetensors_torch = pytest.importorskip('safetensors.torch')


class FastModel(nn.Module):
    """A LiDAR branch (a spconv kernel when spconv is installed, a large linear layer)
    and a small camera branch."""

    def __init__(self, big: int = 64):
        super().__init__()
        layers = []
        try:
            import spconv.pytorch as spconv
            layers.append(spconv.SubMConv3d(4, 8, 3, indice_key='subm1'))
        except ImportError:  # pragma: no cover - spconv is part of the stack
            layers.append(nn.Conv3d(4, 8, 3))
        layers += [nn.BatchNorm1d(8), nn.Linear(big, big)]
        self.pts_middle_encoder = nn.Sequential(*layers)
        self.img_backbone = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))


def _trained(big: int = 64, seed: int = 1) -> 'OrderedDict[str, torch.Tensor]':
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for k, v in FastModel(big).state_dict().items():
        out[k] = torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
    return out


def _files(d, big: int = 64):
    """The same LiDAR (MMCV kernel layout) and camera (``backbone.``, float16) tensors as
    ``.pth`` and ``.safetensors``; also one combined file of both."""
    from mmfusionload.cli.demo import to_mmcv_layout
    sd = _trained(big)
    lidar = to_mmcv_layout(OrderedDict((k, v) for k, v in sd.items()
                                       if k.startswith('pts_')), FastModel(big))
    camera = OrderedDict(('backbone.' + k[len('img_backbone.'):], v.half())
                         for k, v in sd.items() if k.startswith('img_backbone.'))
    both = OrderedDict(list(lidar.items()) + [('img_' + k, v) for k, v in camera.items()])
    paths = {}
    for name, state in (('lidar', lidar), ('camera', camera), ('both', both)):
        paths[name + '.pth'] = osp.join(d, name + '.pth')
        torch.save({'state_dict': state}, paths[name + '.pth'])
        paths[name + '.safetensors'] = osp.join(d, name + '.safetensors')
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()},
                                    paths[name + '.safetensors'])
    return sd, paths


def _sources(paths, ext):
    return [dict(modality='lidar', checkpoint=paths['lidar' + ext]),
            dict(modality='camera', checkpoint=paths['camera' + ext])]


def _state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_safetensors_and_pth_load_the_same(tmp_path):
    sd, paths = _files(str(tmp_path))
    loaded = {}
    for ext in ('.pth', '.safetensors'):
        torch.manual_seed(0)
        model = FastModel()
        report = load_sources(model, _sources(paths, ext), logger=None)
        loaded[ext] = (_state(model), [sorted(s.loaded) for s in report.sources],
                       [{n: sorted(v) for n, v in s.adapted.items()} for s in report.sources])
    (a, la, ra), (b, lb, rb) = loaded['.pth'], loaded['.safetensors']
    assert la == lb and ra == rb
    assert 'spconv_layout' in ra[0] or 'spconv' not in str(type(FastModel().pts_middle_encoder[0]))
    assert 'cast' in ra[1]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in la[0]:
        assert torch.equal(a[k], sd[k]), k
    for k in la[1]:  # the camera file held float16 copies
        assert torch.equal(a[k], sd[k].half().float()), k


def test_safetensors_state_is_lazy(tmp_path):
    _, paths = _files(str(tmp_path))
    state = read_checkpoint(paths['both.safetensors'])['state_dict']
    assert isinstance(state, SafetensorsState)
    assert state.materialized == []
    key = 'pts_middle_encoder.2.weight'
    assert state.shape(key) == (64, 64) and state.dtype(key) == 'F32'
    assert state.materialized == []
    assert state[key].shape == (64, 64) and state.materialized == [key]
    # reading and unwrapping a source creates no tensor either, wrapper prefixes or not
    from mmfusionload.checkpoint.containers import RenamedState, shape_of
    from mmfusionload.load.pipeline import read_source
    from mmfusionload.load.source import parse_source
    ckpt = read_source(parse_source(dict(modality='camera',
                                         checkpoint=paths['both.safetensors'])))
    assert isinstance(ckpt.state, SafetensorsState) and ckpt.state.materialized == []
    assert ckpt.container == 'state_dict' and ckpt.skipped == []
    wrapped = str(tmp_path / 'ddp.safetensors')
    safetensors_torch.save_file({'module.' + k: v for k, v in
                                 safetensors_torch.load_file(paths['both.safetensors']).items()},
                                wrapped)
    ckpt = read_source(parse_source(dict(modality='camera', checkpoint=wrapped)))
    assert isinstance(ckpt.state, RenamedState) and ckpt.stripped == ['module.']
    assert list(ckpt.state) == list(state) and ckpt.state.materialized == []
    assert shape_of(ckpt.state, key) == (64, 64) and ckpt.state.materialized == []
    assert torch.equal(ckpt.state[key], state[key]) and ckpt.state.materialized == [key]


def test_one_modality_load_creates_only_its_tensors(tmp_path, monkeypatch):
    """Loading the camera from a file that also holds the LiDAR creates only the camera's
    tensors: nothing else of the lazy safetensors mapping is touched."""
    _, paths = _files(str(tmp_path))
    kept = []

    def spy(spec):
        kept.append(real_read(spec))
        return kept[-1]

    real_read = loading.read_source
    monkeypatch.setattr(loading, 'read_source', spy)
    model = FastModel()
    report = load_sources(model, [dict(modality='camera', checkpoint=paths['both.safetensors'])],
                          logger=None)
    state = kept[0].state
    assert isinstance(state, SafetensorsState) and report.sources[0].loaded
    assert sorted(state.materialized) == sorted(report.sources[0].loaded)  # same keys here
    assert not any(k.startswith('pts_') for k in state.materialized)


def test_all_finite(tmp_path):
    sd, paths = _files(str(tmp_path), big=1024)
    for ext in ('.pth', '.safetensors'):
        state = read_checkpoint(paths['lidar' + ext])['state_dict']
        t = state['pts_middle_encoder.2.weight']
        want = sd['pts_middle_encoder.2.weight']
        assert all_finite(t) and torch.equal(t, want)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.ones(1000, dtype=dt)
        assert all_finite(x)
        x[7] = float('nan')
        assert not all_finite(x)
        x[7] = float('inf')
        assert not all_finite(x)
        x[7], x[8] = float('inf'), float('-inf')
        assert not all_finite(x)
    assert all_finite(torch.full((64, ), 3e38))  # the sum overflows, the values are finite
    assert all_finite(torch.full((64, ), 6e4, dtype=torch.float16))
    assert all_finite(torch.arange(10)) and all_finite(torch.empty(0))


def test_repairs_run_on_the_target_device_bit_for_bit(tmp_path, device):
    """Loading into a model on ``device`` gives the CPU load's values exactly; repairs
    run on the target's device with one host-to-device copy per tensor."""
    _, paths = _files(str(tmp_path))
    torch.manual_seed(0)
    ref = FastModel()
    load_sources(ref, _sources(paths, '.pth'), logger=None)
    torch.manual_seed(0)
    model = FastModel().to(device)
    plans = []
    real_apply = loading.apply

    def spy(p, *a, **kw):
        plans.extend(p)
        return real_apply(p, *a, **kw)

    loading.apply, saved = spy, loading.apply
    try:
        load_sources(model, _sources(paths, '.pth'), logger=None)
    finally:
        loading.apply = saved
    got, want = _state(model), _state(ref)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    steps = 0
    for plan in plans:
        for e in plan.to_load:
            assert e.source.device.type == 'cpu'  # read on the host, mapped
            out = e.materialize()
            assert out.device == e.target.device
            steps += len(e.steps)
            if not e.steps and e.target.device.type == 'cpu':
                assert out is e.source  # no copy before the one into the parameter
    assert steps > 0


def _same(a, b, path='ckpt'):
    assert type(a) is type(b), (path, type(a), type(b))
    if torch.is_tensor(a):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad) == \
            (b.dtype, b.shape, b.stride(), b.storage_offset(), b.requires_grad), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        assert getattr(a, '_metadata', None) == getattr(b, '_metadata', None), path
        for k in a:
            _same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f'{path}[{i}]')
    elif not callable(a) and type(a).__module__.split('.')[0] != 'numpy':
        assert a == b, path


def test_zip_reader_matches_torch_load(tmp_path):
    """The ``.pth`` reader rebuilds what ``torch.load`` rebuilds."""
    import numpy as np
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    base = torch.arange(24.).reshape(4, 6)
    obj = {'state_dict': m.state_dict(), 'param': nn.Parameter(torch.ones(2)),
           'views': (base, base[1:], base.t(), base[:, 2]), 'bf16': torch.ones(3).bfloat16(),
           'bool': torch.tensor([True, False]), 'scalar': torch.tensor(3),
           'empty': torch.empty(0, 5),
           'grad': torch.zeros(2, requires_grad=True), 'np': np.arange(3), 'meta': {'epoch': 2}}
    path = str(tmp_path / 'mixed.pth')
    torch.save(obj, path)
    got = read_checkpoint(path, trust_checkpoint=True)
    _same(torch.load(path, weights_only=False), got)
    views = got['views']  # one storage, as saved
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1
    restricted = read_checkpoint(path)  # the restricted unpickler, same tensors
    _same(got['state_dict'], restricted['state_dict'])


def _mappings(path: str) -> int:
    """How many times this process has ``path`` mapped (from /proc/self/maps)."""
    real = osp.realpath(path)
    with open('/proc/self/maps') as f:
        return sum(1 for line in f if line.split(None, 5)[5:] == [real + '\n'])


@pytest.mark.skipif(not osp.exists('/proc/self/maps'), reason='needs Linux /proc')
@pytest.mark.parametrize('ext', ['.pth', '.safetensors'])
def test_sources_naming_one_file_read_it_once(tmp_path, monkeypatch, ext):
    """Two sources of one file (spelled two ways): one read, one mapping, shared tensors;
    each source still loads its own part, repaired."""
    import os
    sd, paths = _files(str(tmp_path))
    path = paths['both' + ext]
    link = str(tmp_path / ('link' + ext))
    os.symlink(path, link)
    reads, kept = [], []
    real_read, real_source = loading.read_checkpoint, loading.read_source

    def counting_read(p, *args, **kwargs):
        reads.append(p)
        return real_read(p, *args, **kwargs)

    def keeping_source(spec):
        kept.append(real_source(spec))  # keep the results (and the mapping) alive
        return kept[-1]

    monkeypatch.setattr(loading, 'read_checkpoint', counting_read)
    monkeypatch.setattr(loading, 'read_source', keeping_source)
    model = FastModel()
    report = load_sources(model, [dict(modality='lidar', checkpoint=path),
                                  dict(modality='camera', checkpoint=link)], logger=None)
    assert reads == [path] and len(kept) == 2
    assert _mappings(path) == 0  # read into private memory, never mapped
    assert all(kept[0].state[k] is kept[1].state[k] for k in kept[0].state)
    got = model.state_dict()
    lidar, camera = report.sources[0].loaded, report.sources[1].loaded
    assert lidar and camera and not set(lidar) & set(camera)
    assert 'spconv_layout' in report.sources[0].adapted or \
        'spconv' not in str(type(FastModel().pts_middle_encoder[0]))
    for k in lidar:
        assert torch.equal(got[k], sd[k]), k
    for k in camera:  # the file holds float16 copies
        assert torch.equal(got[k], sd[k].half().float()), k
    # another read option is another read
    reads.clear()
    load_sources(FastModel(), [dict(modality='lidar', checkpoint=path),
                               dict(modality='camera', checkpoint=path, trust_checkpoint=True)],
                 logger=None)
    assert reads == [path, path]


def test_one_read_each_source_unwraps_its_own(tmp_path):
    """A file read once for two sources through a registered loader scheme (the loader
    counts its opens); the sources unwrap it differently (``weights``), and a file
    that cannot be read fails both sources with the model unchanged."""
    from mmengine.runner.checkpoint import CheckpointLoader
    sd = _trained()
    ema = OrderedDict((k, v + 1 if v.is_floating_point() else v) for k, v in sd.items())
    path = str(tmp_path / 'ema.pth')
    torch.save({'state_dict': sd, 'state_dict_ema': ema}, path)
    opens = []

    def counted(uri, map_location=None):
        real = uri[len('counted://'):]
        with open(real, 'rb') as f:  # the only open of the file
            opens.append(real)
            return torch.load(f, map_location=map_location, weights_only=True)

    CheckpointLoader.register_scheme(prefixes='counted://', loader=counted)
    try:
        model = FastModel()
        before = _state(model)
        uri = 'counted://' + path
        report = load_sources(model, [
            dict(modality='lidar', checkpoint=uri, weights='raw'),
            dict(modality='camera', checkpoint=uri, prefer_ema=True)], logger=None)
        assert opens == [path]
        assert [s.container for s in report.sources] == ['state_dict', 'state_dict_ema']
        got = model.state_dict()
        for k in report.sources[0].loaded:
            assert torch.equal(got[k], sd[k]), k
        for k in report.sources[1].loaded:
            assert torch.equal(got[k], ema[k]), k
        opens.clear()
        bad = str(tmp_path / 'bad.pth')
        with open(bad, 'wb') as f:
            f.write(b'PK\x03\x04 not a checkpoint')
        model = FastModel()
        before = _state(model)
        with pytest.raises(loading.FusionLoadError) as info:
            load_sources(model, [dict(modality='lidar', checkpoint='counted://' + bad),
                                 dict(modality='camera', checkpoint='counted://' + bad)],
                         logger=None)
        assert opens == [bad]
        assert sum('bad.pth' in p for p in info.value.problems) >= 2  # both sources say so
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finally:
        CheckpointLoader._schemes.pop('counted://', None)


def test_nonfinite_in_one_shared_file_leaves_the_model_bit_identical(tmp_path):
    """NaN/Inf in both sources' parts of one file: every one is named, in source and key
    order, and nothing is written (the values are checked before any write)."""
    sd = _trained()
    bad = OrderedDict((k, v.clone()) for k, v in sd.items())
    bad['pts_middle_encoder.2.weight'][3, 5] = float('nan')
    bad['pts_middle_encoder.2.bias'][0] = float('-inf')
    bad['img_backbone.0.weight'][1, 2] = float('inf')
    path = str(tmp_path / 'bad.pth')
    torch.save({'state_dict': bad}, path)
    model = FastModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(loading.FusionLoadError) as info:
        load_sources(model, [dict(modality='lidar', checkpoint=path),
                             dict(modality='camera', checkpoint=path)], logger=None)
    named = [p.split(': ')[1].split(' ')[0] for p in info.value.problems if 'NaN/Inf' in p]
    assert named == ['pts_middle_encoder.2.weight', 'pts_middle_encoder.2.bias',
                     'img_backbone.0.weight']
    after = model.state_dict()

    def bits(t):
        return t.contiguous().view(-1).view(torch.uint8)

    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(bits(v), bits(after[k])), k


def test_all_finite_agrees_with_isfinite():
    """Against ``torch.isfinite(t).all()``: every dtype and layout the check takes a
    different path for (dot product, sum, float32 sum of a low-precision tensor)."""
    g = torch.Generator().manual_seed(5)
    specials = (float('nan'), float('inf'), float('-inf'), 3e38, -3e38, 1e-45)
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for trial in range(40):
            x = torch.randn(37, 53, generator=g).to(dt)
            n = int(torch.randint(0, 3, (1, ), generator=g))
            for _ in range(n):
                i = int(torch.randint(0, x.numel(), (1, ), generator=g))
                v = specials[int(torch.randint(0, len(specials), (1, ), generator=g))]
                x.view(-1)[i] = v
            for t in (x, x.t(), x[:, ::2]):
                assert all_finite(t) == bool(torch.isfinite(t).all()), (dt, trial)


def test_gc_paused_while_a_pickle_becomes_objects(tmp_path, monkeypatch):
    """The cyclic GC is off while the pickle is turned into objects, and restored after,
    on errors too; a caller that had it off keeps it off."""
    import gc
    import mmfusionload.files.reader as reader
    from mmfusionload import FusionLoadError
    path = str(tmp_path / 'm.pth')
    torch.save({'state_dict': nn.Linear(2, 2).state_dict(), 'meta': {'a': [1, 2]}}, path)
    seen = []
    real = reader.unpickle

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(reader, 'unpickle', spy)
    assert gc.isenabled()
    read_checkpoint(path)
    assert seen == [False] and gc.isenabled()
    bad = str(tmp_path / 'bad.pth')
    torch.save({'x': torch.ones(2), 'f': nn.Linear}, bad)  # a global outside the table
    with pytest.raises(FusionLoadError):
        read_checkpoint(bad)
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        read_checkpoint(path)
        assert not gc.isenabled()
    finally:
        gc.enable()
