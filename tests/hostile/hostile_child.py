"""Run corpus cases in this process, each bounded in time and memory.

Usage: ``python hostile_child.py --dir DIR --out OUT.jsonl [--broadcast] CASE...``
(``--broadcast``: instead, the wide cases through the reader of 2 gloo ranks).

For every case and path it writes a ``start`` line, runs the path under a
watchdog (``faulthandler`` ends the process if a case runs past its time, even
inside C code), measures the peak RSS growth (``VmHWM`` reset through
``/proc/self/clear_refs``) and the time, checks the promise, and writes a
result line. The parent restarts a fresh child after the last ``start`` line
when a child dies, so one crash costs one case.
"""
import argparse
import contextlib
import faulthandler
import io
import json
import os
import os.path as osp
import resource
import socket
import sys
import time
from typing import Any, Dict, List, Optional

import torch

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, HERE)

#: Wall-clock limit of one case on one path (the watchdog ends the process past it).
CASE_TIMEOUT_S = 60
#: Address space allowed beyond what the imports took.
HEADROOM_BYTES = 3 << 30
WIDE_PATHS = ('convert', 'merge', 'inspect', 'load_from', 'resume')


def _status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:  # pragma: no cover
        pass


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def snapshot(model) -> Dict[str, torch.Tensor]:
    return {k: _bits(v).clone() for k, v in model.state_dict().items()}


def same(model, snap) -> bool:
    now = model.state_dict()
    return list(now) == list(snap) and all(torch.equal(_bits(now[k]), snap[k]) for k in snap)


class World:
    """The process state a hostile file must not change, and checks of it."""

    def __init__(self, d: str):
        import argparse as ap
        from collections import OrderedDict

        from mmengine.logging.history_buffer import HistoryBuffer
        self.d = d
        self.ap, self.hb, self.od = ap, HistoryBuffer, OrderedDict
        self.ns_init = ap.Namespace.__init__
        self.ns_vars = dict(vars(ap.Namespace))
        self.hb_vars = dict(vars(HistoryBuffer))
        self.hb_stats = dict(HistoryBuffer._statistics_methods)
        self.safe = set(map(repr, torch.serialization.get_safe_globals()))
        self.canary = torch.arange(1 << 16, dtype=torch.float32).mul_(1.5)
        self.canary_ref = self.canary.clone()

    def violations(self, marker: str) -> List[str]:
        out = []
        if osp.exists(marker):
            out.append('the marker file was created: code ran')
        if self.ap.Namespace.__init__ is not self.ns_init or dict(vars(self.ap.Namespace)) != \
                self.ns_vars:
            out.append('argparse.Namespace was changed')
        if dict(vars(self.hb)) != self.hb_vars or dict(self.hb._statistics_methods) != \
                self.hb_stats:
            out.append('mmengine HistoryBuffer was changed')
        import collections
        if collections.OrderedDict is not self.od:
            out.append('collections.OrderedDict was replaced')
        if set(map(repr, torch.serialization.get_safe_globals())) != self.safe:
            out.append('torch safe globals were changed')
        if not torch.equal(self.canary, self.canary_ref):
            out.append('the canary tensor changed')
        return out


def _error_ok(e: Exception, path: str, key: Optional[str]) -> List[str]:
    from mmfusionload import FusionLoadError
    if not isinstance(e, FusionLoadError):
        return [f'raised {type(e).__name__}, not FusionLoadError: {str(e)[:300]}']
    msg = str(e)
    out = []
    if path not in msg:
        out.append(f'the message does not name the file: {msg[:300]}')
    if key and key not in msg:
        out.append(f'the message does not name {key!r}: {msg[:400]}')
    return out


def _expect_error(fn, path: str, key: Optional[str]) -> List[str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        return _error_ok(e, path, key)
    return ['no error raised']


def _source(case, path: str) -> Dict[str, Any]:
    return dict(case.source, checkpoint=path)


def run_load(case, path: str, d: str) -> List[str]:
    from hostile_cases import HostileTiny, good_state
    from mmfusionload import load_sources
    problems = []
    model = HostileTiny()
    snap = snapshot(model)
    if case.expect == 'ok':
        report = load_sources(model, [_source(case, path)], dry_run=True, logger=None)
        if report.problems:
            problems.append(f'dry run found problems: {report.problems[:3]}')
        load_sources(model, [_source(case, path)], logger=None)
        want = good_state()
        got = model.state_dict()
        for k, v in want.items():
            if not torch.equal(got[k], v.to(got[k].dtype)):
                problems.append(f'{k}: loaded {got[k].tolist()}, expected {v.tolist()}')
        return problems
    report = load_sources(model, [_source(case, path)], dry_run=True, logger=None)
    text = '\n'.join(report.problems)
    if not report.problems:
        problems.append('dry_run reported no problem')
    elif path not in text or (case.key and case.key not in text):
        problems.append(f'dry_run problems do not name file/key: {text[:300]}')
    if not same(model, snap):
        problems.append('dry_run changed the model')
    problems += _expect_error(lambda: load_sources(model, [_source(case, path)], logger=None),
                              path, case.key)
    if not same(model, snap):
        problems.append('the model changed')
    return problems


def _no_output(d: str, out: str) -> List[str]:
    left = [n for n in os.listdir(d) if n.endswith('.tmp') or n == osp.basename(out)]
    return [f'left behind: {left}'] if left else []


def run_convert(case, path: str, d: str) -> List[str]:
    from mmfusionload.cli.convert import convert_checkpoint
    out = osp.join(d, 'converted.pth')
    problems = _expect_error(lambda: convert_checkpoint(path, out), path, case.key)
    return problems + _no_output(d, out)


def run_merge(case, path: str, d: str) -> List[str]:
    from hostile_cases import HostileTiny
    from mmfusionload.cli.merge import merge_into
    model = HostileTiny()
    snap = snapshot(model)
    out = osp.join(d, 'merged.pth')
    problems = _expect_error(lambda: merge_into(model, [_source(case, path)], out), path,
                             case.key)
    if not same(model, snap):
        problems.append('the model changed')
    return problems + _no_output(d, out)


def run_inspect(case, path: str, d: str) -> List[str]:
    from mmfusionload.cli.commands import main
    cfg = osp.join(d, 'inspect_cfg.py')
    with open(cfg, 'w') as f:
        f.write("model = dict(type='HostileTiny')\ndefault_scope = 'mmengine'\n")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(['inspect', cfg, '--source', f'checkpoint={path}', '-q'])
        except Exception as e:  # noqa: BLE001
            return [f'inspect raised {type(e).__name__}: {str(e)[:300]}']
    text = ' '.join(buf.getvalue().split())
    problems = []
    if rc != 1 or 'every load would succeed' in text:
        problems.append(f'inspect returned {rc}: {text[-300:]}')
    for needle in filter(None, [osp.basename(path), case.key]):
        if needle not in text:
            problems.append(f'inspect output does not name {needle!r}: {text[-400:]}')
    return problems


def run_runner(case, path: str, d: str, resume: bool) -> List[str]:
    from hostile_cases import HostileTiny
    from mmengine.runner import Runner
    model = HostileTiny()
    snap = snapshot(model)
    work = osp.join(d, 'resume' if resume else 'load_from')
    runner = Runner(model=model, work_dir=work, load_from=path, resume=resume,
                    default_scope='mmengine', log_level='ERROR',
                    env_cfg=dict(dist_cfg=dict(backend='gloo')))
    problems = _expect_error(runner.load_or_resume, path, case.key)
    if not same(runner.model, snap):
        problems.append('the runner model changed')
    return problems


@contextlib.contextmanager
def changing(case, path: str):
    """While a ``during`` case runs: the file is put back as built before each read
    opens it, and ``case.during(path)`` runs when that read first reads tensor bytes."""
    if case.during is None:
        yield
        return
    import shutil
    import mmfusionload.load.pipeline as pipeline
    from mmfusionload.files.snapshot import Snapshot
    orig = path + '.orig'
    if not osp.exists(orig):
        shutil.copyfile(path, orig)
    real_open, real_read = Snapshot.open, Snapshot.read_storage
    real_checkpoint = pipeline.read_checkpoint

    def read_checkpoint(p, *args, **kwargs):  # the file as built, before each read
        shutil.copyfile(orig, path + '.put')
        os.replace(path + '.put', path)
        return real_checkpoint(p, *args, **kwargs)

    def open_(self):
        self._fire = osp.realpath(self.path) == osp.realpath(path)
        return real_open(self)

    def read_storage(self, offset, n, *args, **kwargs):
        if getattr(self, '_fire', False):
            self._fire = False
            case.during(path)
        return real_read(self, offset, n, *args, **kwargs)

    Snapshot.open, Snapshot.read_storage = open_, read_storage
    pipeline.read_checkpoint = read_checkpoint
    try:
        yield
    finally:
        Snapshot.open, Snapshot.read_storage = real_open, real_read
        pipeline.read_checkpoint = real_checkpoint


def run_path(name: str, case, path: str, d: str) -> List[str]:
    if name == 'load':
        with changing(case, path):
            return run_load(case, path, d)
    if name == 'convert':
        return run_convert(case, path, d)
    if name == 'merge':
        return run_merge(case, path, d)
    if name == 'inspect':
        return run_inspect(case, path, d)
    return run_runner(case, path, d, resume=name == 'resume')


def _rank(rank: int, port: int, jobs: List[Dict[str, Any]], out: str) -> None:
    import torch.distributed as dist
    from datetime import timedelta
    faulthandler.enable()  # a signal during a load prints where it happened
    torch.set_num_threads(1)
    sys.path.insert(0, HERE)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    from hostile_cases import HostileTiny
    from mmfusionload import load_sources
    world = World(osp.dirname(out))
    results = []
    for job in jobs:
        path = job['path'] if rank == 0 else f'/nonexistent/rank1/{osp.basename(job["path"])}'
        model = HostileTiny()
        snap = snapshot(model)
        problems = _expect_error(lambda: load_sources(model, [dict(checkpoint=path)],
                                                      logger=None, broadcast=True),
                                 job['path'], job['key'])
        if not same(model, snap):
            problems.append('the model changed')
        problems += world.violations(job['marker'])
        results.append(dict(case=job['case'], path=f'broadcast-rank{rank}', problems=problems))
        dist.barrier()
    with open(f'{out}.rank{rank}', 'w') as f:
        json.dump(results, f)
    dist.barrier()  # both ranks' results are written
    # Leave without tearing gloo down: its pair threads can abort the process
    # ("terminate called without an active exception") when the peer closes first,
    # which is torch's teardown, not a load; every promise was checked above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_broadcast(jobs: List[Dict[str, Any]], out: str) -> None:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    faulthandler.dump_traceback_later(CASE_TIMEOUT_S * 3, exit=True)
    mp.spawn(_rank, args=(port, jobs, out), nprocs=2, join=True)
    faulthandler.cancel_dump_traceback_later()
    with open(out, 'a') as f:
        for r in (0, 1):
            for res in json.load(open(f'{out}.rank{r}')):
                res.update(status='done', ok=not res['problems'])
                f.write(json.dumps(res) + '\n')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--dir', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--broadcast', action='store_true',
                        help='only the 2-rank broadcast reader, for the wide cases')
    parser.add_argument('cases', nargs='*')
    args = parser.parse_args(argv)
    os.environ.setdefault('COLUMNS', '400')
    torch.set_num_threads(1)

    import mmfusionload
    from mmengine.registry import MODELS
    from hostile_cases import HostileTiny, by_name, marker
    MODELS.register_module('HostileTiny', module=HostileTiny, force=True)
    mmfusionload.install_checkpoint_loader()
    cases = by_name()
    world = World(args.dir)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _status('VmSize') * 1024 + HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    jobs = []
    with open(args.out, 'a') as out:
        def line(**kw):
            out.write(json.dumps(kw) + '\n')
            out.flush()

        for name in args.cases:
            case = cases[name]
            d = osp.join(args.dir, name)
            os.makedirs(d, exist_ok=True)
            path = case.build(d)
            size = osp.getsize(path) if osp.isfile(path) else 0
            paths = ['load'] + (list(WIDE_PATHS) if case.wide else [])
            if args.broadcast:
                if case.wide:
                    jobs.append(dict(case=name, path=path, key=case.key, marker=marker(d)))
                continue
            for pname in paths:
                line(case=name, path=pname, status='start')
                polluted = torch.serialization.safe_globals([os.system] if case.pollute else [])
                polluted.__enter__()
                faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
                _reset_peak()
                rss0 = _status('VmRSS')
                t0 = time.perf_counter()
                try:
                    problems = run_path(pname, case, path, d)
                except Exception as e:  # noqa: BLE001 - recorded, not raised
                    problems = [f'{type(e).__name__}: {str(e)[:400]}']
                seconds = time.perf_counter() - t0
                peak = _status('VmHWM')
                faulthandler.cancel_dump_traceback_later()
                polluted.__exit__(None, None, None)
                problems += world.violations(marker(d))
                line(case=name, path=pname, status='done', ok=not problems, problems=problems,
                     seconds=round(seconds, 4), rss_growth_kib=max(0, peak - rss0),
                     file_bytes=size)
    if args.broadcast and jobs:
        run_broadcast(jobs, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
