"""Remote checkpoints: fetched to a local file first, then read like any local file.

MMEngine 0.10.7 (``mmengine/runner/checkpoint.py``) reads every non-local URI
with a ``CheckpointLoader`` scheme whose last step is ``torch.load`` on a
downloaded file or on bytes: ``http(s)://`` through
``torch.hub.load_state_dict_from_url`` (``weights_only`` defaults to False there
in torch 2.13, so a served pickle runs code), ``torchvision://``/``modelzoo://``,
``open-mmlab://``/``openmmlab://`` and ``mmcls://`` by looking a name up in
MMEngine's URL tables and then over HTTP, ``s3://``/``petrel://`` through a file
backend's ``get`` (bytes). None of that reading is used here: :func:`fetch`
resolves the URI with MMEngine's own tables, downloads an HTTP file into torch
hub's cache folder (``<torch.hub.get_dir()>/checkpoints``, where MMEngine and
torch hub put it, reused when already there) and gives the path of a local file
for the restricted reader.

A file name that follows torch hub's naming convention ``name-<sha256 prefix>.ext``
(eight or more hex digits, as OpenMMLab's and torchvision's model zoos name their
files) is checked against that prefix when it is downloaded, as
``torch.hub.download_url_to_file`` does with ``check_hash=True``. Bytes from an
object store are written to a private temporary file that is unlinked once read.
"""
import os
import os.path as osp
import re
import tempfile
from typing import Any, Callable, Optional, Tuple
from urllib.parse import urlparse

from ..errors import FusionLoadError

__all__ = ['is_local', 'fetch', 'local_copy', 'mmengine_schemes', 'users_loader']

#: torch hub's naming convention: ``-<hex>.`` before the extension; eight or more digits.
HASH_PREFIX = re.compile(r'-([a-f0-9]{8,})\.')
_HTTP = ('http://', 'https://')


def _loader_of(uri: str) -> Callable:
    from mmengine.runner.checkpoint import CheckpointLoader
    return CheckpointLoader._get_checkpoint_loader(uri)


def is_local(uri: str) -> bool:
    """Whether MMEngine reads ``uri`` as a local path (no scheme of its own)."""
    return getattr(_loader_of(uri), '__name__', '') in ('load_from_local', 'load_local')


def _ours_or_mmengines(fn: Callable) -> bool:
    return (getattr(fn, '__module__', '') == 'mmengine.runner.checkpoint'
            or getattr(fn, '_mmfusionload_remote', False))


def users_loader(uri: str) -> Optional[Callable]:
    """The loader of a scheme the user registered with ``CheckpointLoader`` (their own
    code, not a file's), or None for MMEngine's own schemes."""
    fn = _loader_of(uri)
    return None if _ours_or_mmengines(fn) else fn


def mmengine_schemes() -> Tuple[str, ...]:
    """Prefixes of the non-local schemes MMEngine itself registers (not a user's)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    return tuple(p for p, fn in CheckpointLoader._schemes.items()
                 if p and _ours_or_mmengines(fn))


def _named(table: Callable[[], dict], name: str, uri: str) -> str:
    try:
        urls = table()
    except Exception as e:  # torchvision absent, a table that does not parse
        raise FusionLoadError([f'{uri}: cannot resolve the name: {type(e).__name__}: {e}'],
                              'cannot read checkpoint') from None
    if name not in urls:
        raise FusionLoadError([f'{uri}: {name!r} is not in MMEngine\'s table for this scheme'],
                              'cannot read checkpoint')
    return str(urls[name])


def resolve(uri: str) -> Tuple[str, str]:
    """Resolve a URI to ``('http', url)``, ``('local', path)`` or ``('bytes', uri)``,
    with the tables MMEngine 0.10.7's loaders use for the same scheme."""
    from mmengine.runner import checkpoint as ck
    if uri.startswith(_HTTP):
        return 'http', uri
    for prefix in ('modelzoo://', 'torchvision://'):
        if uri.startswith(prefix):
            return 'http', _named(ck.get_torchvision_models, uri[len(prefix):], uri)
    if uri.startswith('mmcls://'):
        return 'http', _named(ck.get_mmcls_models, uri[len('mmcls://'):], uri)
    for prefix in ('open-mmlab://', 'openmmlab://'):
        if uri.startswith(prefix):
            name = uri[len(prefix):]
            name = ck.get_deprecated_model_names().get(name, name)
            url = _named(ck.get_external_models, name, uri)
            if url.startswith(_HTTP):
                return 'http', url
            return 'local', osp.join(ck._get_mmengine_home(), url)
    if uri.startswith('pavi://'):
        raise FusionLoadError([f'{uri}: pavi:// files are not read here; download the file '
                               'and give its path'], 'cannot read checkpoint')
    return 'bytes', uri


def _download(url: str, model_dir: Optional[str] = None) -> str:
    import torch.hub
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    name = osp.basename(urlparse(url).path)
    if not name or name in ('.', '..'):
        raise FusionLoadError([f'{url}: the URL names no file'], 'cannot read checkpoint')
    cached = osp.join(model_dir, name)
    if osp.exists(cached):
        return cached
    os.makedirs(model_dir, exist_ok=True)
    found = HASH_PREFIX.search(name)
    try:
        torch.hub.download_url_to_file(url, cached, found.group(1) if found else None,
                                       progress=os.isatty(0))
    except Exception as e:  # HTTP errors, a hash that does not match, a closed connection
        raise FusionLoadError([f'{url}: download failed: {type(e).__name__}: '
                               f'{str(e).splitlines()[0][:300] if str(e) else ""}'],
                              'cannot read checkpoint') from None
    return cached


def _fetch_http(url: str) -> str:
    """Rank 0 of a job downloads first, the others then find the cached file (as MMEngine)."""
    from mmengine.dist import barrier, get_dist_info
    rank, world = get_dist_info()
    path = _download(url) if rank == 0 else None
    if world > 1:
        barrier()
        if rank > 0:
            path = _download(url)
    return path


def fetch(uri: str) -> str:
    """The local file a remote URI names: downloaded into torch hub's cache when HTTP.

    Raises:
        FusionLoadError: The name is not in MMEngine's tables, the download
            fails or its hash prefix does not match.
    """
    kind, where = resolve(uri)
    if kind == 'http':
        return _fetch_http(where)
    if kind == 'local':
        return where
    raise ValueError(f'{uri}: object-store bytes, not a file (use local_copy)')


class local_copy:
    """``with local_copy(uri) as path``: a local file holding what ``uri`` names.

    HTTP and model-zoo names are the cached download (kept); object-store bytes are
    written to a private temporary file, unlinked on exit (a mapping of it stays valid).
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._tmp: Optional[str] = None

    def __enter__(self) -> str:
        kind, where = resolve(self.uri)
        if kind != 'bytes':
            return fetch(self.uri)
        try:
            from mmengine.fileio import get
            data = get(where)
        except Exception as e:
            raise FusionLoadError([f'{self.uri}: cannot fetch: {type(e).__name__}: {e}'],
                                  'cannot read checkpoint') from None
        suffix = osp.splitext(urlparse(self.uri).path)[1] or '.pth'
        fd, self._tmp = tempfile.mkstemp(prefix='mmfusionload-', suffix=suffix)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        return self._tmp

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            os.unlink(self._tmp)
