"""Imported by the configs of tests/test_lidar_train_test.py (``custom_imports``).

- ``StateSnapshotHook`` saves the model's state dict when the run starts (after
  ``load_from`` and after ``FusionLoadHook``), so the test can compare the weights
  the run actually started from with the checkpoints it gave.
- ``LiDARBoxAPMetric``: 3-D AP and recall by MMDetection3D's ``eval_map_recall``
  (what ``IndoorMetric`` computes: rotated BEV IoU x height overlap, CPU ops), on
  the 7 box parameters. ``IndoorMetric`` itself cannot be used here: it takes
  7-parameter boxes only (CenterPoint's nuScenes-style boxes have 9, with velocity)
  and its summary table fails on numpy 2 (``float()`` of 1-element arrays);
  MMDetection3D's NuScenes/KITTI metrics need the nuScenes database or KITTI's
  calibration files.
"""
import os.path as osp
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from mmdet3d.registry import METRICS
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class StateSnapshotHook(Hook):
    """Save ``model.state_dict()`` at the first ``before_train``/``before_test``.

    Args:
        filename (str): File name in ``work_dir`` (or an absolute path).
    """
    priority = 'LOWEST'  # after FusionLoadHook (ABOVE_NORMAL)

    def __init__(self, filename: str = 'state_at_start.pth'):
        self.filename = filename
        self._done = False

    def _save(self, runner) -> None:
        if self._done:
            return
        self._done = True
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, osp.join(runner.work_dir, self.filename))

    def before_train(self, runner) -> None:
        self._save(runner)

    def before_test(self, runner) -> None:
        self._save(runner)


def _seven(boxes):
    """The same boxes with their first 7 parameters (centre, size, yaw)."""
    if boxes.tensor.shape[-1] == 7:
        return boxes
    return type(boxes)(boxes.tensor[:, :7].clone(), box_dim=7, with_yaw=boxes.with_yaw)


def _first(value) -> float:
    return float(np.asarray(value).reshape(-1)[0])


@METRICS.register_module()
class LiDARBoxAPMetric(BaseMetric):
    """3-D AP and recall per class, by MMDetection3D's ``eval_map_recall``.

    What ``IndoorMetric`` computes (3-D IoU: rotated BEV IoU x height overlap),
    on the 7 box parameters (velocity dropped), without ``indoor_eval``'s summary
    table, which fails on numpy 2 (``float()`` of 1-element arrays).
    """
    default_prefix = None

    def __init__(self, iou_thr: Sequence[float] = (0.25, 0.5), collect_device: str = 'cpu',
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.iou_thr = [iou_thr] if isinstance(iou_thr, float) else list(iou_thr)

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            pred, ann = sample['pred_instances_3d'], sample['eval_ann_info']
            self.results.append(dict(
                boxes=_seven(pred['bboxes_3d'].to('cpu')),
                scores=pred['scores_3d'].cpu().tolist(),
                labels=pred['labels_3d'].cpu().tolist(),
                gt_boxes=_seven(ann['gt_bboxes_3d']),
                gt_labels=np.asarray(ann['gt_labels_3d']).tolist()))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        from mmdet3d.evaluation.functional.indoor_eval import eval_map_recall
        pred: dict = {}
        gt: dict = {}
        for img_id, r in enumerate(results):  # as indoor_eval arranges them
            for i, (label, score) in enumerate(zip(r['labels'], r['scores'])):
                pred.setdefault(label, {}).setdefault(img_id, []).append((r['boxes'][i], score))
                gt.setdefault(label, {}).setdefault(img_id, [])
            for i, label in enumerate(r['gt_labels']):
                gt.setdefault(label, {}).setdefault(img_id, []).append(r['gt_boxes'][i])
        recall, _, ap = eval_map_recall(pred, gt, self.iou_thr)
        classes = self.dataset_meta['classes']
        metrics = {}
        for i, thr in enumerate(self.iou_thr):
            for label in ap[i]:
                metrics[f'{classes[label]}_AP_{thr:.2f}'] = _first(ap[i][label])
                metrics[f'{classes[label]}_rec_{thr:.2f}'] = float(
                    np.asarray(recall[i][label]).reshape(-1)[-1])
            metrics[f'mAP_{thr:.2f}'] = float(np.mean([_first(a) for a in ap[i].values()]))
            metrics[f'mAR_{thr:.2f}'] = float(np.mean(
                [np.asarray(r).reshape(-1)[-1] for r in recall[i].values()]))
        return metrics
