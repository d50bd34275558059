"""Every fenced code block of ``README.md`` and ``docs/*.md`` runs.

A block's language says what it is: ``python`` is executed in a fresh temporary folder,
``bash`` has its commands run there by bash with the venv's interpreter as ``python``,
``.venv/bin/python`` and ``mmfusionload``, ``text`` is output and is not run. An HTML
comment on the line before a block says what else it needs:

- ``<!-- doctest: fixture=NAME[,NAME] -->``: files (and, for python, names such as
  ``model``) written by the fixtures of this module before the block runs;
- ``<!-- doctest: expect="TEXT" -->``: the output must contain TEXT;
- ``<!-- doctest: creates=PATH[,PATH] -->``: the block must write these files;
- ``<!-- doctest: config -->``: a python block that is a config: parsed with MMEngine's
  ``Config.fromstring``, its hooks and models built;
- ``<!-- doctest: setup -->``: the set-up commands, which must be exactly the lines
  ``.ci/run`` runs (CI runs them; they are not run again here);
- ``<!-- doctest: form -->``: commands that need a GPU, a cluster, a dataset, an
  MMDetection3D checkout or a download: checked for form only (bash syntax, every file of
  this repository they name exists, URLs well formed, each ``python`` command line
  accepted by the parser of the script or module it runs).
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
LANGS = ('python', 'bash', 'text')
FENCE = re.compile(r'^```(\S*)\s*$')
DIRECTIVE = re.compile(r'^<!--\s*doctest:\s*(.*?)\s*-->\s*$')
KNOWN = ('fixture', 'expect', 'creates', 'config', 'setup', 'form')


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    directives: Dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f'{self.page.relative_to(ROOT)}:{self.line}'

    @property
    def mode(self) -> str:
        for mode in ('setup', 'form', 'config'):
            if mode in self.directives:
                return mode
        return 'text' if self.lang == 'text' else 'run'

    @property
    def fixtures(self) -> List[str]:
        names = self.directives.get('fixture', '')
        return [n for n in names.split(',') if n]


def parse_blocks(page: Path) -> List[Block]:
    """The fenced blocks of one page, with the directives of the comment before each."""
    lines = page.read_text(encoding='utf-8').split('\n')
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith('```')), None)
        assert end is not None, f'{page}:{i + 1}: unclosed code block'
        directives = {}
        d = DIRECTIVE.match(lines[i - 1]) if i else None
        if d:
            for token in shlex.split(d.group(1)):
                key, _, value = token.partition('=')
                directives[key] = value
        blocks.append(Block(page, i + 1, m.group(1), '\n'.join(lines[i + 1:end]) + '\n',
                            directives))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in parse_blocks(page)]


def commands(text: str) -> List[str]:
    """The commands of a bash block: continuations joined, comments and blank lines out."""
    out = []
    for line in text.replace('\\\n', ' ').split('\n'):
        words = shlex.split(line, comments=True)
        if words:
            out.append(' '.join(words))
    return out


# ------------------------------------------------------------------ fixtures
_MADE: Dict[str, Path] = {}
_MODELS: Dict[str, torch.nn.Module] = {}


def _tiny_centerpoint_state():
    """A randomized model of ``configs/lidar/centerpoint_tiny_cpu.py``, built once."""
    from mmfusionload.cli.config import build_model, load_config
    from mmfusionload.cli.demo import randomize
    if 'centerpoint' not in _MODELS:
        _MODELS['centerpoint'] = randomize(build_model(load_config(str(
            ROOT / 'configs' / 'lidar' / 'centerpoint_tiny_cpu.py'))), seed=1)
    return _MODELS['centerpoint']


def _lidar_part_mmcv(model) -> 'OrderedDict':
    """The LiDAR branch of ``model``, sparse kernels in MMCV's ``[*k, in, out]``."""
    from mmfusionload.cli.demo import to_mmcv_layout
    state = OrderedDict((k, v) for k, v in model.state_dict().items()
                        if k.startswith(('pts_voxel_encoder.', 'pts_middle_encoder.',
                                         'pts_backbone.', 'pts_neck.')))
    return to_mmcv_layout(state, model)


def fixture_lidar_checkpoint(d: Path, ns: dict) -> None:
    """``work_dirs/lidar/epoch_20.pth``: a LiDAR run of the tiny CenterPoint, MMCV layout."""
    (d / 'work_dirs' / 'lidar').mkdir(parents=True)
    torch.save({'state_dict': _lidar_part_mmcv(_tiny_centerpoint_state()),
                'meta': {'epoch': 20}}, d / 'work_dirs' / 'lidar' / 'epoch_20.pth')


FUSION_CFG = '''\
_base_ = [{base!r}]
# the tiny CenterPoint's LiDAR branch with a small Swin-T-shaped camera backbone
model = dict(pts_bbox_head=None, img_backbone=dict(
    type='mmdet.SwinTransformer', embed_dims=16, depths=(2, 2, 2, 2),
    num_heads=(1, 2, 4, 8), window_size=7, out_indices=(1, 2, 3)))
'''


def fixture_cli_files(d: Path, ns: dict) -> None:
    """The files the command-line page names, for the tiny CenterPoint (+ a small Swin).

    ``my_centerpoint_config.py`` and ``my_fusion_config.py`` (the tiny CenterPoint, the
    second with an ``img_backbone``); ``checkpoint_epoch_80.pth`` (a whole CenterPoint run,
    MMCV-layout kernels); ``lidar_mmcv.pth`` (its LiDAR branch); the camera backbone in
    Microsoft's Swin release format (``swin_tiny_patch4_window7_224.pth``) and the whole
    fusion model in mit-han-lab BEVFusion names (``bevfusion-det.pth``).
    """
    from mmfusionload.cli.config import build_model, load_config
    from mmfusionload.cli.demo import randomize, to_mmcv_layout
    from test_presets import MMDET3D_TO_MIT, mmdet_swin_to_original, renamed
    base = str(ROOT / 'configs' / 'lidar' / 'centerpoint_tiny_cpu.py')
    (d / 'my_centerpoint_config.py').write_text(f'_base_ = [{base!r}]\n')
    (d / 'my_fusion_config.py').write_text(FUSION_CFG.format(base=base))
    centerpoint = _tiny_centerpoint_state()
    torch.save({'state_dict': to_mmcv_layout(centerpoint.state_dict(), centerpoint),
                'meta': {'epoch': 80}}, d / 'checkpoint_epoch_80.pth')
    torch.save({'state_dict': _lidar_part_mmcv(centerpoint)}, d / 'lidar_mmcv.pth')
    fusion = randomize(build_model(load_config(str(d / 'my_fusion_config.py'))), seed=2)
    swin = OrderedDict((k[len('img_backbone.'):], v) for k, v in fusion.state_dict().items()
                       if k.startswith('img_backbone.'))
    original = mmdet_swin_to_original(swin)
    original['head.weight'], original['head.bias'] = torch.rand(10, 128), torch.rand(10)
    torch.save({'model': original}, d / 'swin_tiny_patch4_window7_224.pth')
    mit = to_mmcv_layout(fusion.state_dict(), fusion)  # spconv 1.x kernels
    torch.save({'state_dict': renamed(mit, MMDET3D_TO_MIT)}, d / 'bevfusion-det.pth')


def fixture_tiny_lidar_model(d: Path, ns: dict) -> None:
    """``model``: a LiDAR branch (spconv ``SparseEncoder``); ``lidar.pth``: MMCV layout."""
    from mmfusionload.cli.demo import build, randomize, to_mmcv_layout
    model = torch.nn.Module()
    model.pts_middle_encoder = build(dict(type='SparseEncoder', in_channels=5,
                                          sparse_shape=[41, 64, 64]))
    trained = randomize(model, seed=3)
    torch.save({'state_dict': to_mmcv_layout(trained.state_dict(), trained)}, d / 'lidar.pth')
    model = torch.nn.Module()
    model.pts_middle_encoder = build(dict(type='SparseEncoder', in_channels=5,
                                          sparse_shape=[41, 64, 64]))
    ns['model'] = model


def fixture_openpcdet(d: Path, ns: dict) -> None:
    """``model``: an MMDetection3D LiDAR branch; OpenPCDet files saved as OpenPCDet saves."""
    from openpcdet_modules import PcdetDetector, randomize_, save_like_openpcdet
    from test_openpcdet import SHAPE, Target
    src = randomize_(PcdetDetector(SHAPE, res=False), seed=5).eval()
    save_like_openpcdet(src, str(d / 'pv_rcnn_8369.pth'))
    ckpt = torch.load(str(d / 'pv_rcnn_8369.pth'), weights_only=False)
    ckpt['model_state'] = {k: v for k, v in ckpt['model_state'].items()
                           if not k.startswith('backbone_3d.')}
    torch.save(ckpt, str(d / 'pointpillar_7728.pth'), _use_new_zipfile_serialization=False)
    ns['model'] = Target(res=False)


def fixture_lidar_dataset(d: Path, ns: dict) -> None:
    """``LIDAR.pth`` (the tiny CenterPoint's LiDAR run, MMCV layout) and ``DATA/``."""
    from test_lidar_train_test import write_dataset
    torch.save({'state_dict': _lidar_part_mmcv(_tiny_centerpoint_state())}, d / 'LIDAR.pth')
    write_dataset(d / 'DATA')


FIXTURES: Dict[str, Callable[[Path, dict], None]] = {
    name[len('fixture_'):]: f for name, f in globals().items() if name.startswith('fixture_')}


def prepare(block: Block, tmp: Path) -> dict:
    """Write the block's fixtures into ``tmp`` (each made once, then copied)."""
    ns: dict = {}
    for name in block.fixtures:
        made = _MADE.get(name)
        if made is None or name in ('tiny_lidar_model', 'openpcdet'):  # fresh models
            made = Path(tmp.parent / f'fixture_{name}')
            shutil.rmtree(made, ignore_errors=True)
            made.mkdir()
            FIXTURES[name](made, ns)
            _MADE[name] = made
        shutil.copytree(made, tmp, dirs_exist_ok=True)
    return ns


# ------------------------------------------------------------------ structure
def test_every_block_is_of_a_known_kind():
    assert len(BLOCKS) > 30 and {b.page.name for b in BLOCKS} >= {
        'README.md', 'install.md', 'sources.md', 'sparse.md', 'cli.md', 'bevfusion.md',
        'performance.md', 'efficientvit.md'}
    for b in BLOCKS:
        assert b.lang in LANGS, f'{b.id}: code block of language {b.lang!r}'
        assert set(b.directives) <= set(KNOWN), f'{b.id}: {b.directives}'
        assert set(b.fixtures) <= set(FIXTURES), f'{b.id}: {b.fixtures}'
        if b.lang == 'text':
            assert not b.directives, b.id
        if b.mode in ('setup', 'form'):
            assert b.lang == 'bash', b.id
        if b.mode == 'config':
            assert b.lang == 'python', b.id


def test_readme_is_short_and_starts_with_the_hook():
    lines = (ROOT / 'README.md').read_text(encoding='utf-8').split('\n')
    assert len(lines) <= 300
    first = '\n'.join(lines[:40])
    assert "type='FusionLoadHook'" in first and 'custom_hooks' in first
    assert '[3, 3, 3, 5, 16]' in first and '[16, 3, 3, 3, 5]' in first
    assert any(line.split('#')[0].strip() == '.venv/bin/python -m pytest -q tests'
               for line in lines)  # the README's test command


def test_links_between_pages_resolve():
    for page in PAGES:
        text = page.read_text(encoding='utf-8')
        for target in re.findall(r'\]\(([^)#\s]+\.md)(?:#[^)]*)?\)', text):
            assert (page.parent / target).is_file(), f'{page.name}: link to {target}'


def test_module_paths_in_the_docs_exist():
    """Every ``mmfusionload/...py`` path and ``mmfusionload.x.y`` module named exists."""
    for page in PAGES:
        text = page.read_text(encoding='utf-8')
        for path in re.findall(r'mmfusionload/[\w/]+\.py', text):
            assert (ROOT / path).is_file(), f'{page.name}: {path}'
        for mod in re.findall(r'\bmmfusionload(?:\.\w+)+', text):
            parts = mod.split('.')
            assert any((ROOT / Path(*parts[:n])).with_suffix('.py').is_file()
                       or (ROOT / Path(*parts[:n]) / '__init__.py').is_file()
                       for n in range(len(parts), 1, -1)), f'{page.name}: {mod}'


SETUP = [b for b in BLOCKS if b.mode == 'setup']


#: What ``.ci/run`` does besides the README's two commands: install the browser the
#: report page's tests render it in, and make its absence a failure there.
CI_EXTRA = ('bash tools/install_browser.sh', 'export MMFL_REQUIRE_BROWSER=1')


def ci_commands() -> List[str]:
    text = (ROOT / '.ci' / 'run').read_text()
    return [c for c in commands(text) if not c.startswith(('set ', 'cd '))]


def test_setup_commands_are_what_ci_runs():
    assert [b.page.name for b in SETUP] == ['README.md', 'install.md']
    ran = ci_commands()
    assert ran == [ran[0], *CI_EXTRA, ran[-1]]
    want = [c for c in ran if c not in CI_EXTRA]
    assert want == ['bash tools/setup_env.sh', '.venv/bin/python -m pytest -q tests']
    for b in SETUP:
        assert commands(b.text) == want, b.id


# ------------------------------------------------------------------ running blocks
RUN = [b for b in BLOCKS if b.mode in ('run', 'config')]
FORM = [b for b in BLOCKS if b.mode == 'form']


def _bin(tmp: Path) -> Path:
    """``python``, ``.venv/bin/python`` and ``mmfusionload``: the test's interpreter."""
    shim = tmp / '.venv' / 'bin'
    shim.mkdir(parents=True, exist_ok=True)
    for name, line in (('python', f'exec {sys.executable} "$@"'),
                       ('mmfusionload', f'exec {sys.executable} -m mmfusionload "$@"')):
        (shim / name).write_text(f'#!/bin/sh\n{line}\n')
        (shim / name).chmod(0o755)
    for name in ('configs', 'tools', 'benchmarks', 'tests'):
        if not (tmp / name).exists():
            (tmp / name).symlink_to(ROOT / name)
    return shim


def _env(tmp: Path, shim: Path) -> dict:
    return dict(os.environ, PATH=f'{shim}{os.pathsep}{os.environ["PATH"]}',
                PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), str(tmp)]),
                OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', MMFL=str(ROOT))


_RAN: Dict[str, str] = {}


def mmfusionload_argv(cmd: str):
    """The arguments of a ``mmfusionload`` / ``python -m mmfusionload`` command, or None."""
    words = shlex.split(cmd)
    if words[:1] == ['mmfusionload']:
        return words[1:]
    if words[0].endswith('python') and words[1:3] == ['-m', 'mmfusionload']:
        return words[3:]
    return None


def run_bash(block: Block, tmp: Path, monkeypatch) -> str:
    """Run the block's commands in ``tmp``: the package's own command line in this
    process (its ``main``, what the console script calls), anything else through bash."""
    key = block.text + repr(block.fixtures)
    if key in _RAN:  # the same commands on the same files (the demo, on two pages)
        return _RAN[key]
    prepare(block, tmp)
    shim = _bin(tmp)
    argvs = [mmfusionload_argv(cmd) for cmd in commands(block.text)]
    if all(a is not None for a in argvs):
        import contextlib
        import io
        from mmfusionload.cli.commands import main
        monkeypatch.chdir(tmp)
        out = []
        for argv in argvs:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = main(argv)
            out.append(buf.getvalue())
            assert rc == 0, f'{block.id}: mmfusionload {shlex.join(argv)}: exit {rc}\n' \
                            f'{out[-1][-6000:]}'
        _RAN[key] = '\n'.join(out)
        return _RAN[key]
    script = tmp / '_block.sh'
    script.write_text('set -eo pipefail\n' + block.text)
    proc = subprocess.run(['bash', str(script)], cwd=str(tmp), env=_env(tmp, shim),
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{block.id}: exit {proc.returncode}\n{out[-6000:]}'
    _RAN[key] = out
    return out


def run_python(block: Block, tmp: Path, monkeypatch) -> str:
    ns = prepare(block, tmp)
    monkeypatch.chdir(tmp)
    ns['__name__'] = '__doc_block__'
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(block.text, block.id, 'exec'), ns)
    return buf.getvalue()


def build_config(block: Block, tmp: Path, monkeypatch) -> None:
    """Parse the block as a config and build the hooks and models it names."""
    from mmengine.config import Config
    from mmengine.registry import HOOKS, DefaultScope
    import mmfusionload  # noqa: F401  (what the run's custom_imports does)
    monkeypatch.chdir(tmp)
    cfg = Config.fromstring(block.text, '.py')
    built = 0
    for hook in cfg.get('custom_hooks', []):
        assert HOOKS.build(hook) is not None
        built += 1
    model = cfg.get('model')
    if model is not None:
        from mmdet.registry import MODELS
        parts = [model] if 'type' in model else [v for v in model.values()
                                                 if isinstance(v, dict) and 'type' in v]
        for part in parts:
            part = {k: v for k, v in part.items() if k != '_delete_'}
            with DefaultScope.overwrite_default_scope('mmdet'):
                assert isinstance(MODELS.build(part), torch.nn.Module)
            built += 1
    assert built, f'{block.id}: a config block that names no hook and no model'


@pytest.mark.parametrize('block', RUN, ids=[b.id for b in RUN])
def test_block_runs(block, tmp_path, monkeypatch, one_thread):
    if block.mode == 'config':
        build_config(block, tmp_path, monkeypatch)
        return
    if block.lang == 'python':
        out = run_python(block, tmp_path, monkeypatch)
    else:
        out = run_bash(block, tmp_path, monkeypatch)
    if 'expect' in block.directives:
        assert block.directives['expect'] in out, f'{block.id}:\n{out[-4000:]}'
    for path in filter(None, block.directives.get('creates', '').split(',')):
        assert (tmp_path / path).is_file(), f'{block.id}: {path} not written\n{out[-4000:]}'


# ------------------------------------------------------------------ form only
_PARSE_ONLY = textwrap.dedent('''
    import argparse, json, runpy, sys
    class Parsed(BaseException):
        pass
    _parse = argparse.ArgumentParser.parse_args
    def parse_args(self, args=None, namespace=None):
        _parse(self, args, namespace)
        raise Parsed()
    argparse.ArgumentParser.parse_args = parse_args
    results = {}
    for line in sys.stdin.read().splitlines():
        kind, target, *args = line.split('\\0')
        sys.argv = [target, *args]
        try:
            if kind == 'module':
                runpy.run_module(target, run_name='__main__', alter_sys=True)
            else:
                runpy.run_path(target, run_name='__main__')
            results[line] = 'ran without parsing a command line'
        except Parsed:
            results[line] = 'ok'
        except SystemExit as e:
            results[line] = f'refused by its parser (exit {e.code})'
    print(json.dumps(results))
''')
_PARSED: Dict[str, str] = {}


def parsed(lines: List[str]) -> Dict[str, str]:
    """Each command line through its script's own parser, every form block's at once
    (one process: the scripts' imports are paid once)."""
    missing = [line for line in lines if line not in _PARSED]
    if missing:
        every = sorted({line for b in FORM for line in form_calls(b)[1]} | set(missing))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, '-c', _PARSE_ONLY], input='\n'.join(every),
                              capture_output=True, text=True, cwd=str(ROOT), env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _PARSED.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {line: _PARSED[line] for line in lines}


def _python_invocation(words: List[str]):
    """``(kind, target, args)`` of a ``python`` command, or None."""
    while words and re.match(r'^\w+=', words[0]):  # VAR=value prefixes
        words = words[1:]
    if words and words[0] == 'srun':  # the task srun runs
        words = words[next(i for i, w in enumerate(words) if w.endswith('python')):]
    if not words or not words[0].endswith('python'):
        return None
    words = [w for w in words[1:] if w != '-u']
    if words[0] == '-m':
        return 'module', words[1], words[2:]
    return 'script', words[0], words[1:]


def _repo_file(word: str):
    """The repository file a command word names, if it names one."""
    if word.startswith(str(ROOT) + '/'):
        return Path(word)
    if re.match(r'^(configs|tools|benchmarks|tests)/', word):
        return ROOT / word
    return None


def form_calls(block: Block):
    """The commands of a form block, and its ``python`` command lines as parse requests."""
    cmds, calls = commands(block.text.replace('$MMFL', str(ROOT))), []  # $MMFL: this checkout
    for cmd in cmds:
        call = _python_invocation(shlex.split(cmd))
        if call is None or call[1] == 'pytest':
            continue
        kind, target, args = call
        if kind == 'script':
            path = _repo_file(target)
            target = str(path) if path is not None else target
        calls.append('\0'.join([kind, target, *args]))
    return cmds, calls


@pytest.mark.parametrize('block', FORM, ids=[b.id for b in FORM])
def test_form_only_block_is_well_formed(block):
    syntax = subprocess.run(['bash', '-n'], input=block.text, capture_output=True, text=True)
    assert syntax.returncode == 0, f'{block.id}: {syntax.stderr}'
    cmds, calls = form_calls(block)
    for cmd in cmds:
        words = shlex.split(cmd)
        for word in words:
            for part in word.split('='):
                path = _repo_file(part)
                if path is not None:
                    assert path.exists(), f'{block.id}: {part} does not exist'
                if '://' in part:
                    url = urllib.parse.urlparse(part)
                    assert url.scheme == 'https' and url.netloc and url.path.endswith('.pth'), \
                        f'{block.id}: {part}'
        call = _python_invocation(words)
        if call is not None and call[1] == 'pytest':  # the test suite's own files
            assert all((ROOT / a).is_file() for a in call[2] if a.startswith('tests/')), cmd
        elif call is not None and call[0] == 'script':
            assert _repo_file(call[1]) is not None, f'{block.id}: {call[1]} is not ours'
    for line, result in parsed(calls).items():
        assert result == 'ok', f'{block.id}: {line.replace(chr(0), " ")}: {result}'
