"""Give a memory-mapped checkpoint tensor's pages back once it has been read.

The readers return tensors that are views of a private mapping of the file:
reading a tensor faults its pages in, and they then count in the process's RSS
until the mapping is dropped. :func:`release_pages` hands one tensor's pages
back (``madvise(MADV_DONTNEED)``); the next read faults them in again from the
page cache, so a load's peak RSS stays near one tensor instead of the whole file.

Which tensors may be released is recorded here, by the reader, when it builds
them (:func:`track`): the tensor's address range, checked to lie inside the
file's mapping, and its version counter. Nothing a file can set (an attribute,
a state) is consulted. A tensor is released only while its data pointer, size
and version are still the recorded ones; a private page written to is no longer
the file's and is never released.

A load reads each tensor twice, once to check its values and once to copy them,
and :func:`sweep` does both a window at a time: the window's pages are mapped
with one ``madvise(MADV_POPULATE_READ)`` and handed back with one
``MADV_DONTNEED``, which costs the kernel less than a page fault per 64 KiB and
a call per tensor. Those calls run on a helper thread (page-table work only: no
torch call, no tensor touched), the next window mapped while the current one is
read and the one before handed back, so the kernel's share runs beside the
reading instead of before it. A window holds tensors whose zip members follow
each other in the file, so the pages between them hold only their own bytes and
zip headers, never another tensor's.
"""
import bisect
import os
import os.path as osp
import queue
import sys
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch

_MADV_DONTNEED = 4  # Linux <sys/mman.h>
_MADV_POPULATE_READ = 22  # Linux 5.14+; EINVAL before: the pages fault in as they are read
#: Most bytes a :func:`sweep` window spans. Two are mapped at a time (the one read
#: and the next): 8 MiB, 0.06x a BEVFusion-size checkpoint. Larger windows measured no
#: faster once the mapping runs on the helper thread, and cost their size in RSS.
WINDOW_BYTES = 4 << 20
_MADVISE: Dict[str, Any] = {}


class _Entry(NamedTuple):
    """A tracked tensor as the reader built it, and the whole pages it may give back."""
    ref: Any
    ptr: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype
    version: int
    pages: Tuple[int, int]  # (address, length); length 0: no whole page inside
    members: Optional[Tuple[Tuple[int, int], ...]] = None  # the file's member spans, sorted
    member: int = -1  # the index of the one holding the tensor


# id(tensor) -> its entry
_TRACKED: Dict[int, _Entry] = {}


def madvise() -> Optional[Callable]:
    """libc's ``madvise`` on Linux, else None (found once)."""
    if 'fn' not in _MADVISE:
        fn = None
        if sys.platform.startswith('linux'):
            try:
                import ctypes
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _MADVISE['page'] = os.sysconf('SC_PAGE_SIZE')
            except (OSError, AttributeError, ValueError):  # pragma: no cover
                fn = None
        _MADVISE['fn'] = fn
    return _MADVISE['fn']


def file_mappings(path: str) -> List[Tuple[int, int]]:
    """Address ranges of this process's private mappings of ``path`` (Linux)."""
    real = osp.realpath(path)
    out = []
    try:
        with open('/proc/self/maps') as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].rstrip('\n') == real and parts[1][3] == 'p':
                    lo, hi = parts[0].split('-')
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:  # pragma: no cover - not Linux
        return []
    return out


def extent(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last one."""
    if t.numel() == 0:
        return 0
    if t.is_contiguous():
        return t.nbytes
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _forget(ref: '_Ref') -> None:
    """A tracked tensor died: drop its entry (unless the key was reused since)."""
    entry = _TRACKED.get(ref.key)
    if entry is not None and entry.ref is ref:
        del _TRACKED[ref.key]


def track(t: torch.Tensor, ranges: Iterable[Tuple[int, int]]) -> bool:
    """Record ``t`` as releasable if its bytes lie inside one of ``ranges``.

    Args:
        t (Tensor): A tensor the reader built on a private mapping of a file.
        ranges: The mapping's ``(start, end)`` address ranges.

    Returns:
        bool: Whether it was recorded.
    """
    if _MADVISE.get('fn') is None and madvise() is None or not torch.is_tensor(t) or \
            t.device.type != 'cpu' or t.numel() == 0 or t.layout != torch.strided:
        return False
    start, nbytes = t.data_ptr(), extent(t)
    if not any(lo <= start and start + nbytes <= hi for lo, hi in ranges):
        return False
    _record(t, start, nbytes, _MADVISE['page'])
    return True


class _Ref(weakref.ref):
    """A weak reference that knows its tensor's key in the table."""
    __slots__ = ('key', )


def _record(t: torch.Tensor, start: int, nbytes: int, page: int,
            members: Optional[Tuple[Tuple[int, int], ...]] = None, member: int = -1) -> None:
    """Enter ``t`` (its bytes ``[start, start + nbytes)``, inside ``members[member]``)."""
    ref = _Ref(t, _forget)
    ref.key = key = id(t)
    first = -(-start // page) * page
    span = (start + nbytes) // page * page - first
    _TRACKED[key] = _Entry(ref, start, tuple(t.shape), t.stride(), t.dtype, t._version,
                           (first, max(0, span)), members, member)


def track_views(tensors: Iterable[torch.Tensor], lo: int, hi: int,
                members: Optional[Iterable[Tuple[int, int]]] = None) -> int:
    """Record tensors the reader built on its own mapping ``[lo, hi)`` of a file.

    The same facts as :func:`track` (address, shape, strides, dtype, version and
    whole-page range, each tensor checked to lie inside the mapping), for many
    tensors at once: the reader's views are strided CPU tensors, so only their
    device, size and extent are looked at before recording.

    Args:
        tensors: Views of the mapping, each the only view of its storage.
        lo, hi (int): The mapping's address range.
        members: The address spans ``(start, end)`` of every member of the file
            (zip members, apart from each other), for :func:`sweep`; a tensor
            inside one of them is recorded with it.

    Returns:
        int: How many were recorded.
    """
    if _MADVISE.get('fn') is None and madvise() is None:
        return 0
    spans = tuple(sorted(members)) if members is not None else None
    starts = [a for a, _ in spans] if spans else []
    page, strided, n = _MADVISE['page'], torch.strided, 0
    for t in tensors:
        if not t.is_cpu or t.layout is not strided or not t.numel():
            continue
        start = t.data_ptr()
        nbytes = extent(t)
        if start < lo or start + nbytes > hi:
            continue
        i = bisect.bisect_right(starts, start) - 1
        if i >= 0 and start + nbytes <= spans[i][1]:
            _record(t, start, nbytes, page, spans, i)
        else:
            _record(t, start, nbytes, page)
        n += 1
    return n


def _current(t: Any) -> Optional[_Entry]:
    """``t``'s entry while ``t`` is what the reader built: the same memory, shape,
    strides and dtype (so the same bytes), never written in place."""
    entry = _TRACKED.get(id(t))
    if entry is None or entry.ref() is not t or t._version != entry.version or \
            t.data_ptr() != entry.ptr or t.stride() != entry.stride or \
            tuple(t.shape) != entry.shape or t.dtype != entry.dtype:
        return None
    return entry


def is_tracked(t: Any) -> bool:
    """Whether :func:`release_pages` may release ``t`` now."""
    return _current(t) is not None


def release_pages(t: Any) -> bool:
    """Give back the memory pages of a tensor the reader recorded with :func:`track`.

    A no-op for any other tensor, for one written in place since (its version
    moved), set to other memory, or off Linux. Only whole pages inside the
    tensor are released, never a neighbour's. The values stay the same.

    Returns:
        bool: Whether pages were released.
    """
    entry = _TRACKED.get(id(t))
    if entry is None or not entry.pages[1] or _current(t) is not entry:
        return False
    return _MADVISE['fn'](entry.pages[0], entry.pages[1], _MADV_DONTNEED) == 0


def mark_mapped(tensors: Iterable[torch.Tensor], path: str,
                ranges: Optional[List[Tuple[int, int]]] = None) -> int:
    """Record the tensors whose data lies in a private mapping of ``path``.

    For a file read by ``torch.load(mmap=True)`` (a trusted file). Tensors
    sharing a storage are left out: releasing one would drop a neighbour's
    written pages.

    Returns:
        int: How many tensors were recorded.
    """
    if madvise() is None:
        return 0
    tensors = [t for t in tensors if torch.is_tensor(t) and t.device.type == 'cpu'
               and t.layout == torch.strided and not t.is_quantized and t.numel() > 0]
    per_storage: Dict[int, int] = {}
    for t in tensors:
        p = t.untyped_storage().data_ptr()
        per_storage[p] = per_storage.get(p, 0) + 1
    n = 0
    for t in tensors:
        if per_storage[t.untyped_storage().data_ptr()] != 1:
            continue
        if ranges is None:
            ranges = file_mappings(path)
        if not ranges:
            return 0
        n += track(t, ranges)
    return n


def _windows(items: List[Any], tensor_of: Callable[[Any], Any], limit: int
             ) -> List[Tuple[int, int, List[Any]]]:
    """Split ``items`` (in their order) into runs ``(start, end, items)`` that
    :func:`sweep` maps together; ``end == 0``: one item on its own."""
    runs: List[Tuple[int, int, List[Any]]] = []
    run: List[Any] = []
    first = end = last = 0
    members = None
    for item in items:
        t = tensor_of(item)
        entry = _current(t)
        if entry is None or entry.members is None:
            if run:
                runs.append((first, end, run))
                run = []
            runs.append((0, 0, [item]))
            continue
        stop = entry.ptr + extent(t)
        if not (run and entry.members is members and entry.member == last + 1
                and stop - first <= limit):
            if run:
                runs.append((first, end, run))
            run, first, members = [], entry.ptr, entry.members
        run.append(item)
        end, last = stop, entry.member
    if run:
        runs.append((first, end, run))
    return runs


def _pager(jobs: 'queue.SimpleQueue', fn: Callable) -> None:
    """Run ``madvise`` jobs ``(address, length, advice)`` until a None."""
    while True:
        job = jobs.get()
        if job is None:
            return
        fn(*job)


def sweep(items: Iterable[Any], tensor_of: Callable[[Any], Any] = lambda x: x,
          limit: int = WINDOW_BYTES) -> Iterator[Any]:
    """Yield ``items`` in order, mapping their tensors' pages a window at a time.

    A window is a run of consecutive items whose tensors the reader recorded,
    lying in consecutive members of one file, in ascending order, within
    ``limit`` bytes. Its pages are mapped in one call, ahead of its first item,
    and handed back in one call after its last, if every tensor in it is still
    as the reader built it (:func:`release_pages` of each, otherwise). The calls
    run on a helper thread, in order: the first two windows are mapped at the
    start, and after each window the thread hands it back, then maps the window
    after the next, so at most two windows are mapped at a time. Every other item
    is yielded on its own and released with :func:`release_pages`. The values
    never change; the thread is joined before this returns (or is closed).

    Args:
        items: What to go through (e.g. planned entries).
        tensor_of (callable): An item's checkpoint tensor.
        limit (int): Most bytes a window spans.

    Yields:
        Each item, in order.
    """
    fn = madvise()
    if fn is None:
        yield from items
        return
    page = _MADVISE['page']
    runs = _windows(list(items), tensor_of, limit)
    ahead = iter([(start // page * page, -(-end // page) * page) for start, end, _ in runs
                  if end])
    jobs: 'queue.SimpleQueue' = queue.SimpleQueue()
    pager = None

    def map_next() -> None:
        low, high = next(ahead, (0, 0))
        if high:
            jobs.put((low, high - low, _MADV_POPULATE_READ))

    try:
        for start, end, run in runs:
            if not end:
                yield run[0]
                release_pages(tensor_of(run[0]))
                continue
            if pager is None:  # the first window: start the thread, map two ahead
                pager = threading.Thread(target=_pager, args=(jobs, fn), daemon=True,
                                         name='mmfusionload-pages')
                pager.start()
                map_next()
                map_next()
            yield from run
            if all(_current(tensor_of(item)) is not None for item in run):
                low, high = -(-start // page) * page, end // page * page
                if high > low:
                    jobs.put((low, high - low, _MADV_DONTNEED))
            else:
                for item in run:
                    release_pages(tensor_of(item))
            map_next()
    finally:
        if pager is not None:
            jobs.put(None)
            pager.join()
