"""A real run on CPU: ``tools/train.py`` then ``tools/test.py`` on a tiny CenterPoint.

MMDetection3D's own modules and data path end to end: ``NuScenesDataset`` reading a
nuScenes-style info file (written here with ``mmengine.dump``) and ``.bin`` point
clouds, its loading transforms, ``Det3DDataPreprocessor`` with MMCV's CPU hard
voxelization, ``HardSimpleVFE``, spconv 2.x ``SparseEncoder``, ``SECOND``,
``SECONDFPN``, ``CenterHead`` (``configs/lidar/centerpoint_tiny_cpu.py``).

The training run starts from a LiDAR checkpoint through ``FusionLoadHook``
(``configs/lidar/centerpoint_tiny_cpu_fusionload.py``): a randomized model's state
dict with its sparse kernels in MMCV's ``[*k, in, out]`` layout and no
``_metadata``. The test run reads the Runner-saved ``iter_2.pth`` (message hub,
numpy values) through the package's safe reader, in a fresh process.

Both tools run as subprocesses with the venv's Python and ``OMP_NUM_THREADS=1``
(spconv 2.3.8's CPU kernels race with several threads). ``tests/lidar_run_hooks.py``
(imported by the run's config) saves the weights at run start and adds a 3-D AP
metric (MMDetection3D's ``IndoorMetric`` on the 7 box parameters).
"""
import glob
import json
import math
import os
import os.path as osp
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('spconv')
pytest.importorskip('mmdet3d')

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONFIG = ROOT / 'configs' / 'lidar' / 'centerpoint_tiny_cpu_fusionload.py'
LIDAR_MODULES = ('pts_voxel_encoder.', 'pts_middle_encoder.', 'pts_backbone.', 'pts_neck.')
# original nuScenes label ids (NuScenesDataset.METAINFO order): car 0, pedestrian 7
OBJECTS = [(0, (4.0, 1.8, 1.6)), (7, (0.8, 0.8, 1.8))]


def write_dataset(root: Path, seed: int = 0) -> None:
    """Six synthetic sweeps with a car and a pedestrian each, MMDetection3D's info format.

    Points: 4 features (x, y, z, intensity), a ground plane plus points filling each
    box. Boxes: nuScenes convention (centre at half height), ``velocity`` and
    ``num_lidar_pts`` as ``NuScenesDataset`` reads them.
    """
    import mmengine
    rng = np.random.default_rng(seed)
    (root / 'points').mkdir(parents=True, exist_ok=True)

    def sample(i: int) -> dict:
        clouds = [np.c_[rng.uniform(-12.5, 12.5, (1500, 2)), rng.uniform(-2.0, -1.8, 1500),
                        rng.uniform(0, 1, 1500)]]
        instances = []
        for label, (l, w, h) in OBJECTS:
            cx, cy = rng.uniform(-9, 9, 2)
            yaw = rng.uniform(-np.pi, np.pi)
            cz = -1.9 + h / 2
            c, s = np.cos(yaw), np.sin(yaw)
            p = rng.uniform(-0.5, 0.5, (300, 3)) * [l, w, h]
            p = p @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) + [cx, cy, cz]
            clouds.append(np.c_[p, rng.uniform(0, 1, 300)])
            instances.append(dict(bbox_3d=[float(cx), float(cy), cz, l, w, h, float(yaw)],
                                  bbox_label_3d=label, velocity=[0.0, 0.0],
                                  num_lidar_pts=300, bbox_3d_isvalid=True))
        np.concatenate(clouds).astype(np.float32).tofile(root / 'points' / f'{i:04d}.bin')
        return dict(sample_idx=i, token=f'tiny{i:04d}',
                    lidar_points=dict(lidar_path=f'{i:04d}.bin', num_pts_feats=4),
                    instances=instances)

    metainfo = dict(categories=dict(car=0, pedestrian=7), dataset='tiny-nuscenes-style',
                    info_version='1.1')
    mmengine.dump(dict(metainfo=metainfo, data_list=[sample(i) for i in range(4)]),
                  str(root / 'tiny_infos_train.pkl'))
    mmengine.dump(dict(metainfo=metainfo, data_list=[sample(i) for i in range(4, 6)]),
                  str(root / 'tiny_infos_val.pkl'))


def lidar_checkpoint(path: Path):
    """A randomized model of the config, saved with MMCV-layout sparse kernels, no _metadata.

    Returns:
        tuple: The state dict as the live (spconv 2.x) model holds it, and the names
        of its sparse-conv modules.
    """
    from mmdet3d.registry import MODELS
    from mmdet3d.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from mmfusionload.cli.demo import randomize, to_mmcv_layout
    from mmfusionload.load.repairs import module_layout
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(str(CONFIG), import_custom_modules=False)
    with DefaultScope.overwrite_default_scope('mmdet3d'):  # restored after: later tests
        model = randomize(MODELS.build(cfg.model), seed=1)
    state = model.state_dict()
    sparse = [n for n, m in model.named_modules() if module_layout(m) == 'spconv2']
    assert sparse and all(n.startswith('pts_middle_encoder.') for n in sparse)
    saved = to_mmcv_layout(state, model)
    assert not hasattr(saved, '_metadata')
    for n in sparse:  # the kernels really are in the other layout
        w = state[f'{n}.weight']
        assert saved[f'{n}.weight'].shape == (*w.shape[1:-1], w.shape[-1], w.shape[0])
    torch.save({'state_dict': saved, 'meta': {'note': 'mmcv sparse layout'}}, str(path))
    return OrderedDict((k, v.clone()) for k, v in state.items()), sparse


def _run(args, cwd: Path, log: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(
                   p for p in [str(TESTS), os.environ.get('PYTHONPATH', '')] if p))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=400)
    log.write_text(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope='module')
def lidar_run(tmp_path_factory):
    """Train 2 iterations from the MMCV-layout LiDAR checkpoint, then test iter_2.pth."""
    d = tmp_path_factory.mktemp('lidar_run')
    data = d / 'data'
    write_dataset(data)
    source, sparse = lidar_checkpoint(d / 'lidar_mmcv_layout.pth')
    # The run's config: ours plus the test helpers (weights snapshot, AP metric).
    run_cfg = d / 'run_cfg.py'
    run_cfg.write_text(
        f"_base_ = [{str(CONFIG)!r}]\n"
        "custom_imports = dict(imports=['mmfusionload', 'lidar_run_hooks'],\n"
        "                      allow_failed_imports=False)\n"
        "custom_hooks = _base_.custom_hooks + [dict(type='StateSnapshotHook')]\n"
        "test_evaluator = dict(_delete_=True, type='LiDARBoxAPMetric', iou_thr=[0.25, 0.5])\n")
    data_opts = [f'train_dataloader.dataset.data_root={data}/',
                 f'test_dataloader.dataset.data_root={data}/']
    source_opt = [f'custom_hooks.0.sources.0.checkpoint={d / "lidar_mmcv_layout.pth"}']
    train = _run([ROOT / 'tools' / 'train.py', run_cfg, '--work-dir', d / 'train',
                  '--cfg-options', *source_opt, *data_opts], d, d / 'train.log')
    assert train.returncode == 0, (train.stdout + train.stderr)[-6000:]
    # tested as a user would: the training config (its FusionLoadHook source included)
    # and the checkpoint the run saved
    test = _run([ROOT / 'tools' / 'test.py', run_cfg, d / 'train' / 'iter_2.pth',
                 '--work-dir', d / 'test', '--cfg-options', *source_opt, *data_opts],
                d, d / 'test.log')
    return dict(dir=d, source=source, sparse=sparse, train=train, test=test)


def test_train_starts_from_the_lidar_checkpoint(lidar_run):
    d = lidar_run['dir']
    report = json.load(open(d / 'train' / 'fusionload_report.json'))
    (src,) = report['sources']
    assert src['counts']['repaired:spconv_layout'] == len(lidar_run['sparse'])
    n_lidar = len([k for k in lidar_run['source'] if k.startswith(LIDAR_MODULES)])
    assert src['counts']['loaded'] == n_lidar
    start = torch.load(str(d / 'train' / 'state_at_start.pth'), weights_only=True)
    assert start.keys() == lidar_run['source'].keys()
    for k, v in lidar_run['source'].items():
        if k.startswith(LIDAR_MODULES):  # loaded, sparse kernels permuted back
            assert torch.equal(start[k], v), k
    # the head is not LiDAR modality: it keeps its own initial weights
    head = [k for k in start if k.startswith('pts_bbox_head.') and start[k].is_floating_point()]
    assert head and not any(torch.equal(start[k], lidar_run['source'][k]) for k in head)


def test_train_loss_is_finite_and_checkpoint_saved(lidar_run):
    d = lidar_run['dir']
    (scalars,) = glob.glob(str(d / 'train' / '*' / 'vis_data' / 'scalars.json'))
    rows = [json.loads(line) for line in open(scalars) if line.strip()]
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), rows
    assert osp.exists(d / 'train' / 'iter_2.pth')


def test_test_reads_runner_checkpoint_and_reports_metrics(lidar_run):
    d, test = lidar_run['dir'], lidar_run['test']
    assert test.returncode == 0, (test.stdout + test.stderr)[-6000:]
    saved = torch.load(str(d / 'train' / 'iter_2.pth'), weights_only=False)['state_dict']
    tested = torch.load(str(d / 'test' / 'state_at_start.pth'), weights_only=True)
    for k, v in saved.items():  # the trained weights were tested, not the LiDAR source
        assert torch.equal(tested[k], v), k
    # the checkpoint went through the safe reader (and the load_from repair) only
    report = json.load(open(d / 'test' / 'fusionload_report_test.json'))
    assert [s['label'] for s in report['sources']] == ['load_from'] and report['ok'], report
    assert report['applied'] is True  # MMEngine applied the repaired file
    (metrics_file,) = glob.glob(str(d / 'test' / '*' / '*.json'))
    metrics = json.load(open(metrics_file))
    for key in ('mAP_0.25', 'mAR_0.25', 'car_AP_0.25', 'pedestrian_AP_0.50'):
        assert key in metrics and math.isfinite(metrics[key]), metrics


def test_ap_metric_scores_ground_truth_as_perfect():
    """The metric the run uses: ground truth given as predictions has AP and recall 1."""
    from mmdet3d.structures import LiDARInstance3DBoxes
    from lidar_run_hooks import LiDARBoxAPMetric
    gt = LiDARInstance3DBoxes(torch.tensor([[1.0, 2.0, -1.9, 4.0, 1.8, 1.6, 0.3, 0.0, 0.0],
                                            [-5.0, 3.0, -1.9, 0.8, 0.8, 1.8, 1.0, 0.0, 0.0]]),
                              box_dim=9)
    metric = LiDARBoxAPMetric(iou_thr=[0.25, 0.5])
    metric.dataset_meta = dict(classes=['car', 'pedestrian'], box_type_3d='LiDAR')
    metric.process({}, [dict(
        pred_instances_3d=dict(bboxes_3d=gt.clone(), scores_3d=torch.tensor([0.9, 0.8]),
                               labels_3d=torch.tensor([0, 1])),
        eval_ann_info=dict(gt_bboxes_3d=gt.clone(), gt_labels_3d=np.array([0, 1])))])
    out = metric.evaluate(1)
    assert out['mAP_0.50'] == pytest.approx(1.0) and out['mAR_0.50'] == pytest.approx(1.0), out
    assert out['car_AP_0.25'] == pytest.approx(1.0), out
