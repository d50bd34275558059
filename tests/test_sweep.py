"""``pages.sweep``: a file's pages mapped and handed back a window at a time, values unchanged."""
import os.path as osp
import threading
from collections import OrderedDict

import pytest
import torch

from mmfusionload.files import pages
from mmfusionload.files.reader import read_checkpoint

pytestmark = pytest.mark.skipif(pages.madvise() is None or not osp.exists('/proc/self/smaps'),
                                reason='needs Linux madvise and /proc')

MIB = 1 << 20


def _mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path``."""
    real, total, inside = osp.realpath(path), 0, False
    with open('/proc/self/smaps') as f:
        for line in f:
            head = line.split()
            if '-' in head[0] and len(head) >= 5 and head[0][0] in '0123456789abcdef':
                inside = len(head) == 6 and head[5] == real
            elif inside and head[0] == 'Rss:':
                total += int(head[1])
    return total


def _file(tmp_path, names_sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict((k, torch.randn(n, generator=g)) for k, n in names_sizes)
    path = str(tmp_path / 'ckpt.pth')
    torch.save(sd, path)
    return sd, path


def test_sweep_maps_one_window_at_a_time_and_gives_it_back(tmp_path):
    sd, path = _file(tmp_path, [(f't{i}', MIB // 4) for i in range(8)])  # 8 x 1 MiB
    got = read_checkpoint(path)
    tensors = list(got.values())
    assert _mapped_kib(path) < 256  # nothing read yet
    limit = 2 * MIB + 4096  # two members a window
    seen, resident = [], []
    for t in pages.sweep(tensors, limit=limit):
        assert torch.equal(t, sd[f't{len(seen)}'])  # every page of it read
        seen.append(t)
        resident.append(_mapped_kib(path))
    assert [id(t) for t in seen] == [id(t) for t in tensors]
    # the one read and the next, whatever the helper thread has done so far (a page
    # fault maps up to 64 KiB around it, into a neighbouring window)
    assert max(resident) <= 2 * limit // 1024 + 2 * 64 + 8, resident
    assert _mapped_kib(path) <= 8 * 4  # at most the pages shared with zip headers stay
    for k, t in got.items():  # read again from the page cache: the same values
        assert torch.equal(t, sd[k])


def test_sweep_maps_ahead_and_hands_back_in_order(tmp_path, monkeypatch):
    """The helper thread's calls, in order: two windows mapped ahead, then each window
    handed back (whole pages only) before the one after the next is mapped."""
    sd, path = _file(tmp_path, [(f't{i}', MIB // 4) for i in range(8)])
    got = read_checkpoint(path)
    tensors = list(got.values())
    page, real, calls = pages._MADVISE['page'], pages.madvise(), []

    def recording(address, length, advice):
        calls.append((advice, address, length))
        return real(address, length, advice)

    monkeypatch.setitem(pages._MADVISE, 'fn', recording)
    limit = 2 * MIB + 4096
    assert list(pages.sweep(tensors, limit=limit)) == tensors
    spans = [(tensors[i].data_ptr(), tensors[i + 1].data_ptr() + MIB) for i in range(0, 8, 2)]
    mapped = [(pages._MADV_POPULATE_READ, a // page * page, -(-b // page) * page - a // page *
               page) for a, b in spans]
    given = [(pages._MADV_DONTNEED, -(-a // page) * page, b // page * page - -(-a // page) *
              page) for a, b in spans]
    assert calls == [mapped[0], mapped[1], given[0], mapped[2], given[1], mapped[3], given[2],
                     given[3]]
    assert not any(t.name == 'mmfusionload-pages' for t in threading.enumerate())  # joined


def test_windows_hold_consecutive_members_within_the_limit(tmp_path):
    _, path = _file(tmp_path, [('a', MIB // 4), ('b', 16), ('c', MIB // 4), ('d', MIB // 4),
                               ('e', 2 * MIB // 4)])
    got = read_checkpoint(path)
    limit = 3 * MIB + 4096  # a-d with their zip headers fit; e (2 MiB more) does not
    runs = pages._windows([got[k] for k in 'abcde'], lambda t: t, limit)
    assert [len(r) for _, _, r in runs] == [4, 1]
    assert pages._windows([got[k] for k in 'abcd'], lambda t: t, 3 * MIB)[0][2] == [
        got[k] for k in 'abc']  # the limit is kept
    first, end, _ = runs[0]
    assert first == got['a'].data_ptr() and end == got['d'].data_ptr() + MIB
    # b left out: a and c are not neighbours in the file, so not one window
    runs = pages._windows([got[k] for k in 'acd'], lambda t: t, limit)
    assert [len(r) for _, _, r in runs] == [1, 2]
    # out of file order: a new window
    runs = pages._windows([got[k] for k in 'dc'], lambda t: t, limit)
    assert [len(r) for _, _, r in runs] == [1, 1]
    # a tensor not read from a file goes on its own, never in a window
    runs = pages._windows([got['a'], torch.ones(4), got['b']], lambda t: t, limit)
    assert [(len(r), bool(end)) for _, end, r in runs] == [(1, True), (1, False), (1, True)]


def test_a_tensor_written_in_place_keeps_its_values(tmp_path):
    """A window is handed back only while every tensor in it is as the reader built it;
    a page written to is the process's own, and giving it back would bring the file's
    values back."""
    sd, path = _file(tmp_path, [(f't{i}', MIB // 4) for i in range(3)])
    got = read_checkpoint(path)
    tensors = list(got.values())
    for i, t in enumerate(pages.sweep(tensors, limit=8 * MIB)):
        if i == 1:
            t.mul_(2)
    assert torch.equal(tensors[1], sd['t1'] * 2)
    assert torch.equal(tensors[0], sd['t0']) and torch.equal(tensors[2], sd['t2'])


def test_a_written_neighbour_outside_the_sweep_keeps_its_values(tmp_path):
    """``b`` (64 bytes) shares pages with the ends of ``a`` and ``c``: a sweep over ``a`` and
    ``c`` must not hand those pages back, or ``b``'s written values would turn into the
    file's again."""
    sd, path = _file(tmp_path, [('a', MIB // 4), ('b', 16), ('c', MIB // 4)])
    got = read_checkpoint(path)
    page = pages._MADVISE['page']
    b = got['b']
    assert b.data_ptr() // page == (b.data_ptr() + 63) // page  # on one page
    assert got['a'].data_ptr() + MIB > b.data_ptr() // page * page - page
    b.mul_(2)
    assert list(pages.sweep([got['a'], got['c']], limit=8 * MIB)) == [got['a'], got['c']]
    assert torch.equal(b, sd['b'] * 2)
    assert torch.equal(got['a'], sd['a']) and torch.equal(got['c'], sd['c'])


def test_views_sharing_a_storage_are_left_alone(tmp_path):
    base = torch.randn(MIB // 2)
    path = str(tmp_path / 'shared.pth')
    torch.save({'x': base[:MIB // 4], 'y': base[MIB // 4:]}, path)  # one storage, two views
    got = read_checkpoint(path)
    assert not pages.is_tracked(got['x']) and not pages.is_tracked(got['y'])
    got['y'].add_(1)
    runs = pages._windows([got['x'], got['y']], lambda t: t, 8 * MIB)
    assert [end for _, end, _ in runs] == [0, 0]
    assert len(list(pages.sweep([got['x'], got['y']]))) == 2
    assert torch.equal(got['x'], base[:MIB // 4]) and torch.equal(got['y'], base[MIB // 4:] + 1)
