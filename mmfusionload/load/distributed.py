"""Read each checkpoint once per job: rank 0 reads, every other rank receives.

Under an initialized ``torch.distributed`` process group with more than one
process, :func:`read_all` has rank 0 read and unwrap every source's file and
broadcast the result; the other ranks never open the files (so a path that
exists only on rank 0's file system is enough, and a shared file system sees
one reader instead of one per GPU). The order of collectives, the same on
every rank:

1. ``all_gather_object`` of each rank's number of sources (a mismatch fails
   on every rank);
2. ``broadcast_object_list`` of one header from rank 0: per source either the
   problems found reading it or its container name, stripped prefixes,
   ``meta``, ``_metadata`` and ``(key, shape, dtype)`` of every tensor;
3. ``broadcast`` of the tensors' bytes, packed into buckets of at most
   ``bucket_bytes`` (64 MiB; each tensor aligned to 64 bytes, a larger tensor
   gets a bucket of its own), on CPU for gloo and on the current CUDA device
   for NCCL. A tensor several sources share (sources naming the same file are
   read once and share its tensors) is sent once: the header names the first
   place it appears, and the receivers' sources share it too.

A file rank 0 cannot read becomes the same :class:`FusionLoadError` on every
rank, sent in step 2 before any tensor. A rank that stops taking part (killed,
or calling ``load_sources`` on one rank only) makes the others fail after the
process group's timeout (``init_process_group(timeout=...)``; MMEngine's
default is 30 minutes), also as a :class:`FusionLoadError`, never a hang.
"""
import pickle
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..checkpoint.containers import Unwrapped
from ..errors import FusionLoadError

#: Largest bucket of tensor bytes sent in one broadcast.
BUCKET_BYTES = 64 << 20
#: Alignment of each tensor inside a bucket (bytes).
ALIGN = 64
BroadcastOption = Union[bool, str]
ReadResult = Union[Unwrapped, FusionLoadError]


def _dist():
    import torch.distributed as dist
    return dist


def group_ready() -> bool:
    """Whether a process group is initialized (False when torch lacks distributed)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def should_broadcast(broadcast: BroadcastOption = 'auto') -> bool:
    """Whether checkpoints are read on rank 0 and broadcast.

    Args:
        broadcast (bool | str): ``'auto'``: when a process group with more than
            one process is initialized; ``True``: the same, but an error without
            an initialized process group; ``False``: every rank reads its files.

    Returns:
        bool: True to broadcast.

    Raises:
        FusionLoadError: ``broadcast=True`` without an initialized process group,
            or a value other than the three above.
    """
    if broadcast is False:
        return False
    if broadcast not in (True, 'auto'):
        raise FusionLoadError([f"broadcast must be 'auto', True or False, got {broadcast!r}"],
                              'bad option')
    if not group_ready():
        if broadcast is True:
            raise FusionLoadError(['broadcast=True needs an initialized torch.distributed '
                                   'process group (init_process_group / a launcher)'],
                                  'bad option')
        return False
    return _dist().get_world_size() > 1


def group_timeout() -> Optional[timedelta]:
    """The default process group's timeout (what bounds every wait here), if known."""
    try:
        dist = _dist()
        backend = dist.distributed_c10d._get_default_group()._get_backend(_comm_device())
        for owner in (getattr(backend, 'options', None), backend):
            timeout = getattr(owner, '_timeout', None)
            if isinstance(timeout, timedelta):
                return timeout
    except Exception:  # pragma: no cover - private API moved
        pass
    return None


def _comm_device() -> torch.device:
    """Where tensors travel: the current CUDA device for NCCL, else CPU."""
    dist = _dist()
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def read_local(specs: Sequence[Any], read_fn: Callable[[Any], Unwrapped],
               catch_all: bool = False) -> List[ReadResult]:
    """Read every source on this process; a :class:`FusionLoadError` is returned, not raised.

    Args:
        catch_all (bool): Return any other exception as a FusionLoadError too
            (the reading rank must always send a header).
    """
    out: List[ReadResult] = []
    for spec in specs:
        try:
            out.append(read_fn(spec))
        except FusionLoadError as e:
            out.append(e)
        except Exception as e:
            if not catch_all:
                raise
            name = getattr(spec, 'checkpoint', spec)
            out.append(FusionLoadError([f'{name}: {type(e).__name__}: {e}'],
                                       'cannot read checkpoint'))
    return out


def read_all(specs: Sequence[Any],
             read_fn: Callable[[Any], Unwrapped],
             broadcast: BroadcastOption = 'auto',
             src: int = 0,
             bucket_bytes: int = BUCKET_BYTES) -> List[ReadResult]:
    """Read (and unwrap) every source, once per job when broadcasting.

    Args:
        specs (Sequence[SourceSpec]): The sources, in the same order on every rank.
        read_fn (Callable): Reads one source into an :class:`Unwrapped`
            (:func:`mmfusionload.load.pipeline.read_source`); called on ``src`` only
            when broadcasting.
        broadcast (bool | str): See :func:`should_broadcast`.
        src (int): The rank that reads. Defaults to 0.
        bucket_bytes (int): Largest broadcast of tensor bytes.

    Returns:
        list: Per source, an :class:`Unwrapped` or the :class:`FusionLoadError`
        reading it raised; the same on every rank.

    Raises:
        FusionLoadError: The ranks disagree on the number of sources, or a
            collective failed (e.g. a rank left; bounded by the group's timeout).
    """
    if not should_broadcast(broadcast):
        return read_local(specs, read_fn, catch_all=True)
    dist = _dist()
    rank = dist.get_rank()
    timeout = group_timeout()
    try:
        _check_counts(len(specs))
        results = read_local(specs, read_fn, catch_all=True) if rank == src else None
        header = _make_header(results, bucket_bytes) if rank == src else None
        header = _broadcast_object(header, src)
        tensors = _broadcast_tensors(header, results, src)
    except FusionLoadError:
        raise
    except Exception as e:  # a collective failed or timed out
        what = ('sending the checkpoints to the other ranks' if rank == src else
                f'receiving the checkpoints from rank {src}')
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise FusionLoadError(
            [f'rank {rank}: {what} failed: {type(e).__name__}: {msg} (every wait is bounded '
             f'by the process group timeout, {timeout or "see init_process_group"}; '
             'load_sources must run on every rank, or pass broadcast=False)'],
            'cannot read checkpoint') from e
    if rank == src:
        return _as_sent(results, header)  # type: ignore[arg-type]
    return _rebuild(header, tensors)


def _as_sent(results: List[ReadResult], header: Dict[str, Any]) -> List[ReadResult]:
    """Rank 0's results made to match what the others rebuild from the header."""
    out: List[ReadResult] = []
    for res, sent in zip(results, header['sources']):
        if 'problems' in sent and not isinstance(res, FusionLoadError):
            res = FusionLoadError(sent['problems'], sent['title'])
        elif isinstance(res, Unwrapped) and res.meta is not sent['meta']:
            res.meta = sent['meta']
        out.append(res)
    return out


def _check_counts(n: int) -> None:
    dist = _dist()
    counts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, n)
    if len(set(counts)) > 1:
        raise FusionLoadError(
            [f'the ranks were given different numbers of sources: '
             f'{", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))}'],
            'inconsistent sources across ranks')


def _broadcast_object(obj: Any, src: int) -> Any:
    dist = _dist()
    box = [obj]
    kwargs = {}
    if dist.get_backend() == 'nccl':
        kwargs['device'] = _comm_device()
    dist.broadcast_object_list(box, src=src, **kwargs)
    return box[0]


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


def _tensor_problem(key: str, t: torch.Tensor) -> Optional[str]:
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type == 'meta':
        return f'{key}: a {t.layout} / quantized / meta tensor cannot be broadcast'
    return None


def _make_header(results: List[ReadResult], bucket_bytes: int) -> Dict[str, Any]:
    """What every other rank needs to rebuild the results, tensors aside."""
    sources: List[Dict[str, Any]] = []
    seen: Dict[int, Tuple[int, int]] = {}  # id(tensor) -> (source, tensor) it is sent as
    for res in results:
        if isinstance(res, FusionLoadError):
            sources.append(dict(problems=list(res.problems), title=res.title))
            continue
        bad = [p for p in (_tensor_problem(k, t) for k, t in res.state.items()) if p]
        if bad:
            sources.append(dict(problems=bad, title='cannot broadcast checkpoint'))
            continue
        tensors = []
        for ti, (k, t) in enumerate(res.state.items()):
            desc = (k, tuple(t.shape), str(t.dtype)[len('torch.'):])
            first = seen.setdefault(id(t), (len(sources), ti))
            # a tensor already listed (the same object, from a file read once): a reference
            tensors.append(desc if first == (len(sources), ti) else desc + (first, ))
        meta = res.meta if _picklable(res.meta) else {}
        sources.append(dict(container=res.container, stripped=list(res.stripped), meta=meta,
                            skipped=list(res.skipped), metadata=dict(res.metadata),
                            family=res.family, copy=res.copy, tensors=tensors))
    return dict(sources=sources, bucket_bytes=int(bucket_bytes))


def _nbytes(shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def bucket_layout(header: Dict[str, Any]) -> List[Tuple[int, List[Tuple[int, int, int, int]]]]:
    """Split the header's tensors into buckets of at most ``header['bucket_bytes']``.

    A tensor listed as a reference to an earlier one (a fourth element) takes no
    space: it is not sent again.

    Returns:
        list: ``(bucket size, [(source index, tensor index, offset, nbytes)])``
        per bucket, the same on every rank.
    """
    bucket_bytes = header['bucket_bytes']
    buckets: List[Tuple[int, List[Tuple[int, int, int, int]]]] = []
    items: List[Tuple[int, int, int, int]] = []
    size = 0
    for si, src in enumerate(header['sources']):
        for ti, (_, shape, dtype, *ref) in enumerate(src.get('tensors', ())):
            n = _nbytes(shape, getattr(torch, dtype))
            if n == 0 or ref:
                continue
            off = -(-size // ALIGN) * ALIGN
            if items and off + n > bucket_bytes:
                buckets.append((size, items))
                items, off = [], 0
            items.append((si, ti, off, n))
            size = off + n
    if items:
        buckets.append((size, items))
    return buckets


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a flat uint8 tensor (a view when contiguous)."""
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def _broadcast_tensors(header: Dict[str, Any], results: Optional[List[ReadResult]],
                       src: int) -> List[torch.Tensor]:
    """Send (on ``src``) or receive (elsewhere) every tensor's bytes, bucket by bucket.

    Returns:
        list[Tensor]: On receivers, the filled buckets; on ``src``, empty.
    """
    dist = _dist()
    device = _comm_device()
    sending = dist.get_rank() == src
    received: List[torch.Tensor] = []
    send_buf: Optional[torch.Tensor] = None
    for size, items in bucket_layout(header):
        if sending:
            if send_buf is None or send_buf.numel() < size:
                send_buf = torch.empty(size, dtype=torch.uint8, device=device)
            bucket = send_buf[:size]
            for si, ti, off, n in items:
                state = results[si].state  # type: ignore[index, union-attr]
                t = state[header['sources'][si]['tensors'][ti][0]]
                bucket[off:off + n].copy_(_as_bytes(t))
        else:
            bucket = torch.empty(size, dtype=torch.uint8, device=device)
            received.append(bucket)
        dist.broadcast(bucket, src=src)
    return received


def _rebuild(header: Dict[str, Any], buckets: List[torch.Tensor]) -> List[ReadResult]:
    """The results on a receiving rank, their tensors views of the received buckets."""
    views: Dict[Tuple[int, int], torch.Tensor] = {}
    for bucket, (_, items) in zip(buckets, bucket_layout(header)):
        for si, ti, off, n in items:
            views[si, ti] = bucket[off:off + n]
    device = buckets[0].device if buckets else torch.device('cpu')
    built: Dict[Tuple[int, int], torch.Tensor] = {}
    out: List[ReadResult] = []
    for si, src in enumerate(header['sources']):
        if 'problems' in src:
            out.append(FusionLoadError(src['problems'], src['title']))
            continue
        state: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        for ti, (key, shape, dtype, *ref) in enumerate(src['tensors']):
            if ref:  # sent once for an earlier source: the same tensor, as on rank 0
                state[key] = built[tuple(ref[0])]
                continue
            dt = getattr(torch, dtype)
            raw = views.get((si, ti))
            state[key] = (torch.empty(shape, dtype=dt, device=device) if raw is None
                          else raw.view(dt).view(shape))
            built[si, ti] = state[key]
        out.append(Unwrapped(state, src['metadata'], src['container'], src['stripped'],
                             src['meta'], src['skipped'], family=src.get('family', ''),
                             copy=src.get('copy', '')))
    return out
