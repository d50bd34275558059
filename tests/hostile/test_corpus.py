"""The hostile-file corpus: every case in a child process, bounded in time and memory.

A child (``hostile_child.py``) runs many cases one after another and reports one
line per case and path; a child that dies (a crash, a hang the watchdog ends, a
memory limit) costs the case it was running, which fails here, and a fresh child
goes on with the rest. The 2-rank broadcast reader runs the wide cases in a
second child.
"""
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
sys.path.insert(0, HERE)
from hostile_cases import CASES, by_name  # noqa: E402

#: Whole-corpus limit for one child (each case has its own watchdog inside).
CHILD_TIMEOUT_S = 900
#: What one case may cost on the ``load`` path (load_sources + dry_run): peak RSS
#: growth over the RSS before it, and wall time.
MAX_RSS_GROWTH_KIB = 64 * 1024
MAX_RSS_PER_FILE_BYTE = 16
MAX_SECONDS = 5.0
WIDE = ('load', 'convert', 'merge', 'inspect', 'load_from', 'resume', 'broadcast-rank0',
        'broadcast-rank1')


def _run_child(d: str, names: List[str], broadcast: bool) -> Dict[Tuple[str, str], dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
        PYTHONWARNINGS='ignore', COLUMNS='400')
    results: Dict[Tuple[str, str], dict] = {}
    remaining = list(names)
    for attempt in range(len(names) + 1):
        if not remaining:
            break
        out = osp.join(d, f'{"bcast" if broadcast else "cases"}{attempt}.jsonl')
        cmd = [sys.executable, osp.join(HERE, 'hostile_child.py'), '--dir', d, '--out', out]
        proc = subprocess.run(cmd + (['--broadcast'] if broadcast else []) + remaining,
                              env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        lines = [json.loads(x) for x in open(out)] if osp.exists(out) else []
        started = []
        for r in lines:
            if r['status'] == 'start':
                started.append((r['case'], r['path']))
            else:
                results[r['case'], r['path']] = r
        if proc.returncode == 0:
            break
        dead = next((s for s in reversed(started) if s not in results), None)
        tail = (proc.stderr or '')[-1500:]
        if dead is None or broadcast:
            for name in remaining:
                results.setdefault((name, 'child'), dict(
                    ok=False, problems=[f'child exited {proc.returncode}: {tail}']))
            break
        results[dead] = dict(ok=False, problems=[f'the process died ({proc.returncode}): {tail}'])
        remaining = remaining[remaining.index(dead[0]) + 1:]
    return results


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> Dict[Tuple[str, str], dict]:
    d = str(tmp_path_factory.mktemp('corpus'))
    results = _run_child(d, [c.name for c in CASES], broadcast=False)
    results.update(_run_child(d, [c.name for c in CASES if c.wide], broadcast=True))
    loads = [r for (_, p), r in results.items() if p == 'load' and 'seconds' in r]
    summary = dict(cases=len(CASES), errors=sum(c.expect == 'error' for c in CASES),
                   max_rss_growth_kib=max(r['rss_growth_kib'] for r in loads),
                   max_seconds=max(r['seconds'] for r in loads),
                   max_file_bytes=max(r['file_bytes'] for r in loads))
    with open(osp.join(d, 'summary.json'), 'w') as f:
        json.dump(summary, f)
    print('\nhostile corpus:', json.dumps(summary))
    return results


def test_corpus_covers_every_family():
    families = {c.family for c in CASES}
    assert {'code', 'memory', 'values', 'zip', 'legacy', 'safetensors', 'control', 'bounds',
            'dtype', 'messages', 'snapshot'} <= families
    assert len(CASES) >= 250 and all(c.promise for c in CASES)
    assert sum(c.expect == 'error' for c in CASES) >= 100
    assert sum(c.expect == 'ok' for c in CASES) >= 5
    assert sum(c.wide for c in CASES) >= 10
    assert len(by_name()) == len(CASES)


@pytest.mark.parametrize('name', [c.name for c in CASES])
def test_case(corpus, name):
    case = by_name()[name]
    paths = WIDE if case.wide else ('load', )
    failures = [f'{p}: {r["problems"]}' for (n, p), r in corpus.items() if n == name
                and not r['ok']]
    missing = [p for p in paths if (name, p) not in corpus]
    assert not failures and not missing, (failures, missing)


def test_each_case_is_bounded_in_memory_and_time(corpus):
    over = []
    for (name, path), r in corpus.items():
        if path != 'load' or 'seconds' not in r:
            continue
        allowed = MAX_RSS_GROWTH_KIB + MAX_RSS_PER_FILE_BYTE * r['file_bytes'] // 1024
        if r['rss_growth_kib'] > allowed or r['seconds'] > MAX_SECONDS:
            over.append((name, r['rss_growth_kib'], r['seconds'], r['file_bytes']))
    assert not over, over
