"""spconv's run-time voxel counter (``record_voxel_count=True``): never missing, never
unexpected; loaded when both the file and the model keep it."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from mmfusionload import load_sources, repair_checkpoint

spconv = pytest.importorskip('spconv.pytorch')
BUF = 'max_num_voxels_during_training'


def _model(record: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.pts_middle_encoder = spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, bias=False, indice_key='s1'),
        spconv.SparseConv3d(8, 8, 3, stride=2, bias=False, record_voxel_count=record))
    return m


def test_spconv_registers_the_buffer_we_name():
    # the fact in mmfusionload.sparse.modules, checked against the installed spconv
    from mmfusionload.sparse.modules import SPCONV_VOXEL_COUNT
    assert SPCONV_VOXEL_COUNT == BUF
    assert 'pts_middle_encoder.1.' + BUF in _model(True).state_dict()
    assert not any(BUF in k for k in _model(False).state_dict())


@pytest.mark.parametrize('file_record,model_record', [(True, False), (False, True),
                                                      (True, True)])
def test_voxel_counter_never_missing_or_unexpected(file_record, model_record, tmp_path):
    src = _model(file_record)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
        if file_record:
            getattr(src.pts_middle_encoder[1], BUF).fill_(1234)
    path = str(tmp_path / 'enc.pth')
    torch.save(dict(state_dict=src.state_dict()), path)
    dst = _model(model_record)
    report = load_sources(dst, [dict(checkpoint=path, modality='lidar', strict=True)],
                          logger=None)
    s = report.sources[0]
    assert not s.missing and not s.unexpected and not s.mismatched
    assert torch.equal(dst.pts_middle_encoder[1].weight, src.pts_middle_encoder[1].weight)
    if model_record:
        want = 1234 if file_record else 0
        assert int(getattr(dst.pts_middle_encoder[1], BUF)) == want
    # the load_from repair: the counter the model lacks is left out of the state dict
    ckpt = dict(state_dict=OrderedDict(src.state_dict()))
    rep = repair_checkpoint(ckpt, _model(model_record))
    assert not rep.missing and not rep.unexpected
    assert (('pts_middle_encoder.1.' + BUF) in ckpt['state_dict']) == (file_record and
                                                                        model_record)
