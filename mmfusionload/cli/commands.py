"""The ``mmfusionload`` command line (also ``python -m mmfusionload``).

Commands:

- ``inspect CONFIG``: dry run of every load the config would do (each module's
  ``init_cfg=Pretrained``, ``load_from`` as ``FusionLoadHook`` repairs it, the hook's
  sources, extra ``--source``); exit 1 if the real run would fail. Compiled extensions
  that are not built are replaced by inert stand-ins (structure only).
- ``convert SRC DST``: rewrite a checkpoint into the names and layout a model expects.
- ``merge --config CONFIG -o OUT SOURCES...``: one initial fusion checkpoint from
  per-modality checkpoints.
- ``identify FILE [--config CONFIG]``: the file's family, containers, format, sparse
  layout, axis order and the source options that load it.
- ``demo``: the BEVFusion-shaped demo.

Exit codes: 0 success, 1 a load/convert problem (nothing written), 2 bad usage. An
error prints its chain of causes (one line each); ``--debug`` prints the traceback.
"""
import argparse
import contextlib
import os
import os.path as osp
import sys
import traceback
from typing import Any, Dict, Iterator, List, Optional

from ..errors import FusionLoadError
from ..sparse.layouts import LAYOUTS

SOURCE_HELP = ('a checkpoint path (the whole model), or comma-separated key=value options '
               'of a source, e.g. modality=lidar,checkpoint=lidar.pth or '
               'modality=camera,checkpoint=swin.pth,preset=swin-original; lists join with '
               "'+' (modality=lidar+head), prefix=CKPT_PREFIX:MODEL_PREFIX, "
               'class_map=bicycle:cyclist, point_features=kitti:nuscenes (presets or '
               "'+'-joined names), freeze=true")
DEBUG_HELP = 'on an error, show the traceback instead of the chain of causes'
LIST_OPTIONS = ('modality', 'modules', 'exclude', 'classes', 'model_classes')
BOOL_OPTIONS = ('prefer_ema', 'allow_nonfinite', 'trust_checkpoint', 'freeze')
TRUE, FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')
EXIT_FAIL, EXIT_USAGE = 1, 2  # and 0 for success


class UsageError(FusionLoadError):
    """A command line that cannot be carried out as written (exit status 2)."""


# ---------------------------------------------------------------- helpers

def _bool(key: str, value: str) -> bool:
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise UsageError([f'{key}={value}: expected true or false'], 'bad --source')


def parse_source_arg(text: str) -> Dict[str, Any]:
    """A source dict from ``path`` or ``key=value,key=value`` (see ``SOURCE_HELP``)."""
    if '=' not in text or (osp.exists(text) and not osp.isdir(text)):
        return {'checkpoint': text}
    out: Dict[str, Any] = {}
    for part in text.split(','):
        key, eq, value = part.partition('=')
        key = key.strip().replace('-', '_')
        if not eq or not key:
            raise UsageError([f'{text!r}: {part!r} is not key=value'], 'bad --source')
        if key in LIST_OPTIONS:
            items = [v for v in value.split('+') if v]
            out[key] = items[0] if key == 'modality' and len(items) == 1 else items
        elif key in BOOL_OPTIONS:
            out[key] = _bool(key, value)
        elif key == 'strict':
            out[key] = 'all' if value == 'all' else _bool(key, value)
        elif key == 'verify':
            out[key] = 'auto' if value == 'auto' else _bool(key, value)
        elif key == 'prefix':
            if value == 'auto':
                out[key] = 'auto'
            else:
                pairs = {}
                for pair in value.split('+'):
                    src, colon, dst = pair.partition(':')
                    if not colon:
                        raise UsageError(
                            [f'prefix={value}: expected auto or CKPT_PREFIX:MODEL_PREFIX'],
                            'bad --source')
                    pairs[src] = dst
                out[key] = pairs
        elif key == 'class_map':
            pairs = [pair.partition(':') for pair in value.split('+') if pair]
            if not all(colon and a and b for a, colon, b in pairs):
                raise UsageError([f'class_map={value}: expected CKPT_CLASS:MODEL_CLASS pairs '
                                  "joined with '+'"], 'bad --source')
            out[key] = {a: b for a, _, b in pairs}
        elif key == 'point_features':
            ckpt, colon, model = value.partition(':')
            if not (colon and ckpt and model):
                raise UsageError([f'point_features={value}: expected CHECKPOINT:MODEL, each a '
                                  "preset or names joined with '+'"], 'bad --source')
            out[key] = dict(checkpoint=ckpt if '+' not in ckpt else ckpt.split('+'),
                            model=model if '+' not in model else model.split('+'))
        elif key == 'rename':
            raise UsageError(['rename= is not supported on the command line; use a '
                              'preset or a FusionLoadHook in a config'], 'bad --source')
        else:
            out[key] = value
    return out


def parse_sources_arg(texts: List[str]) -> List[Dict[str, Any]]:
    """Sources from the command line, each checked as a source (``UsageError`` if not)."""
    from ..load.source import parse_source
    out = [parse_source_arg(t) for t in texts]
    for text, src in zip(texts, out):
        try:
            parse_source(dict(src))
        except FusionLoadError as e:
            raise UsageError([f'{text!r}: {p}' for p in e.problems], 'bad source') from None
    return out


def _stdout_console():
    from rich.console import Console
    width = None if sys.stdout.isatty() else int(os.environ.get('COLUMNS', 0) or 140)
    return Console(width=width, highlight=False, soft_wrap=False)


@contextlib.contextmanager
def _progress(quiet: bool = False) -> Iterator[Any]:
    """A ``rich`` progress display on stderr (silent when stderr is not a terminal).

    Yields an object with ``step(description)`` (a spinner line per step) and
    ``bar(description, total)`` returning an ``advance()`` callable.
    """
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)
    console = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn('{task.description}'), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        transient=True, disable=quiet or not console.is_terminal)

    class Steps:
        current: Optional[int] = None

        def step(self, description: str) -> None:
            if self.current is not None:
                progress.update(self.current, completed=1, total=1)
            self.current = progress.add_task(description, total=None)

        def bar(self, description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

    with progress:
        yield Steps()


def _print_problems(console, err: FusionLoadError) -> None:
    console.print(str(err), markup=False, highlight=False)


def _cfg_options(args) -> Optional[dict]:
    return dict(args.cfg_options) if getattr(args, 'cfg_options', None) else None


# ---------------------------------------------------------------- commands

def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_config
    from .render import model_summary, render
    console = _stdout_console()
    sources = parse_sources_arg(args.source)
    stand_ins: List[str] = []
    with _progress(args.quiet) as p:
        model, results = inspect_config(args.config, sources, _cfg_options(args), p.step,
                                        allow_overlap=args.allow_overlap,
                                        stand_ins=stand_ins)
    console.print(model_summary(model), markup=False)
    if stand_ins:
        console.print(f'structure-only: {len(stand_ins)} compiled op(s) replaced by '
                      f'stand-ins: {", ".join(stand_ins)} (not built here; the loads below '
                      'are checked as the real run would do them)', markup=False)
    render(results, console, model)
    ok = all(r.ok for r in results)
    if args.json:
        import json
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(dict(ok=ok, stand_ins=stand_ins,
                           groups=[dict(r.report.to_dict(), notes=r.notes)
                                   for r in results]), f, indent=1)
    if args.html:
        from .inspection import combined_report
        combined_report(results, model, f'inspect {args.config}').to_html(args.html)
        console.print(f'wrote {args.html}', markup=False)
    console.print('inspect: ' + ('every load would succeed' if ok else
                                 'the run would FAIL (see the problems above)'),
                  markup=False)
    return 0 if ok else 1


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint
    from .config import build_model, config_classes, load_config
    from .render import Inspection, render
    from ..report import LoadReport
    console = _stdout_console()
    model = None
    options: Dict[str, Any] = {}
    if args.modality:
        options['modality'] = args.modality if len(args.modality) > 1 else args.modality[0]
    if args.modules:
        options['modules'] = args.modules
    if args.no_strict:
        options['strict'] = False
    if (options or args.cfg_options) and not args.config:
        raise UsageError(['--modality, --modules, --no-strict and --cfg-options need '
                          '--config'], 'bad usage')
    with _progress(args.quiet) as p:
        if args.config:
            p.step('building the model')
            cfg = load_config(args.config, _cfg_options(args))
            model = build_model(cfg)
            classes = config_classes(cfg)
            if classes is not None:  # a checkpoint of other classes loads by name
                options['model_classes'] = classes
        p.step(f'converting {osp.basename(args.src)}')
        try:
            result = convert_checkpoint(
                args.src, args.dst, preset=args.preset, spconv_layout=args.spconv_layout,
                to_layout=args.to_layout, strip_prefix=args.strip_prefix,
                add_prefix=args.add_prefix, model=model, source_options=options,
                trust_checkpoint=args.trust_checkpoint, weights=args.weights, progress=p.bar,
                extra_meta=dict(config=osp.abspath(args.config)) if args.config else None,
                to_format=args.to_format, spatial_order=args.spatial_order)
        except FusionLoadError as e:
            report = getattr(e, 'report', None)
            if report is None:
                raise
            render([Inspection('convert', LoadReport([report], dry_run=True,
                                                     problems=e.problems))], console, model)
            console.print(f'convert: nothing written to {args.dst}', markup=False)
            return 1
    if result.report is not None:
        render([Inspection('convert', LoadReport([result.report], dry_run=True))], console,
               model)
    moved = sum(1 for s, d in result.sparse.values() if s != d)
    layouts = sorted({d for _, d in result.sparse.values()})
    console.print(f'wrote {args.dst}: {len(result.state)} tensors'
                  + (f', {len(result.sparse)} sparse kernel(s) in {"/".join(layouts)} layout'
                     f' ({moved} permuted)' if result.sparse else '')
                  + (', verified against the model' if model is not None else ''),
                  markup=False)
    for note in result.notes:
        console.print(f'note: {note}', markup=False)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .render import Inspection, render
    from .merge import merge_checkpoints
    console = _stdout_console()
    sources = parse_sources_arg(args.sources)
    with _progress(args.quiet) as p:
        try:
            model, report, meta = merge_checkpoints(
                args.config, sources, args.out, _cfg_options(args),
                init_weights=args.init_weights, allow_overlap=args.allow_overlap,
                progress=p.step)
        except FusionLoadError as e:
            if getattr(e, 'report', None) is None:
                raise
            render([Inspection('merge', e.report)], console)
            console.print(f'merge: nothing written to {args.out}', markup=False)
            return 1
    render([Inspection('merge', report)], console, model)
    untouched = meta['mmfusionload']['not_loaded']
    if untouched:
        how = ('their init_weights() values' if args.init_weights else
               'their constructor values; --init-weights runs init_weights() first')
        console.print(f'note: no source provides {", ".join(untouched)}: saved with {how}',
                      markup=False)
    console.print(f'wrote {args.out}: {len(model.state_dict())} tensors from '
                  f'{len(report.sources)} source(s)', markup=False)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    report = run_demo(args.work_dir, keep=args.keep)
    if args.html:
        report.to_html(args.html)
        print(f'wrote {args.html}')
    return 0 if report.ok else 1


# ---------------------------------------------------------------- identify

def _identify(args: argparse.Namespace) -> int:
    """``identify FILE [--config CONFIG]``: what a checkpoint is and how to load it."""
    from ..checkpoint.identify import identify
    from .render import Inspection, render
    console = _stdout_console()
    ident = identify(args.file, trust_checkpoint=args.trust_checkpoint)
    for line in ident.lines():
        console.print(line, markup=False, highlight=False)
    ok = True
    if args.config:
        model, report = _check_with_model(ident, args.config, _cfg_options(args))
        render([Inspection('identify --config', report)], console, model)
        ok = report.ok
        console.print('identify: ' + ('these options load it into the model' if ok else
                                      'these options would FAIL on this model'), markup=False)
    if args.json:
        import json
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(dict(ident.to_dict(), ok=ok), f, indent=1)
    return 0 if ok else 1


def _check_with_model(ident, config: str, cfg_options: Optional[dict] = None):
    """Dry-run the identified source options against the model of ``config``.

    Returns:
        tuple: ``(model, LoadReport)``.
    """
    from ..load.pipeline import load_sources
    from .config import build_model, load_config
    model = build_model(load_config(config, cfg_options))
    opts = dict(ident.options or dict(checkpoint=ident.path))
    report = load_sources(model, [opts], dry_run=True, logger=None, title='identify')
    return model, report


def _add_identify(sub, common) -> None:
    ide = sub.add_parser('identify', help='name a checkpoint\'s format, containers, sparse '
                         'layout and the source options that load it')
    ide.add_argument('file', help='checkpoint (.pth, .safetensors, *.safetensors.index.json)')
    ide.add_argument('--config', help='also dry-run the options against this model')
    ide.add_argument('--json', metavar='PATH', help='also write the facts as JSON')
    ide.add_argument('--trust-checkpoint', action='store_true',
                     help='unpickle arbitrary objects (only for files you trust)')
    common(ide)
    ide.set_defaults(func=_identify)


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        prog='mmfusionload', description='Per-modality, layout-aware checkpoint loading.')
    parser.add_argument('--debug', action='store_true', help=DEBUG_HELP)
    sub = parser.add_subparsers(dest='command', required=True)

    def common(p, config=True):
        if config:
            p.add_argument('--cfg-options', nargs='+', action=DictAction,
                           help='override config settings, key=value (MMEngine syntax)')
        p.add_argument('-q', '--quiet', action='store_true', help='no progress display')
        p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                       help=DEBUG_HELP)

    ins = sub.add_parser('inspect', help='dry-run every checkpoint load a config would do')
    ins.add_argument('config', help='config file (MMDetection3D/MMDetection)')
    ins.add_argument('--source', action='append', default=[], metavar='SOURCE',
                     help='extra source to check (repeatable): ' + SOURCE_HELP)
    ins.add_argument('--json', metavar='PATH', help='also write the reports as JSON')
    ins.add_argument('--html', metavar='PATH', help='also write the reports as one page: the '
                     'model as a map of where every weight would come from')
    ins.add_argument('--allow-overlap', action='store_true',
                     help='let a later source overwrite tensors an earlier one wrote '
                     '(as allow_overlap=True in FusionLoadHook)')
    common(ins)
    ins.set_defaults(func=_inspect)

    conv = sub.add_parser('convert', help='rewrite a checkpoint into the names and sparse-'
                          'kernel layout a model expects')
    conv.add_argument('src', help='input checkpoint (.pth or .safetensors)')
    conv.add_argument('dst', help='output checkpoint: .pth or .safetensors (by suffix); '
                      'never the input')
    conv.add_argument('--preset', help='key preset (mit-bevfusion, swin-original, '
                      'cream-efficientvit, or any registered one)')
    conv.add_argument('--spconv-layout', default='auto', choices=('auto', ) + LAYOUTS,
                      help="layout of the input's sparse kernels (default: the preset's, "
                      "else what the file's shapes and _metadata show, as identify reads "
                      'them)')
    conv.add_argument('--to-layout', choices=LAYOUTS,
                      help="layout to write (default: the model's with --config, else "
                      'unchanged)')
    conv.add_argument('--to-format', metavar='FORMAT',
                      help='write an MMDetection3D checkpoint in a foreign format instead '
                      '(openpcdet, mit-bevfusion: any preset that states its reverse)')
    conv.add_argument('--spatial-order', choices=('zyx', 'xyz'),
                      help="with --to-format: the sparse encoder's axis order to write "
                      "(default: the format's)")
    conv.add_argument('--config', help='build this model and let it decide names and layout '
                      '(verifies every tensor fits)')
    conv.add_argument('--modality', action='append', help='with --config: load only these '
                      'modalities (repeatable)')
    conv.add_argument('--modules', action='append', help='with --config: load only these '
                      'submodules (repeatable)')
    conv.add_argument('--no-strict', action='store_true', help='with --config: allow tensors '
                      'of the loaded modules to be missing from the input')
    conv.add_argument('--strip-prefix', metavar='P', help='remove P from the keys')
    conv.add_argument('--add-prefix', metavar='P', help='prepend P to the keys')
    conv.add_argument('--weights', default='auto', choices=('auto', 'ema', 'raw'),
                      help="which copy of the weights: 'auto' what the file's trainer deploys, "
                           "'ema' the averaged copy, 'raw' the trained one")
    conv.add_argument('--trust-checkpoint', action='store_true',
                      help='unpickle arbitrary objects (only for files you trust)')
    common(conv)
    conv.set_defaults(func=_convert)

    mer = sub.add_parser('merge', help='one initial fusion checkpoint from per-modality '
                         'checkpoints')
    mer.add_argument('--config', required=True, help='the fusion model config')
    mer.add_argument('-o', '--out', required=True, help='output (.pth or .safetensors)')
    mer.add_argument('sources', nargs='+', metavar='SOURCE', help=SOURCE_HELP)
    mer.add_argument('--init-weights', action='store_true',
                     help='run model.init_weights() before loading (as the Runner does)')
    mer.add_argument('--allow-overlap', action='store_true',
                     help='let a later source overwrite tensors an earlier one wrote')
    common(mer)
    mer.set_defaults(func=_merge)

    _add_identify(sub, common)

    demo = sub.add_parser('demo', help='load mismatched LiDAR and camera checkpoints into a '
                          'BEVFusion-shaped model and print the report')
    demo.add_argument('--work-dir', default=None, help='where to write the checkpoints '
                      '(kept); by default a temporary folder, removed at the end')
    demo.add_argument('--keep', action='store_true', help='keep the temporary folder and '
                      'print where it is')
    demo.add_argument('--html', metavar='PATH', help='also write the report as a page')
    demo.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                      help=DEBUG_HELP)
    demo.set_defaults(func=_demo)
    return parser


def error_chain(err: BaseException) -> List[str]:
    """One line per exception of ``err`` and its causes, outermost first.

    Each line holds the exception's type, the first line of its message and
    where it was raised (the last frame of its traceback); no traceback.
    """
    lines: List[str] = []
    seen = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = str(e).strip().splitlines() or ['']
        text = f'{type(e).__name__}: {msg[0]}'
        if len(msg) > 1:
            text += f' (… {len(msg) - 1} more line(s))'
        frames = traceback.extract_tb(e.__traceback__)
        if frames:
            where = frames[-1].filename
            rel = osp.relpath(where)
            text += f' [{rel if not rel.startswith("..") else where}:{frames[-1].lineno}]'
        lines.append(text)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return lines


def report_error(err: BaseException, console=None) -> int:
    """Print ``err`` for a person and return the exit status (2 bad usage, else 1).

    A ``FusionLoadError`` prints its problems; any other error prints its
    chain of causes (:func:`error_chain`).
    """
    causes = error_chain(err)
    if isinstance(err, FusionLoadError):
        _print_problems(console or _stdout_console(), err)
        causes = causes[1:]
    else:
        print(f'error: {causes.pop(0)}', file=sys.stderr)
    for line in causes:
        print(f'  caused by {line}', file=sys.stderr)
    if not isinstance(err, UsageError):
        print('(--debug shows the traceback)', file=sys.stderr)
    return EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAIL


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, 'debug', False) or bool(os.environ.get('MMFUSIONLOAD_DEBUG'))
    try:
        return args.func(args)
    except Exception as e:  # every error: its causes, one line each (--debug: traceback)
        if debug and not isinstance(e, UsageError):
            raise
        return report_error(e)


if __name__ == '__main__':
    sys.exit(main())
