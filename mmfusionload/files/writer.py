"""Write checkpoints: atomically, with plain metadata, as ``.pth`` or ``.safetensors``.

A file is written to a temporary file in the destination's folder and renamed over the
destination only when complete (:func:`atomic_write`); an input is never overwritten
(:func:`check_destination`); what a written file's ``meta`` may hold is bounded and plain
(:func:`plain_metadata`), so the written file reads back through the restricted reader.
"""
import contextlib
import json
import math
import os
import os.path as osp
import signal
import tempfile
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import FusionLoadError

__all__ = ['TORCH_SUFFIXES', 'SAFETENSORS_SUFFIX', 'same_file', 'check_destination',
           'atomic_write', 'plain_metadata', 'module_versions', 'save_checkpoint']

TORCH_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin')
SAFETENSORS_SUFFIX = '.safetensors'


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (existing or not)."""
    if osp.realpath(a) == osp.realpath(b):
        return True
    try:
        return osp.exists(a) and osp.exists(b) and osp.samefile(a, b)
    except OSError:
        return False


def check_destination(dst: str, inputs: Sequence[str]) -> None:
    """Refuse a destination that is one of the inputs or has an unknown suffix."""
    problems = []
    for src in inputs:
        if same_file(src, dst):
            problems.append(f'{dst}: is the input checkpoint {src}; write to another file '
                            '(the input is never overwritten)')
    if not dst.endswith(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX, )):
        problems.append(f'{dst}: unknown suffix; use .pth (torch) or .safetensors')
    if not osp.isdir(osp.dirname(osp.abspath(dst))):
        problems.append(f'{dst}: folder {osp.dirname(osp.abspath(dst))} does not exist')
    if problems:
        raise FusionLoadError(problems, 'bad destination')


def _file_mode(path: str) -> int:
    """Permissions for a new ``path``: its current ones, else ``0o666`` less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into ``SystemExit`` while writing, so the ``finally`` that
    removes a temporary file runs (SIGINT already raises ``KeyboardInterrupt``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def atomic_write(dst: str, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp)`` on a temporary file next to ``dst``, then rename it to ``dst``.

    On any error, and on SIGINT, SIGTERM or SIGHUP, the temporary file is removed
    and ``dst`` is left as it was. The result has ``dst``'s permissions when it
    existed, else the umask's default (``mkstemp`` would leave it private to the owner).
    """
    folder = osp.dirname(osp.abspath(dst))
    with _signals_raise():
        fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(dst)}.', suffix='.tmp', dir=folder)
        os.close(fd)
        try:
            writer(tmp)
            with open(tmp, 'rb') as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode(dst))
            os.replace(tmp, dst)
        except BaseException:
            if osp.exists(tmp):
                os.unlink(tmp)
            raise


#: Bounds of the metadata a written checkpoint carries: values visited (a list
#: shared many times counts every time), nesting, characters per string.
META_NODES = 10000
META_DEPTH = 16
META_CHARS = 1 << 16


class _NotPlain(Exception):
    pass


def plain_metadata(meta: Mapping[str, Any], notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """``meta`` as plain JSON-able data: strings, finite numbers, bools, None, lists and
    string-keyed dicts, bounded by :data:`META_NODES`, :data:`META_DEPTH` and
    :data:`META_CHARS`. numpy numbers become Python numbers; a top-level entry
    holding anything else (an object, a tensor, a placeholder) is left out and
    named in ``notes``.
    """
    budget = [META_NODES]

    def conv(v: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > META_DEPTH:
            raise _NotPlain(f'more than {META_NODES} values or {META_DEPTH} levels')
        if v is None or type(v) in (bool, int):
            return v
        if type(v) is float:
            return v if math.isfinite(v) else repr(v)
        if type(v) is str:
            if len(v) > META_CHARS:
                raise _NotPlain(f'a string of {len(v)} characters')
            return v
        if type(v).__module__ == 'numpy' and hasattr(v, 'item') and getattr(v, 'ndim', 1) == 0 \
                and getattr(getattr(v, 'dtype', None), 'kind', '') in 'biuf':
            return conv(v.item(), depth)
        if type(v) in (list, tuple):
            return [conv(x, depth + 1) for x in v]
        if type(v) in (dict, OrderedDict):
            if not all(type(k) is str for k in v):
                raise _NotPlain('a dict with keys that are not strings')
            return {k: conv(x, depth + 1) for k, x in v.items()}
        raise _NotPlain(f'a {type(v).__name__}')

    out: Dict[str, Any] = {}
    for k, v in meta.items():
        if type(k) is not str:
            continue
        try:
            out[k] = conv(v, 0)
        except _NotPlain as e:
            if notes is not None:
                notes.append(f'meta entry {k!r} not written: {e}')
    return out


def module_versions(state: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Module name -> ``_metadata`` version of a state dict."""
    meta = getattr(state, '_metadata', None) or {}
    return {k: int(v['version']) for k, v in meta.items()
            if isinstance(v, Mapping) and v.get('version') is not None}


def _safetensors_metadata(meta: Mapping[str, Any], versions: Dict[str, int]) -> Dict[str, str]:
    out = {'format': 'pt'}
    for k, v in meta.items():
        if str(k) in ('format', 'module_versions'):
            continue
        out[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    out['module_versions'] = json.dumps(versions)
    return out


def save_checkpoint(path: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    container: Optional[Tuple[str, Mapping[str, Any]]] = None) -> None:
    """Write ``{'state_dict': state, 'meta': meta}`` atomically.

    ``.safetensors``: the tensors, ``meta`` entries as metadata strings (non-strings
    as JSON) and the ``_metadata`` versions as JSON under ``module_versions``.
    Otherwise ``torch.save`` (``_metadata`` travels with the state dict). ``meta`` is
    written as :func:`plain_metadata` makes it. ``container``: ``(key, entries)``
    to hold the tensors under ``key`` next to ``entries`` (another trainer's
    layout, e.g. OpenPCDet's ``model_state`` and ``version``; ``.pth`` only).
    """
    meta = plain_metadata(meta)
    if container is not None and path.endswith(SAFETENSORS_SUFFIX):
        raise FusionLoadError([f'{path}: a {container[0]!r} container is written as .pth, '
                               'not .safetensors'], 'bad destination')
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import save_file
        tensors, seen = OrderedDict(), set()
        for k, v in state.items():
            t = v.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[k] = t
        md = _safetensors_metadata(meta, module_versions(state))
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md))
    else:
        sd = OrderedDict(state)
        sd._metadata = OrderedDict(getattr(state, '_metadata', None) or {})  # type: ignore
        key, entries = container or ('state_dict', {})
        top = {key: sd, **dict(entries), 'meta': dict(meta)}
        atomic_write(path, lambda tmp: torch.save(top, tmp))


# ---------------------------------------------------------------- without a model
