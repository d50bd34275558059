"""Load-time and memory benchmark: BEVFusion-size checkpoints, several ways of loading them.

Run from the repository root::

    .venv/bin/python benchmarks/bench_load.py            # full run (~8 min on 2 cores)
    .venv/bin/python benchmarks/bench_load.py --quick    # smoke run (~1 min)

What it measures. The model is :class:`ManifestModel`: MMDetection3D's BEVFusion lidar-cam
state dict (``tests/data/manifests/mmdet3d_bevfusion_lidar-cam_spconv2.json``, 582 tensors,
40.8M parameters) with real modules where :mod:`mmfusionload.cli.demo` has them (Swin-T
``img_backbone``, spconv ``pts_middle_encoder``, ``SECOND``, ``SECONDFPN``, ``fusion_layer``)
and plain Parameters/buffers at the manifest's names and shapes for the rest (``img_neck``,
``view_transform``, ``bbox_head``). Its keys, shapes and dtypes are checked against the
manifest. The checkpoints hold random values:

* ``lidar_mmcv.pth`` / ``.safetensors``: ``pts_*`` and ``bbox_head``, sparse kernels in MMCV's
  ``[*k, in, out]`` layout, ``_metadata`` version 1 (as an MMCV-era LiDAR run saves them);
* ``camera_backbone.pth`` / ``.safetensors``: the Swin-T under MMDetection's ``backbone.``;
* ``converted.pth``: the same tensors already in the model's names and layout.

Variants, each in a fresh process (this script with ``--variant``), alternated, ``--repeats``
times; time is the load call only; peak RSS is the process's RSS high-water mark during the
load (``VmHWM``, reset with ``/proc/self/clear_refs`` after building the model; that is the
number ``ru_maxrss`` reports, but a child's ``ru_maxrss`` also carries its parent's peak
through ``exec``) minus the RSS after building the model:

* ``a``  floor: ``torch.load(mmap=True, weights_only=True)`` + ``load_state_dict(strict=False)``
  of ``converted.pth``;
* ``b``  ``mmengine.runner.load_checkpoint(model, 'converted.pth')``, what users run today;
* ``c``  :func:`mmfusionload.load_sources` with the LiDAR (``modality=['lidar', 'head']``)
  and camera (``modality='camera'``) files, every repair (layout, prefix, validation);
* ``c_st`` the same from the ``.safetensors`` files;
* ``c_nv`` ``c`` with ``verify=False``: the cost of proving the 21 converted sparse kernels
  by function is ``c - c_nv``;
* ``d``  ``FusionLoadHook`` in an MMEngine ``Runner``: ``runner.load_or_resume()`` and
  then the timed part, ``runner.call_hook('before_test')`` (what ``runner.test()`` runs
  first): the load, the report in the log and its JSON file;
* ``e``  the common fusion load: :func:`mmfusionload.load_sources` with two sources of one
  file, ``converted.pth`` (``modality=['lidar', 'head', 'fusion']`` and ``modality='camera'``),
  with ``verify='auto'`` (the default: on for every converted tensor; here none is);
* ``e_v``  ``e`` with ``verify=True``: every sparse kernel proved by a probe forward, although
  none was converted (``'auto'``, the default, proves the converted ones: here none);
* ``e_nc`` the same without the NaN/Inf check (``allow_nonfinite=True``): what the check,
  which has to read every tensor before anything is written, costs;
* ``r_a``, ``r_b``, ``r_e``: ``a``, ``b`` and ``e`` in a process like a Runner's: MMEngine,
  MMDetection3D's models (``mmdet3d.models``, every module registered) and this package
  imported, and no ``gc.collect()`` before the timed call (a Runner collects nothing
  before loading), so the cyclic collector runs over everything those imports hold
  whenever the load's allocations trigger it;
* ``copy`` the physical limit: one copy of the loaded bytes between two preallocated,
  already written buffers (``Tensor.copy_``), timed the same way.

The scaling table loads (variant ``c``) checkpoints of 0.25x, 1x and 4x BEVFusion's bytes:
the model there is :class:`ScaledModel`, the manifest with every tensor's first dimension
multiplied by one factor (chosen so the files hold 0.25x/1x/4x the bytes) as plain
Parameters/buffers, except the spconv ``pts_middle_encoder``, which stays real (and 1x) so
the layout repair runs at every size.

Page cache: the files are written first, so every read is from a warm page cache (the
common case in a training job that just downloaded or wrote them).
"""
import argparse
import gc
import json
import os
import os.path as osp
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MANIFEST = osp.join(ROOT, 'tests', 'data', 'manifests',
                    'mmdet3d_bevfusion_lidar-cam_spconv2.json')
MANIFEST_MMCV = osp.join(ROOT, 'tests', 'data', 'manifests',
                         'mmdet3d_bevfusion_lidar-cam_mmcv.json')
VARIANTS = ('a', 'b', 'c', 'c_st', 'c_nv', 'd', 'e', 'e_nc', 'e_v', 'r_a', 'r_b', 'r_e', 'copy')
TARGETS_VERIFY = 0.20  # (c - c_nv) / c_nv
REAL = ('img_backbone', 'pts_voxel_encoder', 'pts_middle_encoder', 'pts_backbone', 'pts_neck',
        'fusion_layer')
LIDAR = ('pts_', 'bbox_head.')
TARGETS = dict(ratio_c_a=1.10, ratio_c_b=0.5, ratio_e_a=1.0, rss_ratio=1.0, linearity=1.25,
               ratio_re_ra=1.10, ratio_re_rb=0.6)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


# ---------------------------------------------------------------- the models
def _manifest(path: str = MANIFEST) -> dict:
    with open(path) as f:
        return json.load(f)


class TensorTree(nn.Module):
    """Plain Parameters and buffers at given names and shapes (no forward)."""


def add_tensor(root: nn.Module, key: str, shape: Sequence[int], dtype: str, kind: str) -> None:
    """Create ``key`` (a Parameter or buffer of ``shape``/``dtype``) under ``root``."""
    *path, leaf = key.split('.')
    mod = root
    for name in path:
        if name not in mod._modules:
            mod.add_module(name, TensorTree())
        mod = mod._modules[name]
    t = torch.zeros(tuple(shape), dtype=getattr(torch, dtype))
    if kind == 'param' and t.is_floating_point():
        mod.register_parameter(leaf, nn.Parameter(t))
    else:
        mod.register_buffer(leaf, t)


class ManifestModel(nn.Module):
    """BEVFusion's state dict: real modules where the demo has them, plain tensors elsewhere."""

    def __init__(self):
        super().__init__()
        from mmfusionload.cli.demo import BEVFusionLike
        real = BEVFusionLike()
        for name in REAL:
            self.add_module(name, getattr(real, name))
        man = _manifest()
        for t in man['tensors']:
            if not t['key'].startswith(tuple(n + '.' for n in REAL)):
                add_tensor(self, t['key'], t['shape'], t['dtype'], t['kind'])
        mine = {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in self.state_dict().items()}
        want = {t['key']: (tuple(t['shape']), t['dtype']) for t in man['tensors']}
        assert mine == want, 'ManifestModel differs from the manifest: ' + str(
            sorted(set(mine.items()) ^ set(want.items()))[:5])


def scale_factor(scale: float) -> float:
    """First-dimension factor for the plain tensors so the files hold ``scale`` x the bytes."""
    man = _manifest()
    nbytes = {t['key']: 4 * _numel(t['shape']) for t in man['tensors']}
    loaded = [k for k in nbytes if k.startswith(LIDAR + ('img_backbone.', ))]
    fixed = sum(nbytes[k] for k in loaded if k.startswith('pts_middle_encoder.'))
    plain = sum(nbytes[k] for k in loaded) - fixed
    return (scale * (plain + fixed) - fixed) / plain


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ScaledModel(nn.Module):
    """The manifest's tensors with the first dimension scaled (plain), spconv encoder real."""

    def __init__(self, scale: float):
        super().__init__()
        from mmfusionload.cli.demo import SPARSE_ENCODER, build
        self.pts_middle_encoder = build(SPARSE_ENCODER)
        f = scale_factor(scale)
        for t in _manifest()['tensors']:
            if t['key'].startswith('pts_middle_encoder.'):
                continue
            shape = list(t['shape'])
            if shape:
                shape[0] = max(1, round(shape[0] * f))
            add_tensor(self, t['key'], shape, t['dtype'], t['kind'])


def build_model(scale: float = 1.0) -> nn.Module:
    return ManifestModel() if scale == 1.0 else ScaledModel(scale)


# ---------------------------------------------------------------- the files
def paths(work_dir: str, scale: float) -> Dict[str, str]:
    tag = '' if scale == 1.0 else f'_x{scale:g}'
    return {name: osp.join(work_dir, f'{name}{tag}{ext}') for name, ext in (
        ('lidar', '.pth'), ('camera', '.pth'), ('converted', '.pth'),
        ('lidar_st', '.safetensors'), ('camera_st', '.safetensors'))}


def _random_state(model: nn.Module, seed: int = 1) -> 'OrderedDict[str, torch.Tensor]':
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            t = torch.rand(v.shape, generator=g) * 2 - 1
            if 'running_var' in k:
                t = t.abs_() + 0.5
            out[k] = t
        else:
            out[k] = v.clone()
    return out


def make_checkpoints(work_dir: str, scale: float = 1.0, safetensors: bool = True) -> Dict[str, int]:
    """Write the benchmark files for ``scale``; returns their sizes in bytes."""
    from safetensors.torch import save_file

    from mmfusionload.cli.demo import to_mmcv_layout
    p = paths(work_dir, scale)
    if all(osp.exists(v) for k, v in p.items() if safetensors or not k.endswith('_st')):
        return {k: os.path.getsize(v) for k, v in p.items() if osp.exists(v)}
    model = build_model(scale)
    sd = _random_state(model)
    sparse = _manifest(MANIFEST_MMCV)['sparse_conv_modules']
    lidar = to_mmcv_layout(OrderedDict((k, v) for k, v in sd.items() if k.startswith(LIDAR)),
                           model)
    lidar._metadata = OrderedDict((m, {'version': v}) for m, v in sparse.items())
    camera = OrderedDict(('backbone.' + k[len('img_backbone.'):], v) for k, v in sd.items()
                         if k.startswith('img_backbone.'))
    converted = OrderedDict((k, v) for k, v in sd.items()
                            if k.startswith(LIDAR + ('img_backbone.', )))
    # as a model's state_dict() records them: spconv reads the version to know the layout
    converted._metadata = model.state_dict()._metadata
    torch.save({'state_dict': lidar, 'meta': {'epoch': 20}}, p['lidar'])
    torch.save({'state_dict': camera, 'meta': {}}, p['camera'])
    torch.save({'state_dict': converted, 'meta': {}}, p['converted'])
    if safetensors:
        save_file(dict(lidar), p['lidar_st'],
                  metadata={'module_versions': json.dumps(sparse)})
        save_file(dict(camera), p['camera_st'])
    del model, sd, lidar, camera, converted
    gc.collect()
    return {k: os.path.getsize(v) for k, v in p.items() if osp.exists(v)}


def loaded_bytes(work_dir: str, scale: float) -> int:
    """Bytes of tensor data every variant loads (the converted file's tensors)."""
    sd = torch.load(paths(work_dir, scale)['converted'], mmap=True, weights_only=True)
    return sum(t.numel() * t.element_size() for t in sd['state_dict'].values())


# ---------------------------------------------------------------- one measurement (child)
def _status_kb(field_name: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    raise KeyError(field_name)


def _reset_peak() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def common_sources(path: str, variant: str) -> List[dict]:
    """Variant ``e``: the fusion load's two sources, both from one file, ``verify='auto'``
    (the default); ``e_nc``: without the NaN/Inf check; ``e_v``: ``verify=True``."""
    extra: dict = dict(verify=True if variant == 'e_v' else 'auto')
    if variant == 'e_nc':
        extra['allow_nonfinite'] = True
    return [dict(modality=['lidar', 'head', 'fusion'], checkpoint=path, **extra),
            dict(modality='camera', checkpoint=path, **extra)]


def run_copy(work_dir: str, scale: float) -> dict:
    """Time one ``copy_`` of the loaded bytes between two warm, preallocated buffers."""
    n = loaded_bytes(work_dir, scale)
    src = torch.empty(n, dtype=torch.uint8).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8).fill_(0)
    dst.copy_(src)  # every page of both already touched
    gc.collect()
    reset = _reset_peak()
    base_kb = _status_kb('VmRSS')
    t0 = time.perf_counter()
    dst.copy_(src)
    elapsed = time.perf_counter() - t0
    peak_kb = _status_kb('VmHWM') if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(variant='copy', scale=scale, time_s=elapsed,
                extra_rss=max(0, peak_kb - base_kb) * 1024, peak_reset=reset)


def run_variant(variant: str, work_dir: str, scale: float, check: bool = True) -> dict:
    """Build the model, load the variant's files, return time and peak RSS above the model."""
    if variant == 'copy':
        return run_copy(work_dir, scale)
    import logging

    from mmengine.logging import MMLogger
    from mmengine.runner import load_checkpoint

    import mmfusionload
    from mmfusionload import FusionLoadHook, load_sources
    from mmfusionload.sparse.compat import patch_spconv_cpu_stream
    patch_spconv_cpu_stream()
    MMLogger.get_instance('mmengine', log_level='WARNING')
    runner_like = variant.startswith('r_')
    if runner_like:  # what a Runner's process has imported before it loads
        import mmdet3d.models  # noqa: F401
        import mmengine.runner  # noqa: F401
        variant = variant[2:]
    p = paths(work_dir, scale)
    model = build_model(scale)
    lidar_src = dict(modality=['lidar', 'head'], checkpoint=p['lidar'])
    camera_src = dict(modality='camera', checkpoint=p['camera'])
    common = common_sources(p['converted'], variant)
    runner = None
    if variant == 'd':
        from mmengine.runner import Runner
        hook = FusionLoadHook(sources=[lidar_src, camera_src])
        runner = Runner(model=model, work_dir=tempfile.mkdtemp(prefix='mmfl_bench_runner_'),
                        custom_hooks=[hook], default_scope='mmdet3d',
                        log_level='WARNING', env_cfg=dict(dist_cfg=dict(backend='gloo')))
        runner.load_or_resume()
        logging.getLogger().setLevel(logging.WARNING)
    if not runner_like:
        gc.collect()
    reset = _reset_peak()
    base_kb = _status_kb('VmRSS')
    t0 = time.perf_counter()
    if variant == 'a':
        sd = torch.load(p['converted'], mmap=True, weights_only=True)
        model.load_state_dict(sd['state_dict'], strict=False)
    elif variant == 'b':
        load_checkpoint(model, p['converted'], map_location='cpu', strict=False,
                        logger='silent')
    elif variant == 'c':
        load_sources(model, [lidar_src, camera_src], logger=None)
    elif variant == 'c_nv':
        load_sources(model, [dict(lidar_src, verify=False), dict(camera_src, verify=False)],
                     logger=None)
    elif variant == 'c_st':
        load_sources(model, [dict(lidar_src, checkpoint=p['lidar_st']),
                             dict(camera_src, checkpoint=p['camera_st'])], logger=None)
    elif variant == 'd':
        runner.call_hook('before_test')
    elif variant in ('e', 'e_nc', 'e_v'):
        load_sources(model, common, logger=None)
    else:
        raise ValueError(variant)
    elapsed = time.perf_counter() - t0
    # VmHWM is the high-water mark clear_refs reset; ru_maxrss would also report the
    # parent's peak, which a child inherits through exec
    peak_kb = _status_kb('VmHWM') if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = dict(variant=('r_' if runner_like else '') + variant, scale=scale, time_s=elapsed,
               extra_rss=max(0, peak_kb - base_kb) * 1024, peak_reset=reset,
               mmfusionload=mmfusionload.__version__,
               verify={'e_v': True}.get(variant, 'auto'))
    if check:  # not timed: the model holds the converted checkpoint's values
        ref = torch.load(p['converted'], mmap=True, weights_only=True)['state_dict']
        sd = model.state_dict()
        out['correct'] = all(torch.equal(sd[k], v) for k, v in ref.items()
                             if not k.endswith('relative_position_index'))
    return out


def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    if args.make:
        sizes = make_checkpoints(args.work_dir, args.scale, safetensors=not args.no_safetensors)
        print('RESULT ' + json.dumps(dict(sizes=sizes, bytes=loaded_bytes(args.work_dir,
                                                                         args.scale))))
        return
    res = run_variant(args.variant, args.work_dir, args.scale, check=not args.no_check)
    print('RESULT ' + json.dumps(res), flush=True)


# ---------------------------------------------------------------- the driver (parent)
def spawn(variant: str, work_dir: str, scale: float, threads: int, check: bool,
          extra: Sequence[str] = ()) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONWARNINGS='ignore')
    cmd = [sys.executable, osp.abspath(__file__), '--variant', variant, '--work-dir', work_dir,
           '--scale', str(scale), '--threads', str(threads)] + ([] if check else ['--no-check'])
    cmd += list(extra)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'variant {variant} (scale {scale}) failed:\n{proc.stdout[-3000:]}\n'
                       f'{proc.stderr[-3000:]}')


def _stats(values: List[float]) -> Tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _fmt_t(values: List[float]) -> str:
    med, lo, hi = _stats(values)
    return f'{med * 1000:.0f} ms ({lo * 1000:.0f}-{hi * 1000:.0f})'


def _fmt_mb(values: List[float]) -> str:
    med, lo, hi = _stats(values)
    return f'{med / 2**20:.0f} MiB ({lo / 2**20:.0f}-{hi / 2**20:.0f})'


def measure(variants: Sequence[str], work_dir: str, scale: float, repeats: int, threads: int,
            log) -> Dict[str, List[dict]]:
    results: Dict[str, List[dict]] = {v: [] for v in variants}
    for r in range(repeats):
        for v in (variants if r % 2 == 0 else list(reversed(variants))):
            res = spawn(v, work_dir, scale, threads, check=(r == 0))
            results[v].append(res)
            log(f'  repeat {r + 1}/{repeats} {v:5s} x{scale:g}: {res["time_s"] * 1000:7.1f} ms, '
                f'+{res["extra_rss"] / 2**20:6.1f} MiB'
                + ('' if 'correct' not in res else f', correct={res["correct"]}'))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=None,
                        help='fresh processes per variant (default 5, --quick 2)')
    parser.add_argument('--quick', action='store_true',
                        help='2 repeats, scaling at 0.25x and 1x only')
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--scales', default=None, help='default 0.25,1,4 (quick: 0.25,1)')
    parser.add_argument('--no-scaling', action='store_true')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    parser.add_argument('--work-dir', default=None,
                        help='where the checkpoints go (default: a temporary directory)')
    parser.add_argument('--keep', action='store_true', help='keep the checkpoints')
    parser.add_argument('--json', default=None, help='also write the results here')
    # child mode
    parser.add_argument('--variant', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--scale', type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument('--no-check', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--make', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--no-safetensors', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant or args.make:
        child_main(args)
        return 0

    from rich.console import Console
    from rich.table import Table
    console = Console(width=max(Console().width, 120))
    repeats = args.repeats or (2 if args.quick else 5)
    scales = [float(s) for s in
              (args.scales or ('0.25,1' if args.quick else '0.25,1,4')).split(',')]
    variants = [v for v in args.variants.split(',') if v]
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='mmfl_bench_')
    os.makedirs(work_dir, exist_ok=True)
    t_start = time.perf_counter()
    console.print(f'checkpoints in {work_dir}; torch {torch.__version__}, {os.cpu_count()} CPUs, '
                  f'{args.threads} torch thread(s), {repeats} repeats')
    made = spawn('make', work_dir, 1.0, args.threads, False, ['--make'])
    sizes, nbytes = made['sizes'], made['bytes']
    console.print('BEVFusion-size files: ' + ', '.join(
        f'{k} {v / 2**20:.1f} MiB' for k, v in sizes.items()) +
        f'; {nbytes / 2**20:.1f} MiB of tensors loaded by every variant')
    res = measure(variants, work_dir, 1.0, repeats, args.threads, console.print)

    names = {'a': '(a) floor: torch.load(mmap) + load_state_dict',
             'b': '(b) mmengine load_checkpoint',
             'c': '(c) load_sources, 2 files, all repairs (.pth)',
             'c_st': '(c) load_sources, 2 files, all repairs (.safetensors)',
             'c_nv': '(c) load_sources, .pth, verify=False',
             'd': '(d) FusionLoadHook in a Runner (before_test)',
             'e': '(e) load_sources, 2 sources of 1 file (lidar+head+fusion, camera), '
                  "verify='auto'",
             'e_v': '(e) with verify=True: all 21 sparse kernels proved by a probe',
             'e_nc': '(e) without the NaN/Inf check (allow_nonfinite=True)',
             'r_a': '(a) floor, in a Runner-like process (mmdet3d imported, no gc.collect)',
             'r_b': '(b) mmengine load_checkpoint, in a Runner-like process',
             'r_e': '(e) the common fusion load, in a Runner-like process',
             'copy': 'plain copy of the same bytes between warm buffers'}
    table = Table(title=f'Loading BEVFusion ({nbytes / 2**20:.0f} MiB of tensors), '
                  f'median (min-max) of {repeats} fresh processes')
    for col in ('variant', 'time', 'peak RSS above model', '/ checkpoint bytes', 'correct'):
        table.add_column(col, justify='left' if col == 'variant' else 'right')
    med = {}
    for v in variants:
        times = [r['time_s'] for r in res[v]]
        rss = [r['extra_rss'] for r in res[v]]
        med[v] = (statistics.median(times), statistics.median(rss))
        ok = res[v][0].get('correct')
        table.add_row(names[v], _fmt_t(times),
                      '-' if v == 'copy' else _fmt_mb(rss),
                      '-' if v == 'copy' else f'{med[v][1] / nbytes:.2f}',
                      '-' if ok is None else ('yes' if ok else 'NO'))
    console.print(table)
    summary: Dict[str, object] = dict(bytes=nbytes, files=sizes, repeats=repeats,
                                      threads=args.threads, results=res)
    if 'e' in med and 'e_nc' in med:
        summary['check_ms'] = (med['e'][0] - med['e_nc'][0]) * 1000
        console.print(f'the NaN/Inf check, a read of every loaded byte before any write: '
                      f'{summary["check_ms"]:.0f} ms of (e)\'s {med["e"][0] * 1000:.0f} ms')
    if 'copy' in med:
        summary['gap_to_copy_ms'] = {v: (med[v][0] - med['copy'][0]) * 1000
                                     for v in med if v != 'copy'}
        for v in ('a', 'e'):
            if v in med:
                console.print(f'gap to a plain copy of the same {nbytes / 2**20:.0f} MiB '
                              f'between warm buffers ({med["copy"][0] * 1000:.0f} ms): '
                              f'({v}) {(med[v][0] - med["copy"][0]) * 1000:.0f} ms above it, '
                              f'{med[v][0] / med["copy"][0]:.1f}x')

    targets = Table(title='Targets')
    for col in ('target', 'measured', 'limit', 'result'):
        targets.add_column(col)
    rows = []
    if 'a' in med and 'c' in med:
        rows.append(('time c / a', med['c'][0] / med['a'][0], TARGETS['ratio_c_a']))
    if 'b' in med and 'c' in med:
        rows.append(('time c / b', med['c'][0] / med['b'][0], TARGETS['ratio_c_b']))
    if 'a' in med and 'e' in med:
        rows.append(('time e / a', med['e'][0] / med['a'][0], TARGETS['ratio_e_a']))
    if 'r_a' in med and 'r_e' in med:
        rows.append(('Runner-like: time r_e / r_a', med['r_e'][0] / med['r_a'][0],
                     TARGETS['ratio_re_ra']))
    if 'r_b' in med and 'r_e' in med:
        rows.append(('Runner-like: time r_e / r_b', med['r_e'][0] / med['r_b'][0],
                     TARGETS['ratio_re_rb']))
    if 'r_e' in med:
        rows.append(('Runner-like: peak RSS above model (r_e) / checkpoint bytes',
                     med['r_e'][1] / nbytes, TARGETS['rss_ratio']))
    if 'c' in med:
        rows.append(('peak RSS above model (c) / checkpoint bytes', med['c'][1] / nbytes,
                     TARGETS['rss_ratio']))
    if 'c' in med and 'c_nv' in med:
        rows.append(('verify: time (c - c_nv) / c_nv', med['c'][0] / med['c_nv'][0] - 1,
                     TARGETS_VERIFY))
    if 'e' in med:
        rows.append(('peak RSS above model (e) / checkpoint bytes', med['e'][1] / nbytes,
                     TARGETS['rss_ratio']))
    if 'c_st' in med:
        rows.append(('peak RSS above model (c, safetensors) / checkpoint bytes',
                     med['c_st'][1] / nbytes, TARGETS['rss_ratio']))
    for name, value, limit in rows:
        targets.add_row(name, f'{value:.2f}', f'<= {limit:.2f}',
                        '[green]pass' if value <= limit else '[red]FAIL')
    summary['targets'] = {n: dict(value=v, limit=lim, ok=v <= lim) for n, v, lim in rows}

    if not args.no_scaling and scales:
        scale_rows = []
        for s in scales:
            b = spawn('make', work_dir, s, args.threads, False,
                      ['--make', '--no-safetensors'])['bytes']
            r = measure(['c'], work_dir, s, max(2, repeats - 2), args.threads, console.print)['c']
            times = [x['time_s'] for x in r]
            rss = [x['extra_rss'] for x in r]
            scale_rows.append((s, b, times, rss, r[0].get('correct')))
            if args.work_dir is None and not args.keep and s != 1.0:
                for k, v in paths(work_dir, s).items():
                    if osp.exists(v):
                        os.remove(v)
        st = Table(title='Scaling: load_sources (c) vs checkpoint size, median (min-max)')
        for col in ('size', 'tensor bytes', 'time', 'ms per 100 MiB',
                    'ms per extra 100 MiB', 'peak RSS above model', '/ bytes', 'correct'):
            st.add_column(col, justify='right')
        prev = None
        for s, b, times, rss, ok in scale_rows:
            med_t = statistics.median(times)
            marginal = '-' if prev is None else \
                f'{(med_t - prev[1]) * 1000 / ((b - prev[0]) / (100 * 2**20)):.0f}'
            prev = (b, med_t)
            st.add_row(f'{s:g}x', f'{b / 2**20:.0f} MiB', _fmt_t(times),
                       f'{med_t * 1000 / (b / (100 * 2**20)):.0f}', marginal,
                       _fmt_mb(rss), f'{statistics.median(rss) / b:.2f}',
                       'yes' if ok else 'NO')
        console.print(st)
        summary['scaling'] = [dict(scale=s, bytes=b, times=t, rss=r)
                              for s, b, t, r, _ in scale_rows]
        per_byte = {s: statistics.median(t) / b for s, b, t, _, _ in scale_rows}
        if 1.0 in per_byte and max(per_byte) > 1.0:
            big = max(per_byte)
            value = per_byte[big] / per_byte[1.0]
            name = f'linear: time per byte at {big:g}x / at 1x'
            targets.add_row(name, f'{value:.2f}', f'<= {TARGETS["linearity"]:.2f}',
                            '[green]pass' if value <= TARGETS['linearity'] else '[red]FAIL')
            summary['targets'][name] = dict(value=value, limit=TARGETS['linearity'],
                                            ok=value <= TARGETS['linearity'])
    console.print(targets)
    console.print(f'total {time.perf_counter() - t_start:.0f} s')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=1)
    if args.work_dir is None and not args.keep:
        import shutil
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
