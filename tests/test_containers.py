"""Unwrapping a checkpoint's container: key collisions name both keys; non-tensors are reported."""
from collections import OrderedDict

import pytest
import torch

from mmfusionload import FusionLoadError
from mmfusionload.checkpoint.containers import unwrap
from mmfusionload.report import SourceReport


def test_collision_names_both_keys():
    ckpt = {'state_dict': OrderedDict([('module.a.weight', torch.ones(2)),
                                       ('module.b', torch.ones(1)),
                                       ('a._orig_mod.weight', torch.zeros(2))])}
    with pytest.raises(FusionLoadError) as info:
        unwrap(ckpt, 'x.pth')
    msg = info.value.problems[0]
    assert "'module.a.weight'" in msg and "'a._orig_mod.weight'" in msg
    assert "both become 'a.weight'" in msg and 'another' not in msg


def test_non_tensor_entries_are_skipped_and_reportable():
    state = OrderedDict([('w', torch.ones(2)), ('b', torch.ones(1)), ('step', 7)])
    ckpt = unwrap({'state_dict': state}, 'x.pth')
    assert list(ckpt.state) == ['w', 'b'] and ckpt.skipped == ['step']
    report = SourceReport('x.pth', 'lidar')
    assert report.skipped == [] and report.to_dict()['skipped'] == []
    report.skipped = list(ckpt.skipped)
    assert report.to_dict()['skipped'] == ['step']
