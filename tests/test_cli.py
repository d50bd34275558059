"""The command line: inspect, convert, merge on a small real model built from a config."""
import hashlib
import json
import os
import os.path as osp
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch

from mmfusionload.cli.commands import main, parse_source_arg
from mmfusionload.files.reader import read_checkpoint
from mmfusionload.load.repairs import convert_kernel, module_layout

pytest.importorskip('spconv')

MODULE = 'mmfl_cli_tiny_models'
# A small BEVFusion-style model registered in MMDetection3D's MODELS: real
# MMDetection3D/MMDetection modules (spconv 2.x SparseEncoder, SECOND, SECONDFPN, a
# small Swin) under BEVFusion's attribute names, plus the demo's view transform.
MODEL_SOURCE = '''
import torch.nn as nn
from mmengine.model import BaseModel
from mmdet3d.registry import MODELS

from mmfusionload.cli.demo import ViewTransform


@MODELS.register_module()
class CLITinyFusion(BaseModel):

    def __init__(self, pts_voxel_encoder, pts_middle_encoder, pts_backbone, pts_neck,
                 img_backbone, image_size=(64, 128), fused_channels=16, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.pts_voxel_encoder = MODELS.build(pts_voxel_encoder)
        self.pts_middle_encoder = MODELS.build(pts_middle_encoder)
        self.pts_backbone = MODELS.build(pts_backbone)
        self.pts_neck = MODELS.build(pts_neck)
        self.img_backbone = MODELS.build(img_backbone)
        self.view_transform = ViewTransform(image_size=tuple(image_size), feature_size=(4, 8),
                                            dbound=(1.0, 5.0, 1.0))
        self.fusion_layer = nn.Sequential(nn.Conv2d(32 + 80, fused_channels, 1, bias=False),
                                          nn.BatchNorm2d(fused_channels), nn.ReLU(True))

    def forward(self, inputs, data_samples=None, mode='tensor'):
        raise NotImplementedError
'''
MODEL_CFG = '''
custom_imports = dict(imports=['{module}'], allow_failed_imports=False)
default_scope = 'mmdet3d'
model = dict(
    type='CLITinyFusion',
    pts_voxel_encoder=dict(type='HardSimpleVFE', num_features=4),
    pts_middle_encoder=dict(
        type='SparseEncoder', in_channels=4, sparse_shape=[41, 64, 64], base_channels=8,
        output_channels=32, encoder_channels=((8, ), (16, 16), (32, 32), (32, 32)),
        encoder_paddings=((1, ), (1, 1), (1, 1), ((0, 1, 1), 1))),
    pts_backbone=dict(type='SECOND', in_channels=64, out_channels=[16, 32], layer_nums=[1, 1],
                      layer_strides=[1, 2]),
    pts_neck=dict(type='SECONDFPN', in_channels=[16, 32], out_channels=[16, 16],
                  upsample_strides=[1, 2]),
    img_backbone=dict(type='mmdet.SwinTransformer', embed_dims=16, depths=(2, 2, 2, 2),
                      num_heads=(1, 2, 4, 8), window_size=7, out_indices=(1, 2, 3)))
'''


@pytest.fixture(scope='module')
def cfg_dir(tmp_path_factory):
    """A folder with the model module (importable) and the base config text."""
    d = tmp_path_factory.mktemp('cli')
    (d / f'{MODULE}.py').write_text(MODEL_SOURCE)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))


def write_cfg(folder, name='cfg.py', extra=''):
    path = folder / name
    path.write_text(MODEL_CFG.format(module=MODULE) + textwrap.dedent(extra))
    return str(path)


@pytest.fixture(scope='module')
def built(cfg_dir):
    """The config's model, built as the CLI builds it, and a trained-looking copy."""
    from builders import randomize
    from mmfusionload.cli.config import build_model, load_config
    cfg = write_cfg(cfg_dir, 'base.py')
    trained = randomize(build_model(load_config(cfg)), seed=1)
    return cfg, trained


def fresh(cfg, seed=2):
    from builders import randomize
    from mmfusionload.cli.config import build_model, load_config
    return randomize(build_model(load_config(cfg)), seed=seed)


def sparse_keys(model):
    return [n + '.weight' for n, m in model.named_modules() if module_layout(m) is not None]


def digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module')
def ckpts(cfg_dir, built):
    """Per-modality checkpoints of the trained model, in foreign formats."""
    from test_presets import mmdet_swin_to_original
    _, trained = built
    sd = trained.state_dict()
    d = cfg_dir
    # LiDAR: a run of MMCV's sparse conv (kernels [*k, in, out], _metadata version 1)
    lidar = OrderedDict((k, v) for k, v in sd.items() if k.startswith('pts_'))
    for k in sparse_keys(trained):
        lidar[k] = convert_kernel(lidar[k], 'spconv2', 'mmcv')
    lidar._metadata = OrderedDict((k[:-len('.weight')], {'version': 1})
                                  for k in sparse_keys(trained))
    torch.save({'state_dict': lidar, 'meta': {'epoch': 20, 'note': 'lidar-only'}},
               d / 'lidar_mmcv.pth')
    # camera: Microsoft's Swin release format
    swin = OrderedDict((k[len('img_backbone.'):], v) for k, v in sd.items()
                       if k.startswith('img_backbone.'))
    original = mmdet_swin_to_original(swin)
    original['head.weight'], original['head.bias'] = torch.rand(10, 128), torch.rand(10)
    torch.save({'model': original}, d / 'swin_original.pth')
    return dict(lidar=str(d / 'lidar_mmcv.pth'), swin=str(d / 'swin_original.pth'), sd=sd)


# ---------------------------------------------------------------- argument parsing

def test_parse_source_arg(tmp_path):
    assert parse_source_arg('a.pth') == {'checkpoint': 'a.pth'}
    assert parse_source_arg('modality=lidar+head,checkpoint=a.pth,strict=false') == dict(
        modality=['lidar', 'head'], checkpoint='a.pth', strict=False)
    assert parse_source_arg('modules=img_backbone,checkpoint=b.pth,prefix=backbone.:img_backbone.'
                            ',spconv-layout=mmcv,preset=swin-original') == dict(
        modules=['img_backbone'], checkpoint='b.pth', prefix={'backbone.': 'img_backbone.'},
        spconv_layout='mmcv', preset='swin-original')
    odd = tmp_path / 'x=1.pth'
    odd.write_bytes(b'')
    assert parse_source_arg(str(odd)) == {'checkpoint': str(odd)}
    assert main(['inspect', 'cfg.py', '--source', 'modality']) == 1  # not key=value


# ---------------------------------------------------------------- inspect

def test_inspect_load_from_and_hook(cfg_dir, ckpts, capsys):
    cfg = write_cfg(cfg_dir, 'train.py', f'''
        load_from = {ckpts['lidar']!r}
        custom_hooks = [dict(type='FusionLoadHook', sources=[
            dict(modality='camera', checkpoint={ckpts['swin']!r}, preset='swin-original')])]
    ''')
    assert main(['inspect', cfg, '-q']) == 0
    out = capsys.readouterr().out
    assert 'load_from: 1 source(s), ok' in out and 'FusionLoadHook: 1 source(s), ok' in out
    assert 'repaired (spconv_layout) (' in out          # MMCV kernels -> spconv 2.x
    assert 'new (6): img_backbone.norm{1..3}.bias' in out  # Swin output norms
    assert 'kept (nothing in the checkpoint)' in out     # view_transform from neither
    assert 'every load would succeed' in out
    # the checkpoint on disk is untouched by the dry run
    got = read_checkpoint(ckpts['lidar'])['state_dict']
    k = sparse_keys(fresh(cfg))[0]
    assert tuple(got[k].shape) == tuple(convert_kernel(ckpts['sd'][k], 'spconv2', 'mmcv').shape)


def test_inspect_exits_nonzero_on_bad_sources(cfg_dir, ckpts, tmp_path, capsys):
    cfg = write_cfg(cfg_dir, 'plain.py')
    assert main(['inspect', cfg, '-q', '--source',
                 f'modality=lidar,checkpoint={ckpts["lidar"]}', '--source',
                 f'modality=camera,checkpoint={ckpts["swin"]},preset=swin-original']) == 0
    assert '--source: 2 source(s), ok' in capsys.readouterr().out
    # a camera checkpoint given for the LiDAR modules: nothing lands
    js = tmp_path / 'report.json'
    assert main(['inspect', cfg, '-q', '--json', str(js), '--source',
                 f'modality=lidar,checkpoint={ckpts["swin"]}']) == 1
    out = capsys.readouterr().out
    assert 'WOULD FAIL' in out and 'no checkpoint tensor lands' in out
    report = json.loads(js.read_text())
    assert report['ok'] is False and report['groups'][0]['title'] == '--source'
    js.unlink()
    # missing and truncated files
    assert main(['inspect', cfg, '-q', '--source', str(tmp_path / 'nope.pth')]) == 1
    assert 'no such file' in capsys.readouterr().out
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(open(ckpts['lidar'], 'rb').read()[:5000])
    assert main(['inspect', cfg, '-q', '--source', f'modality=lidar,checkpoint={bad}']) == 1
    # a load_from that cannot be placed (different channels) fails the dry run too
    other = fresh(write_cfg(cfg_dir, 'wide.py', "model['fused_channels'] = 24\n"))
    torch.save({'state_dict': other.state_dict()}, tmp_path / 'wide.pth')
    cfg2 = write_cfg(cfg_dir, 'lf.py', f'load_from = {str(tmp_path / "wide.pth")!r}\n')
    assert main(['inspect', cfg2, '-q']) == 1
    out = capsys.readouterr().out
    assert 'size mismatch for fusion_layer.0.weight' in out
    assert 'no FusionLoadHook' in out


def test_inspect_load_from_mismatches_come_from_records(cfg_dir, tmp_path, capsys,
                                                       monkeypatch):
    """The load_from tensors that cannot be placed: records in the JSON, counted in the
    table row of their module, one problem line rendered from each record."""
    monkeypatch.setenv('COLUMNS', '2000')
    other = fresh(write_cfg(cfg_dir, 'wide.py', "model['fused_channels'] = 24\n"))
    path = str(tmp_path / 'wide.pth')
    torch.save({'state_dict': other.state_dict()}, path)
    cfg = write_cfg(cfg_dir, 'lf_records.py', f'load_from = {path!r}\n')
    js = tmp_path / 'r.json'
    assert main(['inspect', cfg, '-q', '--json', str(js)]) == 1
    out = capsys.readouterr().out
    (group, ) = json.loads(js.read_text())['groups']
    (src, ) = group['sources']
    bn = [[24], [16]]
    assert [[m['key'], m['checkpoint_shape'], m['model_shape'], m['kind']]
            for m in src['mismatched']] == [
        ['fusion_layer.0.weight', [24, 112, 1, 1], [16, 112, 1, 1], 'shape'],
        *[[f'fusion_layer.1.{n}', *bn, 'shape']
          for n in ('weight', 'bias', 'running_mean', 'running_var')]]
    assert src['counts']['mismatched'] == 5
    assert group['problems'] == [
        f'{path}: size mismatch for fusion_layer.0.weight: checkpoint [24, 112, 1, 1], '
        'model [16, 112, 1, 1]'] + [
        f'{path}: size mismatch for fusion_layer.1.{n}: checkpoint [24], model [16]'
        for n in ('weight', 'bias', 'running_mean', 'running_var')]
    # the row of the module (columns loaded, regenerated, mismatched, note): its
    # num_batches_tracked loads, its 5 records are mismatched
    (row, ) = [line.split() for line in out.splitlines() if line.startswith('│ fusion_layer ')]
    assert row == ['│', 'fusion_layer', '│', '1', '│', '-', '│', '5', '│', '│']


def test_inspect_shipped_centerpoint_config(tmp_path, capsys):
    """The repository's tiny CenterPoint + FusionLoadHook config, with an MMCV-layout
    LiDAR checkpoint of that very model given through --cfg-options."""
    from builders import randomize
    from mmfusionload.cli.config import build_model, load_config
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    cfg = osp.join(root, 'configs', 'lidar', 'centerpoint_tiny_cpu_fusionload.py')
    if not osp.exists(cfg):
        pytest.skip('configs/lidar/centerpoint_tiny_cpu_fusionload.py not in this tree')
    model = randomize(build_model(load_config(cfg)), seed=1)
    sd = OrderedDict((k, v) for k, v in model.state_dict().items() if k.startswith('pts_'))
    for k in sparse_keys(model):
        sd[k] = convert_kernel(sd[k], 'spconv2', 'mmcv')
    path = tmp_path / 'lidar.pth'
    torch.save({'state_dict': sd}, path)
    opt = f'custom_hooks.0.sources.0.checkpoint={path}'
    assert main(['inspect', cfg, '-q', '--cfg-options', opt]) == 0
    out = capsys.readouterr().out
    assert 'CenterPoint' in out and 'repaired (spconv_layout)' in out
    # the same file with one kernel cut short: the run would fail
    sd[sparse_keys(model)[0]] = sd[sparse_keys(model)[0]][:, :, :, :, :-1].clone()
    torch.save({'state_dict': sd}, path)
    assert main(['inspect', cfg, '-q', '--cfg-options', opt]) == 1
    assert 'WOULD FAIL' in capsys.readouterr().out


def test_inspect_cfg_options_regenerates_frustum(cfg_dir, built, tmp_path, capsys):
    cfg, trained = built
    path = tmp_path / 'whole.pth'
    torch.save({'state_dict': trained.state_dict()}, path)
    assert main(['inspect', cfg, '-q', '--source', str(path),
                 '--cfg-options', 'model.image_size=[96,160]']) == 0
    out = capsys.readouterr().out
    assert 'regenerated (' in out and 'view_transform.frustum' in out


# ---------------------------------------------------------------- convert

def test_convert_without_config_bit_exact(cfg_dir, built, ckpts, tmp_path):
    cfg, trained = built
    dst = str(tmp_path / 'lidar_spconv2.pth')
    before = digest(ckpts['lidar'])
    assert main(['convert', ckpts['lidar'], dst, '--to-layout', 'spconv2', '-q']) == 0
    assert digest(ckpts['lidar']) == before
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(dst).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    out = torch.load(dst, weights_only=False)
    assert out['meta']['epoch'] == 20 and out['meta']['note'] == 'lidar-only'
    assert out['meta']['mmfusionload']['spconv_layout'] == 'spconv2'
    state, sd = out['state_dict'], ckpts['sd']
    sparse = sparse_keys(trained)
    for k in sparse:
        assert state._metadata[k[:-len('.weight')]]['version'] == 2
    assert sorted(state) == sorted(k for k in sd if k.startswith('pts_'))
    assert all(torch.equal(state[k], sd[k]) for k in state)
    # MMDetection3D's own spconv override takes it as is (version 2: no second permute)
    model = fresh(cfg)
    model.load_state_dict(state, strict=False)
    got = model.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in state)


def test_convert_back_to_mmcv_and_presets_without_config(built, ckpts, tmp_path):
    cfg, trained = built
    sd = ckpts['sd']
    # spconv2 -> mmcv: the original LiDAR file's tensors and versions again
    mid, back = str(tmp_path / 'spconv2.safetensors'), str(tmp_path / 'mmcv.pth')
    assert main(['convert', ckpts['lidar'], mid, '--to-layout', 'spconv2', '-q']) == 0
    assert main(['convert', mid, back, '--to-layout', 'mmcv', '-q']) == 0
    orig = read_checkpoint(ckpts['lidar'])['state_dict']
    state = torch.load(back, weights_only=False)['state_dict']
    assert sorted(state) == sorted(orig) and all(torch.equal(state[k], orig[k]) for k in orig)
    assert all(state._metadata[k[:-len('.weight')]]['version'] == 1
               for k in sparse_keys(trained))
    # Swin release -> MMDetection names under img_backbone., no model needed
    dst = str(tmp_path / 'swin_mmdet.pth')
    assert main(['convert', ckpts['swin'], dst, '--preset', 'swin-original',
                 '--add-prefix', 'img_backbone.', '-q']) == 0
    state = torch.load(dst, weights_only=False)['state_dict']
    want = [k for k in sd if k.startswith('img_backbone.')
            and not re.match(r'img_backbone\.norm\d', k)]
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], sd[k]) for k in want)
    # and back off again
    dst2 = str(tmp_path / 'swin_bare.pth')
    assert main(['convert', dst, dst2, '--strip-prefix', 'img_backbone.', '-q']) == 0
    assert sorted(torch.load(dst2, weights_only=False)['state_dict']) == sorted(
        k[len('img_backbone.'):] for k in want)
    assert main(['convert', dst, str(tmp_path / 'x.pth'), '--strip-prefix', 'nope.']) == 1


def test_convert_with_config_to_safetensors(cfg_dir, built, tmp_path, capsys):
    """mit-han-lab names, MMCV kernels -> the model's names and layout, as safetensors."""
    from mmfusionload import load_sources
    from test_presets import MMDET3D_TO_MIT, renamed
    cfg, trained = built
    sd = trained.state_dict()
    mit = renamed(OrderedDict(sd), MMDET3D_TO_MIT)
    for k in sparse_keys(trained):
        mit['encoders.lidar.backbone.' + k[len('pts_middle_encoder.'):]] = convert_kernel(
            sd[k], 'spconv2', 'mmcv')
    src = tmp_path / 'bevfusion-mit.pth'
    torch.save({'state_dict': mit, 'meta': {'epoch': 6}}, src)
    dst = str(tmp_path / 'converted.safetensors')
    assert main(['convert', str(src), dst, '--preset', 'mit-bevfusion', '--config', cfg,
                 '-q']) == 0
    out = capsys.readouterr().out
    assert 'verified against the model' in out and 'permuted' in out
    back = read_checkpoint(dst)
    state = back['state_dict']
    assert back['meta']['epoch'] == '6'  # safetensors metadata are strings
    assert all(state._metadata[k[:-len('.weight')]]['version'] == 2
               for k in sparse_keys(trained))
    model = fresh(cfg)
    model.load_state_dict(state, strict=True)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    # and the loader reads it back without any layout hint
    model = fresh(cfg)
    load_sources(model, [dict(checkpoint=dst)], logger=None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_convert_refuses_and_writes_atomically(cfg_dir, built, ckpts, tmp_path, capsys):
    cfg, _ = built
    src = ckpts['lidar']
    before = digest(src)
    # never over its input
    assert main(['convert', src, src, '-q']) == 1
    assert 'never overwritten' in capsys.readouterr().out and digest(src) == before
    # the model refuses it (a LiDAR file for the whole model): nothing written
    dst = tmp_path / 'out.pth'
    assert main(['convert', src, str(dst), '--config', cfg, '-q']) == 1
    assert 'nothing written' in capsys.readouterr().out
    assert not dst.exists() and os.listdir(tmp_path) == [] and digest(src) == before
    # an existing destination survives a failed conversion unchanged
    dst.write_bytes(b'previous')
    assert main(['convert', src, str(dst), '--config', cfg, '--modality', 'camera', '-q']) == 1
    assert dst.read_bytes() == b'previous' and os.listdir(tmp_path) == ['out.pth']
    # ... and is replaced by a successful one
    assert main(['convert', src, str(dst), '--config', cfg, '--modality', 'lidar', '-q']) == 0
    assert torch.load(dst, weights_only=False)['meta']['epoch'] == 20
    assert sorted(os.listdir(tmp_path)) == ['out.pth']


# ---------------------------------------------------------------- merge

def test_merge_lidar_and_swin(cfg_dir, built, ckpts, tmp_path, capsys):
    cfg, trained = built
    out = tmp_path / 'bevfusion_init_converted.pth'
    assert main(['merge', '--config', cfg, '-o', str(out), '-q',
                 f'modality=lidar,checkpoint={ckpts["lidar"]}',
                 f'modality=camera,checkpoint={ckpts["swin"]},preset=swin-original']) == 0
    text = capsys.readouterr().out
    assert 'no source provides view_transform, fusion_layer' in text
    ckpt = torch.load(out, weights_only=False)
    meta = ckpt['meta']['mmfusionload']
    assert [s['checkpoint'] for s in meta['sources']] == [ckpts['lidar'], ckpts['swin']]
    assert meta['sources'][1]['preset'] == 'swin-original' and meta['sources'][1]['new'] == 6
    sd = ckpts['sd']
    model = fresh(cfg, seed=3)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    got = model.state_dict()
    for k, v in sd.items():
        if k.startswith('pts_') or (k.startswith('img_backbone.')
                                    and not k.startswith('img_backbone.norm')):
            assert torch.equal(got[k], v), k


def test_merge_failure_writes_nothing(cfg_dir, built, ckpts, tmp_path, capsys):
    cfg, _ = built
    out = tmp_path / 'init.pth'
    # the camera file without its preset: Microsoft's names do not fit MMDetection's Swin
    assert main(['merge', '--config', cfg, '-o', str(out), '-q',
                 f'modality=lidar,checkpoint={ckpts["lidar"]}',
                 f'modality=camera,checkpoint={ckpts["swin"]}']) == 1
    assert 'nothing written' in capsys.readouterr().out
    assert not out.exists() and os.listdir(tmp_path) == []


def test_merge_reads_each_file_once(cfg_dir, built, ckpts, tmp_path, monkeypatch):
    """One load: every source file is read (and checked) once, the destination is checked
    once; a failing merge still carries the full report and writes nothing."""
    import mmfusionload.load.pipeline as loading
    import mmfusionload.cli.merge as merge
    from mmfusionload import FusionLoadError
    cfg, _ = built
    reads, checks = [], []
    real_read, real_check = loading.read_source, merge.check_destination

    def read(spec):
        reads.append(spec.checkpoint)
        return real_read(spec)

    def check(*a, **kw):
        checks.append(a[0])
        return real_check(*a, **kw)

    monkeypatch.setattr(loading, 'read_source', read)
    monkeypatch.setattr(merge, 'check_destination', check)
    out = tmp_path / 'init.pth'
    _, report, _ = merge.merge_checkpoints(cfg, [
        dict(modality='lidar', checkpoint=ckpts['lidar']),
        dict(modality='camera', checkpoint=ckpts['swin'], preset='swin-original')], str(out))
    assert report.ok and report.applied and out.exists()
    assert reads == [ckpts['lidar'], ckpts['swin']] and checks == [str(out)]
    reads.clear(), checks.clear()
    bad = tmp_path / 'bad.pth'
    with pytest.raises(FusionLoadError, match='nothing written') as info:
        merge.merge_checkpoints(cfg, [dict(modality='lidar', checkpoint=ckpts['lidar']),
                                      dict(modality='camera', checkpoint=ckpts['swin'])],
                                str(bad))
    assert info.value.report is not None and len(info.value.report.sources) == 2
    assert not info.value.report.applied and info.value.report.problems
    assert reads == [ckpts['lidar'], ckpts['swin']] and checks == [str(bad)]
    assert not bad.exists()


# ---------------------------------------------------------------- a real process

def test_python_m_mmfusionload_subprocess(cfg_dir, built, ckpts, tmp_path):
    cfg, _ = built
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(cfg_dir), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    dst = tmp_path / 'lidar.safetensors'
    cmd = [sys.executable, '-m', 'mmfusionload', 'convert', ckpts['lidar'], str(dst),
           '--config', cfg, '--modality', 'lidar']
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                         cwd=osp.dirname(osp.dirname(osp.abspath(__file__))))
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'wrote' in res.stdout and dst.exists()
    # the exit status of a refusal reaches the shell (no model is built for it)
    before = digest(dst)
    res = subprocess.run(cmd[:4] + [str(dst), str(dst)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and 'never overwritten' in res.stdout and digest(dst) == before


# ---------------------------------------------------------------- errors and summaries

def test_bad_usage_exits_2(cfg_dir, ckpts, capsys):
    cfg = write_cfg(cfg_dir, 'usage.py')
    src = ckpts['lidar']
    # options that need --config
    assert main(['convert', src, 'out.pth', '--modality', 'lidar']) == 2
    assert 'need --config' in capsys.readouterr().out
    # a --source that is not a source
    assert main(['inspect', cfg, '-q', '--source', f'checkpoint={src},colour=blue']) == 2
    assert "unknown source option(s) ['colour']" in capsys.readouterr().out
    assert main(['inspect', cfg, '-q', '--source', f'checkpoint={src},strict=maybe']) == 2
    assert main(['merge', '--config', cfg, '-o', 'x.pth', f'checkpoint={src},prefix=a.']) == 2
    with pytest.raises(SystemExit) as exit_:  # argparse: missing argument
        main(['inspect'])
    assert exit_.value.code == 2
    assert not osp.exists('out.pth') and not osp.exists('x.pth')


BROKEN = '''
from mmfl_cli_absent_dependency import something  # noqa: F401
'''


def test_error_prints_the_chain_of_causes_and_debug_the_traceback(cfg_dir, capsys):
    (cfg_dir / 'mmfl_cli_broken.py').write_text(BROKEN)
    cfg = write_cfg(cfg_dir, 'broken.py', '''
        custom_imports = dict(imports=['mmfl_cli_broken'], allow_failed_imports=False)
    ''')
    assert main(['inspect', cfg, '-q']) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith('error: ImportError: Failed to import mmfl_cli_broken [')
    cause = [line for line in err if line.startswith('  caused by ')]
    assert cause and cause[-1].startswith(
        "  caused by ModuleNotFoundError: No module named 'mmfl_cli_absent_dependency' [")
    assert cause[-1].endswith('mmfl_cli_broken.py:2]')
    assert 'Traceback' not in '\n'.join(err) and err[-1] == '(--debug shows the traceback)'
    with pytest.raises(ImportError, match='Failed to import mmfl_cli_broken'):
        main(['inspect', cfg, '-q', '--debug'])
    with pytest.raises(ImportError):
        main(['--debug', 'inspect', cfg, '-q'])


_WIDE = textwrap.dedent('''
    model['pts_backbone'].update(out_channels=[24, 48])
    model['pts_neck'].update(in_channels=[24, 48], out_channels=[24, 24])
    model['fused_channels'] = 24
''')


def _wide_cfg(cfg_dir):
    return write_cfg(cfg_dir, 'wide_lidar.py', _WIDE)


def test_inspect_sums_up_a_different_model_size(cfg_dir, ckpts, tmp_path, capsys, monkeypatch):
    """Tensors of a narrower model of the same architecture: one line, full list in JSON."""
    monkeypatch.setenv('COLUMNS', '2000')
    cfg = _wide_cfg(cfg_dir)
    js = tmp_path / 'wide.json'
    assert main(['inspect', cfg, '-q', '--json', str(js), '--source',
                 f'modality=lidar,checkpoint={ckpts["lidar"]}']) == 1
    out = capsys.readouterr().out
    report = json.loads(js.read_text())
    (src,) = report['groups'][0]['sources']
    n = len(src['mismatched'])
    assert n >= 8 and src['counts']['mismatched'] == n
    (line,) = [p for p in report['groups'][0]['problems'] if 'differ in width' in p]
    assert f'{n} tensors of 2 module(s) (pts_backbone, pts_neck) differ in width: a ' \
           'different model size? e.g. pts_backbone.' in line
    # summed up among the problems; the details show the first 3 records
    assert out.count('size mismatch for') == 3 and out.count('differ in width') == 1
    # the same through load_from (the hook's repair): one line too
    whole = tmp_path / 'narrow_whole.pth'
    torch.save({'state_dict': ckpts['sd']}, whole)
    lf = write_cfg(cfg_dir, 'wide_load_from.py', _WIDE + f'load_from = {str(whole)!r}\n')
    assert main(['inspect', lf, '-q']) == 1
    out = capsys.readouterr().out
    assert out.count('differ in width: a different model size?') == 1
    assert out.count('size mismatch for') == 3  # the first of the details, then '… N more'


def test_inspect_overlap_one_line_per_pair_and_allow_overlap(cfg_dir, ckpts, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setenv('COLUMNS', '2000')  # one problem, one printed line
    cfg = write_cfg(cfg_dir, 'overlap.py')
    other = tmp_path / 'lidar_copy.pth'
    other.write_bytes(open(ckpts['lidar'], 'rb').read())
    args = ['inspect', cfg, '-q', '--source', f'modality=lidar,checkpoint={ckpts["lidar"]}',
            '--source', f'modules=pts_backbone+pts_neck,checkpoint={other}']
    assert main(args) == 1
    lines = [x for x in capsys.readouterr().out.splitlines() if 'written by both' in x]
    assert len(lines) == 1
    assert re.search(r'problem: \d+ tensors \(pts_backbone\..*\) are written by both '
                     rf'{re.escape(ckpts["lidar"])} and {re.escape(str(other))} '
                     r'\(allow_overlap=True lets the later win\)', lines[0]), lines[0]
    assert main(args + ['--allow-overlap']) == 0
    assert 'every load would succeed' in capsys.readouterr().out


@pytest.mark.parametrize('sources', ['dict', 'str'])
def test_sources_not_a_list_is_one_clear_message(cfg_dir, ckpts, capsys, sources):
    from mmfusionload import FusionLoadError, FusionLoadHook, load_sources
    value = (f"dict(modality='lidar', checkpoint={ckpts['lidar']!r})" if sources == 'dict'
             else repr(ckpts['lidar']))
    cfg = write_cfg(cfg_dir, f'not_a_list_{sources}.py', f'''
        custom_hooks = [dict(type='FusionLoadHook', sources={value})]
    ''')
    assert main(['inspect', cfg, '-q']) == 1
    out = capsys.readouterr().out
    kind = 'a single dict' if sources == 'dict' else 'a path string'
    assert out.count('sources must be a list of source dicts') == 1 and kind in out
    spec = eval(value)  # noqa: S307  (the test's own literal)
    for call in (lambda: FusionLoadHook(sources=spec),
                 lambda: load_sources(torch.nn.Linear(1, 1), spec, dry_run=True, logger=None)):
        with pytest.raises(FusionLoadError) as info:
            call()
        assert len(info.value.problems) == 1 and kind in info.value.problems[0]


# ---------------------------------------------------------------- every load: init_cfg

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
RETINANET = osp.join(REPO, 'configs', 'efficientvit', 'retinanet_efficientvit-m4_fpn_1x_coco.py')


def test_inspect_checks_our_pretrained_init_cfg(tmp_path, monkeypatch, capsys):
    """EfficientViT's init_cfg=Pretrained: a missing file fails the dry run; a Cream-style
    file passes, planned through load_sources."""
    from mmfusionload.models.efficientvit import EfficientViT
    monkeypatch.chdir(tmp_path)  # the config's pretrained/efficientvit_m4.pth is relative
    monkeypatch.setenv('COLUMNS', '2000')
    assert main(['inspect', RETINANET, '-q']) == 1
    out = capsys.readouterr().out
    assert 'init_cfg (Pretrained): 0 source(s), WOULD FAIL' in out or \
        'init_cfg (Pretrained): 1 source(s), WOULD FAIL' in out
    assert 'backbone.init_cfg: pretrained/efficientvit_m4.pth' in out and 'no such file' in out
    assert 'the run would FAIL' in out
    (tmp_path / 'pretrained').mkdir()
    state = EfficientViT(arch='m4', img_size=None).state_dict()
    torch.save({'model': state}, tmp_path / 'pretrained' / 'efficientvit_m4.pth')
    assert main(['inspect', RETINANET, '-q']) == 0
    out = capsys.readouterr().out
    assert 'init_cfg (Pretrained): 1 source(s), ok' in out
    assert '[backbone.init_cfg] pretrained/efficientvit_m4.pth' in out
    assert 'every load would succeed' in out


def test_inspect_checks_mmengine_pretrained_init_cfg(cfg_dir, built, tmp_path, capsys,
                                                     monkeypatch):
    """A module of another library with init_cfg=Pretrained (MMEngine's PretrainedInit):
    prefix honoured, a missing file and tensors MMEngine would skip fail the dry run."""
    monkeypatch.setenv('COLUMNS', '2000')
    _, trained = built
    whole = tmp_path / 'whole.pth'
    torch.save({'state_dict': trained.state_dict()}, whole)

    def cfg_with(path, extra=''):  # SECONDFPN keeps the init_cfg it is given
        return write_cfg(cfg_dir, 'pre.py', textwrap.dedent(f'''
            model['pts_neck']['init_cfg'] = dict(
                type='Pretrained', checkpoint={str(path)!r}, prefix='pts_neck.')
        ''') + textwrap.dedent(extra))

    assert main(['inspect', cfg_with(whole), '-q']) == 0
    out = capsys.readouterr().out
    n = len([k for k in trained.state_dict() if k.startswith('pts_neck.')])
    assert 'init_cfg (Pretrained): 1 source(s), ok' in out
    assert '[pts_neck.init_cfg] ' in out and 'every load would succeed' in out
    assert re.search(rf'│ deblocks\s+│\s+{n} │', out), out
    assert main(['inspect', cfg_with(tmp_path / 'absent.pth'), '-q']) == 1
    assert 'no such file' in capsys.readouterr().out
    # a wider neck: every tensor would be skipped by MMEngine
    wide = cfg_with(whole, '''
        model['pts_neck'].update(out_channels=[24, 24])
    ''')
    assert main(['inspect', wide, '-q']) == 1
    assert 'differ in width: a different model size?' in capsys.readouterr().out


# ---------------------------------------------------------------- structure-only

def test_inspect_structure_only_when_compiled_ops_are_not_built(tmp_path):
    """A BEVFusion-structured project whose compiled op is not built: inspect builds the
    model with a stand-in for it, says so in one line, and its exit status is the
    verdict on the loads."""
    import importlib
    from bevfusion_tree import write_tree
    from mmdet3d.registry import MODELS
    import mmdet3d.models  # noqa: F401  (SECOND, SECONDFPN)
    root = write_tree(tmp_path / 'mmdetection3d', package=True)
    # the project does not import here, for the reason a machine without built ops gives
    sys.path.insert(0, str(root))
    try:
        with pytest.raises(ImportError, match="cannot import name 'bev_pool_ext'"):
            importlib.import_module('projects.BEVFusion.bevfusion')
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == 'projects' or m.startswith('projects.')]:
            del sys.modules[name]
    backbone = dict(type='SECOND', in_channels=8, out_channels=[8, 16], layer_nums=[1, 1],
                    layer_strides=[1, 2])
    neck = dict(type='SECONDFPN', in_channels=[8, 16], out_channels=[8, 8],
                upsample_strides=[1, 2])
    state = OrderedDict()
    for name, cfg in (('pts_backbone', backbone), ('pts_neck', neck)):
        for k, v in MODELS.build(cfg).state_dict().items():
            state[f'{name}.{k}'] = v
    torch.save({'state_dict': state}, tmp_path / 'lidar.pth')
    narrow = OrderedDict((k, v[:4] if k == 'pts_neck.deblocks.0.1.weight' else v)
                         for k, v in state.items())
    torch.save({'state_dict': narrow}, tmp_path / 'bad.pth')
    (root / 'fusion.py').write_text(textwrap.dedent(f'''
        custom_imports = dict(imports=['projects.BEVFusion.bevfusion', 'mmfusionload'],
                              allow_failed_imports=False)
        default_scope = 'mmdet3d'
        model = dict(type='BEVFusion', pts_backbone={backbone!r}, pts_neck={neck!r})
        custom_hooks = [dict(type='FusionLoadHook', sources=[
            dict(modality='lidar', checkpoint={str(tmp_path / 'lidar.pth')!r})])]
    '''))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in [REPO, os.environ.get('PYTHONPATH', '')] if p), COLUMNS='2000')
    run = [sys.executable, '-m', 'mmfusionload', 'inspect', 'fusion.py', '-q']
    ok = subprocess.run(run, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = ('structure-only: 1 compiled op(s) replaced by stand-ins: '
            'projects.BEVFusion.bevfusion.bev_pool.bev_pool_ext (not built here')
    assert ok.stdout.count(line) == 1, ok.stdout
    assert 'FusionLoadHook: 1 source(s), ok' in ok.stdout
    assert 'every load would succeed' in ok.stdout
    bad = subprocess.run(run + ['--cfg-options',
                                f'custom_hooks.0.sources.0.checkpoint={tmp_path / "bad.pth"}'],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert line in bad.stdout and 'size mismatch for pts_neck.deblocks.0.1.weight' in bad.stdout


def test_convert_weights_picks_the_copy(tmp_path):
    """``convert --weights``: a timm file's ``state_dict`` (raw) and ``state_dict_ema``
    (averaged) each written out exactly; ``auto`` takes what timm deploys, the EMA copy."""
    raw = OrderedDict(fc_weight=torch.randn(4, 3), fc_bias=torch.randn(4))
    raw = OrderedDict((k.replace('_', '.'), v) for k, v in raw.items())
    ema = OrderedDict((k, v * 0.5 + 1) for k, v in raw.items())
    src = str(tmp_path / 'timm.pth')
    torch.save({'state_dict': raw, 'state_dict_ema': ema, 'epoch': 3, 'arch': 'x'}, src)
    for weights, expected in (('raw', raw), ('ema', ema), ('auto', ema)):
        dst = str(tmp_path / f'{weights}.pth')
        argv = ['convert', src, dst, '-q'] + ([] if weights == 'auto' else ['--weights', weights])
        assert main(argv) == 0
        out = read_checkpoint(dst)
        got = out['state_dict']
        assert list(got) == list(expected)
        for k, v in expected.items():
            assert torch.equal(got[k], v), (weights, k)
        taken = 'state_dict:' if weights == 'raw' else 'state_dict_ema:'
        assert out['meta']['mmfusionload']['weights'].startswith(taken)
    plain = str(tmp_path / 'plain.pth')
    torch.save({'state_dict': raw}, plain)
    assert main(['convert', plain, str(tmp_path / 'no.pth'), '-q', '--weights', 'ema']) == 1
    assert not osp.exists(tmp_path / 'no.pth')
