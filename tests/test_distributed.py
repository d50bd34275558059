"""Read-once loading under torch.distributed: two CPU processes over gloo.

Rank 0 reads the files and broadcasts; rank 1 is given paths that do not exist
on its side and must end with rank 0's weights; a corrupt file on rank 0 must
fail on both ranks, quickly and with the same message.
"""
import json
import os
import os.path as osp
import socket
import sys
import time
import traceback
from collections import OrderedDict
from datetime import timedelta

import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel

import mmfusionload  # noqa: F401
from mmfusionload import FusionLoadError, load_sources
from mmfusionload.load.distributed import bucket_layout, read_all, should_broadcast

dist = pytest.importorskip('torch.distributed')
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason='torch.distributed with gloo is not available')

PG_TIMEOUT_S = 30


class Small(nn.Module):
    """A LiDAR and a camera branch, BEVFusion's attribute names, a few real layers."""

    def __init__(self):
        super().__init__()
        self.pts_backbone = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.img_backbone = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32),
                                          nn.Linear(32, 8, bias=False))
        self.fusion_layer = nn.Conv2d(16, 8, 1)


def _trained(seed: int) -> 'OrderedDict[str, torch.Tensor]':
    torch.manual_seed(seed)
    m = Small()
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.randn_like(v))
    return m.state_dict()


def _write_sources(d: str) -> dict:
    from safetensors.torch import save_file
    sd = _trained(1)
    lidar = OrderedDict((k, v) for k, v in sd.items() if k.startswith('pts_backbone.'))
    camera = OrderedDict(('backbone.' + k[len('img_backbone.'):], v) for k, v in sd.items()
                         if k.startswith('img_backbone.'))
    paths = dict(lidar=osp.join(d, 'lidar.pth'), camera=osp.join(d, 'camera.safetensors'),
                 corrupt=osp.join(d, 'corrupt.pth'), both=osp.join(d, 'both.pth'))
    torch.save({'state_dict': lidar, 'meta': {'epoch': 3}}, paths['lidar'])
    torch.save({'state_dict': sd}, paths['both'])
    save_file(dict(camera), paths['camera'])
    with open(paths['lidar'], 'rb') as f:
        data = f.read()
    with open(paths['corrupt'], 'wb') as f:
        f.write(data[:len(data) // 2])
    torch.save(sd, osp.join(d, 'expected.pt'))
    return paths


class SmallRun(BaseModel):
    """:class:`Small`'s layers (same keys) as an MMEngine model a Runner tests."""

    def __init__(self):
        super().__init__()
        small = Small()
        self.pts_backbone, self.img_backbone = small.pts_backbone, small.img_backbone
        self.fusion_layer = small.fusion_layer

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = self.pts_backbone(torch.stack(inputs))
        return [dict(score=float(v)) for v in x.mean(dim=(1, 2, 3))]


class MeanScore(BaseMetric):
    default_prefix = 'small'

    def process(self, data_batch, data_samples):
        self.results += [s['score'] for s in data_samples]

    def compute_metrics(self, results):
        return dict(score=sum(results) / len(results))


def _runner_test(rank: int, d: str, sources: list, broadcast) -> dict:
    """``FusionLoadHook(broadcast=...)`` in a real MMEngine Runner (``launcher='pytorch'``
    in the process group already set up), through ``runner.test()``."""
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    os.environ.setdefault('LOCAL_RANK', str(rank))
    torch.manual_seed(0)  # the same initial weights on both ranks
    data = [dict(inputs=torch.randn(4, 6, 6)) for _ in range(4)]
    runner = Runner(
        model=SmallRun(), work_dir=osp.join(d, f'runner_{broadcast}'),
        experiment_name=f'broadcast_{broadcast}', launcher='pytorch',
        # CPU processes: DistributedDataParallel takes no device_ids there
        cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel', device_ids=None)),
        test_dataloader=dict(dataset=data, batch_size=1, num_workers=0,
                             sampler=dict(type='DefaultSampler', shuffle=False),
                             collate_fn=dict(type='pseudo_collate')),
        test_cfg=dict(), test_evaluator=Evaluator(MeanScore()),
        custom_hooks=[dict(type='FusionLoadHook', sources=sources, broadcast=broadcast)],
        env_cfg=dict(dist_cfg=dict(backend='gloo')), default_hooks=dict(logger=None))
    metrics = runner.test()
    hook = next(h for h in runner.hooks if type(h).__name__ == 'FusionLoadHook')
    torch.save(runner.model.module.state_dict(),
               osp.join(d, f'runner_{broadcast}_rank{rank}.pt'))
    return dict(metrics=metrics, world=runner.world_size,
                wrapper=type(runner.model).__name__,
                loaded=sorted(k for s in hook.report.sources for k in s.loaded))


def _sources(paths: dict, rank: int, lidar: str = 'lidar', camera: str = 'camera') -> list:
    if rank != 0:  # nothing of rank 0's files exists here
        paths = {k: f'/nonexistent/rank{rank}/{osp.basename(v)}' for k, v in paths.items()}
    return [dict(modality='lidar', checkpoint=paths[lidar]),
            dict(modality='camera', checkpoint=paths[camera])]


def _worker(rank: int, world: int, port: int, d: str, paths: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
    import mmfusionload.load.pipeline as loading
    opened = []
    real_read = loading.read_checkpoint

    def spy(path, *args, **kwargs):
        opened.append(path)
        return real_read(path, *args, **kwargs)

    loading.read_checkpoint = spy
    out = {}
    code = 0
    try:
        # 1. a good load: rank 1 only has paths that do not exist
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = Small()
        report = load_sources(model, _sources(paths, rank), logger=None)
        torch.save(model.state_dict(), osp.join(d, f'ok_rank{rank}.pt'))
        out['ok'] = dict(loaded=sorted(k for s in report.sources for k in s.loaded),
                         opened=list(opened), broadcast=should_broadcast('auto'))
        dist.barrier()

        # 2. a corrupt file on rank 0: the same FusionLoadError everywhere, quickly
        model = Small()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        try:
            load_sources(model, _sources(paths, rank, lidar='corrupt'), logger=None)
            out['corrupt'] = dict(raised=None)
        except FusionLoadError as e:
            out['corrupt'] = dict(raised=str(e), problems=e.problems)
        out['corrupt']['seconds'] = time.perf_counter() - t0
        out['corrupt']['unchanged'] = all(torch.equal(v, before[k])
                                          for k, v in model.state_dict().items())
        dist.barrier()

        # 3. ranks disagreeing on the number of sources
        srcs = _sources(paths, rank)[:1 if rank else 2]
        try:
            load_sources(Small(), srcs, logger=None)
            out['counts'] = dict(raised=None)
        except FusionLoadError as e:
            out['counts'] = dict(raised=str(e))
        dist.barrier()

        # 4. many small buckets give the same tensors
        from mmfusionload.load.pipeline import read_source, reading_once
        from mmfusionload.load.source import parse_source
        specs = [parse_source(s) for s in _sources(paths, rank)]
        res = read_all(specs, read_source, bucket_bytes=300)
        torch.save([OrderedDict((k, v.clone()) for k, v in r.state.items()) for r in res],
                   osp.join(d, f'buckets_rank{rank}.pt'))
        out['buckets'] = dict(meta=[r.meta for r in res], container=[r.container for r in res])
        dist.barrier()

        # 5. two sources of one file: read once on rank 0, its tensors sent once
        sent = []
        real_broadcast = dist.broadcast

        def counting_broadcast(tensor, *args, **kwargs):
            sent.append(tensor.numel() * tensor.element_size())
            return real_broadcast(tensor, *args, **kwargs)

        opened.clear()
        dist.broadcast = counting_broadcast
        try:
            torch.manual_seed(0)
            model = Small()
            report = load_sources(model, _sources(paths, rank, lidar='both', camera='both'),
                                  logger=None)
            with reading_once():
                res = read_all([parse_source(s) for s in
                                _sources(paths, rank, lidar='both', camera='both')], read_source)
        finally:
            dist.broadcast = real_broadcast
        torch.save(model.state_dict(), osp.join(d, f'both_rank{rank}.pt'))
        out['both'] = dict(opened=list(opened), sent=sent,
                           loaded=[sorted(s.loaded) for s in report.sources],
                           shared=all(res[0].state[k] is res[1].state[k] for k in res[0].state),
                           keys=[list(r.state) for r in res])
        dist.barrier()

        # 6. the hook in a real Runner: broadcast='auto' (rank 1 without the files) and
        # broadcast=False (every rank reads the files, which both have here)
        out['runner'] = {}
        for broadcast, srcs in (('auto', _sources(paths, rank)), (False, _sources(paths, 0))):
            opened.clear()
            out['runner'][str(broadcast)] = _runner_test(rank, d, srcs, broadcast)
            out['runner'][str(broadcast)]['opened'] = list(opened)
            dist.barrier()

        # 7. rank 1 leaves without loading: rank 0 gets a FusionLoadError, not a hang
        if rank == 0:
            t0 = time.perf_counter()
            try:
                load_sources(Small(), _sources(paths, rank), logger=None)
                out['left'] = dict(raised=None)
            except FusionLoadError as e:
                out['left'] = dict(raised=str(e))
            out['left']['seconds'] = time.perf_counter() - t0
    except BaseException:
        out['error'] = traceback.format_exc()
        code = 1
    finally:
        with open(osp.join(d, f'result_rank{rank}.json'), 'w') as f:
            json.dump(out, f)
        # Leave without tearing gloo (and the Runner's DDP reducer) down: their threads can
        # abort the process ("terminate called without an active exception") once the peer
        # has closed, which is torch's teardown, not a load; the results are written above.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp
    d = str(tmp_path_factory.mktemp('ddp'))
    paths = _write_sources(d)
    t0 = time.perf_counter()
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    try:
        mp.spawn(_worker, args=(2, _free_port(), d, paths), nprocs=2, join=True)
    except Exception as e:  # say what the ranks wrote
        errors = []
        for r in range(2):
            p = osp.join(d, f'result_rank{r}.json')
            errors.append(json.load(open(p)).get('error', '') if osp.exists(p) else 'no result')
        raise AssertionError(f'{e}; rank errors: {errors}') from e
    results = []
    for r in range(2):
        with open(osp.join(d, f'result_rank{r}.json')) as f:
            results.append(json.load(f))
    return dict(dir=d, paths=paths, results=results, seconds=time.perf_counter() - t0)


def test_rank1_without_the_files_gets_rank0_weights(two_ranks):
    d, (r0, r1) = two_ranks['dir'], two_ranks['results']
    w0 = torch.load(osp.join(d, 'ok_rank0.pt'))
    w1 = torch.load(osp.join(d, 'ok_rank1.pt'))
    expected = torch.load(osp.join(d, 'expected.pt'))
    assert r0['ok']['broadcast'] and r1['ok']['broadcast']
    assert r0['ok']['loaded'] == r1['ok']['loaded'] and r0['ok']['loaded']
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for k in r0['ok']['loaded']:
        assert torch.equal(w1[k], expected[k]), k
    assert not any(k.startswith('fusion_layer.') for k in r0['ok']['loaded'])
    # rank 0 opened both files, rank 1 none
    assert len(r0['ok']['opened']) == 2 and r1['ok']['opened'] == []


def test_corrupt_file_on_rank0_fails_every_rank_fast(two_ranks):
    r0, r1 = (r['corrupt'] for r in two_ranks['results'])
    for r in (r0, r1):
        assert r['raised'] is not None
        assert 'corrupt.pth' in r['raised'] and 'not a readable checkpoint' in r['raised']
        assert r['unchanged']
        assert r['seconds'] < PG_TIMEOUT_S / 3, r['seconds']
    assert r0['problems'] == r1['problems']


def test_ranks_disagreeing_on_sources_fail_everywhere(two_ranks):
    for r in two_ranks['results']:
        assert r['counts']['raised'] and 'different numbers of sources' in r['counts']['raised']


def test_a_rank_leaving_is_an_error_not_a_hang(two_ranks):
    left = two_ranks['results'][0]['left']
    assert left['raised'] and 'sending the checkpoints to the other ranks failed' in left['raised']
    assert '0:00:30' in left['raised']  # the group's timeout, named
    assert left['seconds'] <= PG_TIMEOUT_S + 5


def test_small_buckets_carry_every_tensor(two_ranks):
    d, (r0, r1) = two_ranks['dir'], two_ranks['results']
    b0 = torch.load(osp.join(d, 'buckets_rank0.pt'))
    b1 = torch.load(osp.join(d, 'buckets_rank1.pt'))
    assert [list(s) for s in b0] == [list(s) for s in b1]
    for s0, s1 in zip(b0, b1):
        for k in s0:
            assert s0[k].dtype == s1[k].dtype and torch.equal(s0[k], s1[k]), k
    assert r0['buckets'] == r1['buckets']
    assert r1['buckets']['meta'][0] == {'epoch': 3}


def test_one_file_for_two_sources_is_read_and_sent_once(two_ranks):
    d, (r0, r1) = two_ranks['dir'], two_ranks['results']
    expected = torch.load(osp.join(d, 'expected.pt'))
    w0 = torch.load(osp.join(d, 'both_rank0.pt'))
    w1 = torch.load(osp.join(d, 'both_rank1.pt'))
    both = two_ranks['paths']['both']
    # rank 0 read the file once per load (the load, then read_all), rank 1 never
    assert r0['both']['opened'] == [both, both] and r1['both']['opened'] == []
    # every tensor's bytes went out once per load: buckets of one copy of the file
    nbytes = [v.numel() * v.element_size() for v in expected.values() if v.numel()]
    for r in (r0, r1):
        assert len(r['both']['sent']) == 2  # one 64 MiB bucket per load
        for size in r['both']['sent']:
            assert sum(nbytes) <= size < sum(nbytes) + 64 * len(nbytes)
        assert r['both']['shared']  # on every rank the sources share the tensors
        assert r['both']['keys'] == [list(expected)] * 2
    assert r0['both']['loaded'] == r1['both']['loaded']
    lidar, camera = r1['both']['loaded']
    assert lidar and camera and all(k.startswith('pts_') for k in lidar)
    for k in lidar + camera:
        assert torch.equal(w1[k], expected[k]) and torch.equal(w0[k], expected[k]), k


def test_bucket_layout_is_aligned_and_bounded():
    header = dict(bucket_bytes=1000, sources=[
        dict(problems=['x'], title='t'),
        dict(tensors=[('a', (10, ), 'float32'), ('b', (3, ), 'int64'), ('c', (0, ), 'float32'),
                      ('d', (400, ), 'float32'), ('e', (), 'bool')])])
    layout = bucket_layout(header)
    seen = []
    for size, items in layout:
        assert size <= 1000 or len(items) == 1
        for si, ti, off, n in items:
            assert off % 64 == 0 and off + n <= size
            seen.append(ti)
    assert seen == [0, 1, 3, 4]  # the empty tensor travels as a shape only
    assert len(layout) == 3


def test_no_process_group():
    assert should_broadcast('auto') is False and should_broadcast(False) is False
    with pytest.raises(FusionLoadError, match='initialized'):
        should_broadcast(True)
    with pytest.raises(FusionLoadError, match="'auto', True or False"):
        should_broadcast('yes')


def test_hook_broadcast_in_a_real_runner(two_ranks):
    """FusionLoadHook in MMEngine Runners of two gloo processes (``runner.test()``):
    with broadcast='auto' rank 1, whose paths do not exist, ends with rank 0's weights
    and opens nothing; with broadcast=False each rank reads the files itself."""
    d, (r0, r1) = two_ranks['dir'], two_ranks['results']
    expected = torch.load(osp.join(d, 'expected.pt'))
    for broadcast, reads in (('auto', (2, 0)), ('False', (2, 2))):
        a, b = r0['runner'][broadcast], r1['runner'][broadcast]
        assert a['world'] == b['world'] == 2
        assert a['wrapper'] == b['wrapper'] == 'MMDistributedDataParallel'
        assert (len(a['opened']), len(b['opened'])) == reads
        assert a['loaded'] == b['loaded'] and len(a['loaded']) == 12
        assert a['metrics'] == b['metrics'] and 'small/score' in a['metrics']
        w0 = torch.load(osp.join(d, f'runner_{broadcast}_rank0.pt'))
        w1 = torch.load(osp.join(d, f'runner_{broadcast}_rank1.pt'))
        for k in a['loaded']:
            assert torch.equal(w0[k], expected[k]) and torch.equal(w1[k], expected[k]), k
    assert r1['runner']['auto']['opened'] == []
    from mmfusionload.hooks.fusion_load_hook import FusionLoadHook
    assert FusionLoadHook().broadcast == 'auto'


def test_rank0_keeps_what_it_sends():
    """A source the header cannot carry fails on rank 0 too; unpicklable meta is dropped."""
    from mmfusionload.checkpoint.containers import Unwrapped
    from mmfusionload.load.distributed import _as_sent, _make_header
    q = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    results = [Unwrapped(OrderedDict(w=torch.ones(2), q=q), {}, 'state_dict'),
               Unwrapped(OrderedDict(w=torch.ones(2)), {}, '<bare>', meta={'f': lambda: 0})]
    header = _make_header(results, 1000)
    out = _as_sent(results, header)
    assert isinstance(out[0], FusionLoadError) and 'cannot be broadcast' in out[0].problems[0]
    assert out[1].meta == {} and header['sources'][1]['meta'] == {}
    assert [t[0] for t in header['sources'][1]['tensors']] == ['w']


def test_header_carries_the_error_title():
    """The title of a rank-0 failure travels as the error's ``title``, whatever it holds."""
    from mmfusionload.load.distributed import _make_header
    for title in ('cannot read checkpoint', 'two\nlines (and brackets)', 'x (3 problems):'):
        err = FusionLoadError(['a', 'b (c)'], title)
        src = _make_header([err], 1000)['sources'][0]
        assert src == dict(problems=['a', 'b (c)'], title=title)


def test_shared_tensors_travel_once_and_stay_shared():
    """Two sources holding the same tensor objects (one file read once): the header lists
    the second use as a reference, the buckets carry the bytes once, and the rebuilt
    sources share one tensor again."""
    from mmfusionload.checkpoint.containers import Unwrapped
    from mmfusionload.load.distributed import _as_bytes, _make_header, _rebuild
    w, b, n = torch.randn(5, 3), torch.arange(4), torch.ones(7, dtype=torch.float16)
    results = [Unwrapped(OrderedDict(w=w, b=b), {}, 'state_dict'),
               Unwrapped(OrderedDict(w=w, n=n, b=b), {}, 'model_ema')]
    header = _make_header(results, 1 << 20)
    assert [len(t) for t in header['sources'][1]['tensors']] == [4, 3, 4]
    assert header['sources'][1]['tensors'][0][3] == (0, 0)
    assert header['sources'][1]['tensors'][2][3] == (0, 1)
    layout = bucket_layout(header)
    sent = [(si, ti) for _, items in layout for si, ti, _, _ in items]
    assert sent == [(0, 0), (0, 1), (1, 1)]
    buckets = []
    for size, items in layout:  # what rank 0 fills and broadcasts
        bucket = torch.empty(size, dtype=torch.uint8)
        for si, ti, off, nb in items:
            key = header['sources'][si]['tensors'][ti][0]
            bucket[off:off + nb].copy_(_as_bytes(results[si].state[key]))
        buckets.append(bucket)
    out = _rebuild(header, buckets)
    assert [r.container for r in out] == ['state_dict', 'model_ema']
    assert out[1].state['w'] is out[0].state['w'] and out[1].state['b'] is out[0].state['b']
    for r, want in zip(out, results):
        assert list(r.state) == list(want.state)
        for k, v in want.state.items():
            assert r.state[k].dtype == v.dtype and torch.equal(r.state[k], v), k
