"""Page release for checkpoint tensors: retired.

The readers used to return views of a private mapping of the file and give each
tensor's pages back (``madvise(MADV_DONTNEED)``) once it was read, reading them
again from the page cache for the copy. Under a concurrent writer that is unsafe:
pages given back after the values were checked were read again with the
writer's bytes (NaN reached a model after a "successful" load), and a file
truncated while mapped raised ``SIGBUS``. Every reader now reads the loaded bytes
once, through one descriptor, into private memory
(:mod:`mmfusionload.files.snapshot`): there is nothing of a file's to give back,
and giving back private anonymous pages would zero them.

:func:`release_pages` stays as the no-op its callers expect.
"""
from typing import Any

__all__ = ['release_pages']


def release_pages(t: Any) -> bool:
    """Nothing to release: checkpoint tensors live in private memory.

    Returns:
        bool: Always False (no pages were released).
    """
    return False
