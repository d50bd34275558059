"""Check a checkpoint's floating-point values for NaN/Inf beside the reader.

A load checks every value it writes before it writes the first one (all or
nothing), which reads every byte once more. While the reader parses a file's
pickle (Python, one core), :class:`ValueScan` runs that check for the tensors
built so far on a second core: the main thread hands it batches of about
:data:`BATCH_BYTES`, and one call into torch per dtype checks a whole batch with
the GIL released. A tensor found finite is marked so
(:func:`~mmfusionload.pages.track`, ``finite=True``) and the load's check
(:func:`~mmfusionload.reader.all_finite`) skips it; everything else (a batch not
reached when parsing ends, a dtype not scanned, a tensor whose norm overflows)
is checked on demand as before. Nothing is ever accepted on this scan's word
that it did not prove: a finite L2 norm (torch 2.13.0's ``_foreach_norm``,
``sqrt(sum(x * x))``) means every element is finite, since NaN and Inf
propagate through squares and sums; an infinite norm of finite values only
sends the tensor to the exact check.

Pages the scan faults in are given back after each batch (``MADV_DONTNEED``).
That is safe only while nothing can have written the mapping: the scan runs
only inside the reader, on a mapping the reader created for this read, and is
stopped and joined before any tensor leaves the reader.

With a single usable core the scan does not start.
"""
import os
import threading
from queue import SimpleQueue
from typing import Dict, List, Optional

import torch

from .pages import extent, madvise

#: Bytes of tensors per batch: the scan's extra resident memory is about one batch.
BATCH_BYTES = 8 << 20
#: dtypes scanned (torch 2.13.0 ``_foreach_norm`` keeps the dtype; float16/bfloat16
#: norms overflow early and would only send tensors to the exact check).
SCANNED = (torch.float32, torch.float64)
_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class ValueScan:
    """A background NaN/Inf check of the tensors a reader builds on one mapping.

    Args:
        lo (int): Address of the mapping's first byte.
        hi (int): Address one past its last byte.

    Use :meth:`start` (None when it would not help), :meth:`add` each tensor as
    it is built, and :meth:`stop` before the tensors leave the reader.
    """

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.finite: Dict[int, torch.Tensor] = {}  # id -> tensor proven finite
        self._batch: List[torch.Tensor] = []
        self._bytes = 0
        self._queue: SimpleQueue = SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name='mmfusionload-value-scan',
                                        daemon=True)

    @classmethod
    def start(cls, lo: int, hi: int) -> Optional['ValueScan']:
        """A running scan of the mapping ``[lo, hi)``, or None (one core, no madvise)."""
        if usable_cores() < 2 or madvise() is None:
            return None
        scan = cls(lo, hi)
        scan._thread.start()
        return scan

    def add(self, t: torch.Tensor) -> None:
        """Queue a tensor the reader built on the mapping (others are ignored)."""
        if t.dtype not in SCANNED or not t.numel():
            return
        self._batch.append(t)
        self._bytes += t.numel() * t.element_size()
        if self._bytes >= BATCH_BYTES:
            self._queue.put(self._batch)
            self._batch, self._bytes = [], 0

    def stop(self, finish: bool = False) -> Dict[int, torch.Tensor]:
        """Stop and wait: after the batch in hand, or with ``finish`` after every
        tensor added. Tensors not reached stay unproven.

        Returns:
            dict: ``id(tensor) -> tensor`` for the tensors proven finite.
        """
        if finish:
            if self._batch:
                self._queue.put(self._batch)
        else:
            self._stopped = True
        self._queue.put(None)
        self._thread.join()
        self._batch = []
        return self.finite

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None or self._stopped:
                return
            try:
                self._scan(batch)
            except Exception:  # a tensor the scan cannot take: checked on demand instead
                pass

    def _scan(self, batch: List[torch.Tensor]) -> None:
        for dtype in SCANNED:
            group = [t for t in batch if t.dtype == dtype]
            if not group:
                continue
            norms = torch._foreach_norm(group, 2)
            for t, ok in zip(group, torch.stack(norms).isfinite().tolist()):
                if ok:
                    self.finite[id(t)] = t
        self._give_back(batch)

    def _give_back(self, batch: List[torch.Tensor]) -> None:
        """Release the pages the batch touched (clean pages of this read's mapping)."""
        page = os.sysconf('SC_PAGE_SIZE')
        lo = min(t.data_ptr() for t in batch) // page * page
        hi = max(t.data_ptr() + extent(t) for t in batch)
        hi = -(-hi // page) * page
        lo, hi = max(lo, self.lo), min(hi, self.hi)
        if hi > lo:
            madvise()(lo, hi - lo, _MADV_DONTNEED)
