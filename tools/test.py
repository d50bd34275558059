"""Test a detector with mmfusionload's registrations (MMDetection3D's command line)."""
import argparse
import logging
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

sys.path.insert(0, os.getcwd())
import mmfusionload  # noqa: E402,F401  (registers FusionLoadHook, EfficientViT, presets)
from mmfusionload import FusionLoadError  # noqa: E402
from mmfusionload.hooks import is_fusion_load_hook  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the directory to save the evaluation metrics')
    parser.add_argument('--ceph', action='store_true', help='use ceph as data storage backend')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='directory where painted images will be saved')
    parser.add_argument('--score-thr', type=float, default=0.1, help='bbox score threshold')
    parser.add_argument('--task', type=str, default='lidar_det',
                        choices=['mono_det', 'multi-view_det', 'lidar_det', 'lidar_seg',
                                 'multi-modality_det'], help='determine the visualization method')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings in the config, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    parser.add_argument('--allow-missing', action='store_true',
                        help='test even when the checkpoint lacks tensors of the model '
                        '(e.g. no head): they keep their initial values. By default that '
                        'stops the test before it starts')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def trigger_visualization_hook(cfg: Config, args: argparse.Namespace) -> Config:
    default_hooks = cfg.default_hooks
    if 'visualization' in default_hooks:
        hook = default_hooks['visualization']
        hook['draw'] = True
        if args.show:
            hook['show'] = True
            hook['wait_time'] = args.wait_time
        if args.show_dir:
            hook['test_out_dir'] = args.show_dir
        hook['vis_task'] = args.task
        hook['score_thr'] = args.score_thr
    else:
        raise RuntimeError('VisualizationHook must be included in default_hooks. '
                           'refer to usage "visualization=dict(type=\'VisualizationHook\')"')
    return cfg


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config.fromfile(args.config)
    if args.ceph:
        from mmdet3d.utils import replace_ceph_backend
        cfg = replace_ceph_backend(cfg)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        assert 'tta_model' in cfg, 'Cannot find ``tta_model`` in config.'
        assert 'tta_pipeline' in cfg, 'Cannot find ``tta_pipeline`` in config.'
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    return cfg


TEST_REPORT = 'fusionload_report_test.json'


def use_fusion_load_hook(cfg: Config, allow_missing: bool = False) -> None:
    """Read and repair the tested checkpoint through ``FusionLoadHook``.

    The checkpoint given on the command line is the whole trained model, so
    the hook's pretrained sources (which a training config lists) must not
    overwrite it: they are dropped, and the hook only repairs ``load_from``.
    A config without the hook gets one, so the checkpoint still goes through
    the safe reader and the repairs. The hook's report goes to
    ``fusionload_report_test.json`` (the training run's report is kept), and
    a checkpoint that lacks tensors of the model stops the test unless
    ``allow_missing``.
    """
    hooks = [dict(h) for h in cfg.get('custom_hooks', [])]
    found = False
    for hook in hooks:
        if is_fusion_load_hook(hook):
            if hook.get('sources'):
                print_log(f'tools/test.py: testing {cfg.load_from}; the FusionLoadHook '
                          'sources of the training config are not loaded', logger='current')
            hook['sources'] = []
            found = True
    if not found:
        hooks.append(dict(type='FusionLoadHook'))
    for hook in hooks:
        if is_fusion_load_hook(hook):
            hook.update(report_file=TEST_REPORT, load_from_strict=not allow_missing)
    cfg.custom_hooks = hooks


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    use_fusion_load_hook(cfg, args.allow_missing)
    from mmfusionload.sparse.compat import patch_spconv_cpu_stream
    patch_spconv_cpu_stream()  # spconv 2.x on a machine without CUDA (no-op with CUDA)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    try:
        runner.test()
    except FusionLoadError as e:
        print_log(f'tools/test.py: {e}', logger='current', level=logging.ERROR)
        if args.allow_missing is False and 'load_from_strict' in str(e):
            print_log('tools/test.py: --allow-missing tests anyway', logger='current',
                      level=logging.ERROR)
        sys.exit(1)


if __name__ == '__main__':
    main()
