"""One consistent snapshot of a file: every byte read through one descriptor, into
private memory, with the file's identity checked before and after.

A checkpoint on disk may be replaced (``os.replace`` of a ``latest.pth``),
truncated (``torch.save`` to the same path truncates first) or rewritten in place
while it is read. :class:`Snapshot` makes a read see one version or fail:

* the file is opened once; every read is a ``pread`` on that descriptor, so a
  rename that puts another file at the path changes nothing of what is read;
* nothing is memory-mapped: a truncation never becomes a ``SIGBUS``, and no
  page is read twice (the bytes checked are the bytes copied);
* a read that comes back short (the file shrank) and a file whose size or
  modification time moved between :meth:`Snapshot.open` and
  :meth:`Snapshot.check` fail with :class:`FileChangedError` ("changed while
  being read");
* :meth:`Snapshot.check` also reads every range read so far a second time and
  compares it with what was read (a write the times do not show, on a file
  system that stamps coarse times, still changes bytes of the two reads),
  except the zip members the reader proves by their CRC-32: read after the
  directory, a member another write changed no longer matches it.

A file modified less than :data:`QUIET_S` ago may still be being written (a
writer between two ``write`` calls leaves a file whose beginning is the new
version and whose end is the old one, at rest, with nothing that changes while
it is read): :meth:`Snapshot.open` waits until the file has been quiet that
long (at most :data:`MAX_QUIET_WAIT_S`). Waiting also moves the kernel's coarse
clock (one tick, 1-4 ms on Linux), which stamps file times, past the file's
time, so any later write stamps a time that differs.
"""
import os
import time
from typing import Any, List, Optional, Tuple, Union

import torch

from .pickle_ops import CorruptFileError

__all__ = ['Snapshot', 'FileChangedError']

#: A file modified less than this ago (seconds) may still be being written.
QUIET_S = 0.02
#: Longest wait for a file to be quiet; a file still changing then is read, and a
#: change during the read is found by :meth:`Snapshot.check`.
MAX_QUIET_WAIT_S = 1.0
#: Bytes read at a time when :meth:`Snapshot.check` reads a storage's range again.
CHECK_CHUNK = 4 << 20
_COARSE = getattr(time, 'CLOCK_REALTIME_COARSE', time.CLOCK_REALTIME)


class FileChangedError(CorruptFileError):
    """The file changed (size, times, or fewer bytes than it had) while being read."""


def _identity(st: os.stat_result) -> Tuple[int, int, int, int]:
    # not the change time: unlinking the file (a rename over it) moves it, the data stays
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Snapshot:
    """A file read through one descriptor (a context manager).

    Args:
        path (str): The file.

    Attributes:
        size (int): Its size when opened.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = -1
        self.size = 0
        self._id: Optional[Tuple[int, ...]] = None
        # every range read so far, with what it read: compared again by check()
        self._reads: List[Tuple[int, Union[bytes, torch.UntypedStorage]]] = []

    def open(self) -> 'Snapshot':
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
        st = os.fstat(self.fd)
        deadline = time.monotonic() + MAX_QUIET_WAIT_S
        quiet = int(QUIET_S * 1e9)
        # modified just now: maybe still being written (and a write later in the clock's
        # current tick would keep the time); a time in the future is another clock's
        while time.monotonic() < deadline:
            age = time.clock_gettime_ns(_COARSE) - st.st_mtime_ns
            if age > quiet or age < -10**9:
                break
            time.sleep(max(0.001, (quiet - age) / 1e9))
            st = os.fstat(self.fd)
        self._id = _identity(st)
        self.size = st.st_size
        return self

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> 'Snapshot':
        return self.open() if self.fd < 0 else self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def changed(self, what: str) -> FileChangedError:
        return FileChangedError(f'the file changed while being read ({what}); read it again '
                                'once it is written')

    def pread(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset`` (inside the size seen when opened)."""
        if n < 0 or offset < 0 or offset + n > self.size:
            raise CorruptFileError(f'{n} bytes at {offset} run past the end of the file '
                                   f'({self.size} bytes)')
        out = os.pread(self.fd, n, offset) if n else b''
        if len(out) != n:
            raise self.changed(f'{len(out)} of {n} bytes at {offset}')
        if n:
            self._reads.append((offset, out))
        return out

    def read_storage(self, offset: int, n: int, recheck: bool = True) -> torch.UntypedStorage:
        """``n`` bytes at ``offset`` into a new private CPU storage.

        ``recheck=False``: the caller proves the bytes otherwise (a zip member's
        CRC-32), so :meth:`check` does not read them again.
        """
        if n < 0 or offset < 0 or offset + n > self.size:
            raise CorruptFileError(f'{n} bytes at {offset} run past the end of the file '
                                   f'({self.size} bytes)')
        storage = torch.UntypedStorage(n)
        if n:
            view = memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
            done = 0
            while done < n:
                got = os.preadv(self.fd, [view[done:]], offset + done)
                if got <= 0:
                    raise self.changed(f'{done} of {n} bytes at {offset}')
                done += got
            if recheck:
                self._reads.append((offset, storage))
        return storage

    def check(self) -> None:
        """Raise :class:`FileChangedError` if the file is not the one opened: its size or
        modification time moved, or a range read so far reads otherwise now."""
        if _identity(os.fstat(self.fd)) != self._id:
            raise self.changed('its size or modification time moved')
        reads, self._reads = self._reads, []
        buf: Optional[torch.Tensor] = None
        for offset, held in reads:
            if isinstance(held, bytes):
                if os.pread(self.fd, len(held), offset) != held:
                    raise self.changed(f'{len(held)} bytes at {offset} differ on a second read')
                continue
            have = torch.empty(0, dtype=torch.uint8).set_(held)
            if buf is None:
                buf = torch.empty(CHECK_CHUNK, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            n, done = have.numel(), 0
            while done < n:
                k = min(CHECK_CHUNK, n - done)
                got = 0
                while got < k:
                    r = os.preadv(self.fd, [view[got:k]], offset + done + got)
                    if r <= 0:
                        raise self.changed(f'{done + got} of {n} bytes at {offset} on a second '
                                           'read')
                    got += r
                if not torch.equal(buf[:k], have[done:done + k]):
                    raise self.changed(f'{n} bytes at {offset} differ on a second read')
                done += k

    def file(self, start: int = 0) -> 'SnapshotFile':
        """A read-only file object over this descriptor (``seek``/``read``/``readline``)."""
        return SnapshotFile(self, start)


class SnapshotFile:
    """A file object reading a :class:`Snapshot` with ``pread`` (its own position)."""

    def __init__(self, snap: Snapshot, pos: int = 0):
        self.snap, self.pos = snap, pos

    def fileno(self) -> int:
        return self.snap.fd

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.snap.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.snap.size - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        out = self.snap.pread(self.pos, n)
        self.pos += n
        return out

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast('B')
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def readline(self, limit: int = -1) -> bytes:
        left = max(0, self.snap.size - self.pos)
        n = left if limit is None or limit < 0 else min(limit, left)
        chunk = self.snap.pread(self.pos, n) if n <= 4096 else self.snap.pread(self.pos, 4096)
        i = chunk.find(b'\n')
        line = chunk if i < 0 else chunk[:i + 1]
        self.pos += len(line)
        return line
