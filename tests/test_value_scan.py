"""The reader's background NaN/Inf scan: what it proves, what it leaves to the load's check."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import mmfusionload.value_scan as value_scan
from mmfusionload import FusionLoadError, load_sources
from mmfusionload.pages import known_finite
from mmfusionload.reader import all_finite, read_checkpoint

pytestmark = pytest.mark.skipif(value_scan.usable_cores() < 2 or value_scan.madvise() is None,
                                reason='the scan runs on a second core (Linux)')


def _state() -> 'OrderedDict[str, torch.Tensor]':
    g = torch.Generator().manual_seed(3)
    sd = OrderedDict()
    for i in range(12):
        sd[f'pts_backbone.{i}.weight'] = torch.randn(64, 256, generator=g)
    sd['pts_backbone.3.weight'][5, 7] = float('nan')
    sd['pts_backbone.6.weight'][0, 0] = float('-inf')
    sd['pts_backbone.8.weight'].fill_(3e38)  # finite, but its norm overflows
    sd['pts_backbone.9.weight'] = sd['pts_backbone.9.weight'].double()
    sd['pts_backbone.10.weight'] = sd['pts_backbone.10.weight'].half()  # not scanned
    sd['pts_backbone.11.weight'] = sd['pts_backbone.11.weight'].t()  # a strided view
    return sd


def test_scan_proves_only_finite_tensors(tmp_path):
    """The unit on a file's mapping, every tensor scanned (``finish``)."""
    sd = _state()
    path = tmp_path / 'raw.bin'
    strided = 'pts_backbone.11.weight'  # stored as its transpose's rows
    bases = {k: (v.t() if k == strided else v).contiguous() for k, v in sd.items()}
    blobs = [b.view(-1).view(torch.uint8).numpy().tobytes() for b in bases.values()]
    path.write_bytes(b''.join(blobs))
    size = path.stat().st_size
    whole = torch.UntypedStorage.from_file(str(path), False, size)
    views, at = {}, 0
    for (k, b), blob in zip(bases.items(), blobs):
        t = torch.empty(0, dtype=b.dtype).set_(whole, at // b.element_size(), b.shape,
                                               b.stride())
        views[k] = t.t() if k == strided else t
        at += len(blob)
    scan = value_scan.ValueScan.start(whole.data_ptr(), whole.data_ptr() + size)
    for t in views.values():
        scan.add(t)
    finite = scan.stop(finish=True)
    proven = {k for k, t in views.items() if finite.get(id(t)) is t}
    assert proven == {f'pts_backbone.{i}.weight' for i in (0, 1, 2, 4, 5, 7, 9, 11)}
    for k, t in views.items():  # pages given back: the values are the file's
        assert torch.equal(t.nan_to_num(0, 1, -1), sd[k].nan_to_num(0, 1, -1)), k


def test_read_marks_what_the_scan_proved(tmp_path, monkeypatch):
    monkeypatch.setattr(value_scan, 'BATCH_BYTES', 1 << 16)  # one tensor a batch
    sd = _state()
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'state_dict': sd}, path)
    read = read_checkpoint(path, scan_values=True)['state_dict']
    proven = {k for k, v in read.items() if known_finite(v)}
    # batches not reached when parsing ends are left to the load's check
    assert proven <= {f'pts_backbone.{i}.weight' for i in (0, 1, 2, 4, 5, 7, 9, 11)}
    for k, v in read.items():
        assert torch.equal(v.nan_to_num(0, 1, -1), sd[k].nan_to_num(0, 1, -1)), k
    assert not all_finite(read['pts_backbone.3.weight'])
    assert not all_finite(read['pts_backbone.6.weight'])
    assert all_finite(read['pts_backbone.8.weight'])  # proven by the exact check instead
    some = read['pts_backbone.0.weight']
    some.add_(0)  # written since it was read: no longer proven
    assert not known_finite(some)
    plain = read_checkpoint(path)['state_dict']  # without the scan nothing is proven
    assert not any(known_finite(v) for v in plain.values())


def test_load_refuses_nan_found_with_the_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(value_scan, 'BATCH_BYTES', 1 << 16)
    sd = _state()
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'state_dict': sd}, path)
    model = nn.Module()
    model.pts_backbone = nn.ModuleList(nn.Linear(256, 64, bias=False) for _ in range(12))
    model.pts_backbone[9].double()
    model.pts_backbone[10].half()
    model.pts_backbone[11] = nn.Linear(64, 256, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FusionLoadError) as err:
        load_sources(model, [dict(checkpoint=path, modules='pts_backbone')], logger=None)
    text = str(err.value)
    assert 'pts_backbone.3.weight holds 1 NaN/Inf' in text
    assert 'pts_backbone.6.weight holds 1 NaN/Inf' in text
    assert 'pts_backbone.8.weight' not in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    sd['pts_backbone.3.weight'][5, 7] = 0.5
    sd['pts_backbone.6.weight'][0, 0] = 0.5
    torch.save({'state_dict': sd}, path)
    load_sources(model, [dict(checkpoint=path, modules='pts_backbone')], logger=None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
