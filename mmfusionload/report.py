"""The load report: what went where, what was repaired, what is missing."""
import io
import json
import os.path as osp
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# a component ending in a number without leading zeros: 'blocks' no, '3' and 'conv1' yes
_NUM = re.compile(r'^(\D*?)(0|[1-9]\d*)$')


def _fmt_ints(values: Iterable[str]) -> str:
    nums = sorted({int(v) for v in values})
    if len(nums) == 1:
        return str(nums[0])
    runs, start = [], nums[0]
    for prev, cur in zip(nums, nums[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            runs.append(str(start) if start == prev else
                        f'{start}..{prev}' if prev > start + 1 else f'{start},{prev}')
            start = cur
    return '{' + ','.join(runs) + '}'


def compress_keys(keys: Iterable[str]) -> List[str]:
    """Group keys that differ only in numbers.

    ``stages.0.blocks.0.w`` ... ``stages.3.blocks.5.w`` becomes
    ``stages.{0..3}.blocks.{0..5}.w`` and ``layer1.conv1`` ... ``layer4.conv2``
    becomes ``layer{1..4}.conv{1,2}`` when every combination is present;
    groups are merged one position at a time, from the last, so the result
    never names a key that is not in the input.

    Args:
        keys (Iterable[str]): Dotted keys.

    Returns:
        list[str]: Compressed patterns, sorted.
    """
    items = [k.split('.') for k in dict.fromkeys(keys)]
    width = max((len(p) for p in items), default=0)
    for pos in reversed(range(width)):
        groups: 'OrderedDict[tuple, List[str]]' = OrderedDict()
        passthrough = []
        for parts in items:
            m = _NUM.match(parts[pos]) if pos < len(parts) else None
            if m:
                sig = (len(parts), tuple(parts[:pos]), m.group(1), tuple(parts[pos + 1:]))
                groups.setdefault(sig, []).append(m.group(2))
            else:
                passthrough.append(parts)
        merged = []
        for (_, head, stem, tail), values in groups.items():
            merged.append(list(head) + [stem + _fmt_ints(values)] + list(tail))
        items = passthrough + merged
    return sorted('.'.join(p) for p in items)


def format_group(name: str, keys: List[str], max_lines: int = 12) -> str:
    """One report line: ``name (count): key; key; … N more``, keys compressed.

    ``mismatched`` entries are messages with shapes, shown as they are.
    """
    lines = keys if name == 'mismatched' else compress_keys(keys)
    more = f' … {len(lines) - max_lines} more' if len(lines) > max_lines else ''
    return f'{name} ({len(keys)}): ' + '; '.join(lines[:max_lines]) + more


def size_mismatch_problems(filename: str,
                           mismatches: Sequence[Tuple[str, str, list, list]],
                           module_of: Callable[[str], str],
                           min_summary: int = 8,
                           examples: int = 3) -> List[str]:
    """Problem lines for tensors whose shapes differ from the model's.

    Many tensors that differ only in their sizes (same number of dimensions)
    are what a checkpoint of a wider or narrower model of the same architecture
    gives; they are summed up in one line with a few examples. The full list
    stays in the source report's ``mismatched`` (and in its JSON).

    Args:
        filename (str): The checkpoint.
        mismatches (Sequence[tuple]): ``(model key, checkpoint key, checkpoint
            shape, model shape)`` per tensor.
        module_of (Callable[[str], str]): Model key -> the module it is
            counted under.
        min_summary (int): Fewest same-rank mismatches that are summed up.
        examples (int): Examples named in the summary.

    Returns:
        list[str]: One line per problem.
    """
    def line(key, file_key, src, dst):
        named = f' (checkpoint {file_key})' if file_key != key else ''
        return (f'{filename}: size mismatch for {key}{named}: '
                f'checkpoint {list(src)}, model {list(dst)}')

    width = [m for m in mismatches if len(m[2]) == len(m[3])]
    if len(width) < min_summary:
        return [line(*m) for m in mismatches]
    modules = list(dict.fromkeys(module_of(m[0]) for m in width))
    eg = '; '.join(f'{k}: checkpoint {list(a)}, model {list(b)}'
                   for k, _, a, b in width[:examples])
    out = [f'{filename}: {len(width)} tensors of {len(modules)} module(s) '
           f'({", ".join(modules)}) differ in width: a different model size? e.g. {eg} '
           '(every tensor is listed under "mismatched" in the report and its JSON)']
    return out + [line(*m) for m in mismatches if len(m[2]) != len(m[3])]


def overlap_problems(pairs: Dict[Tuple[str, str], List[str]], max_keys: int = 6) -> List[str]:
    """One problem line per pair of sources that write the same model tensors.

    Args:
        pairs (dict): ``(earlier source, later source)`` -> model keys both write.
        max_keys (int): Key patterns named per line.

    Returns:
        list[str]: The lines.
    """
    out = []
    for (first, later), keys in pairs.items():
        if len(keys) == 1:
            what, verb = keys[0], 'is'
        else:
            pats = compress_keys(keys)
            more = f' … {len(pats) - max_keys} more' if len(pats) > max_keys else ''
            what, verb = f'{len(keys)} tensors ({"; ".join(pats[:max_keys])}{more})', 'are'
        out.append(f'{what} {verb} written by both {first} and {later} '
                   '(allow_overlap=True lets the later win)')
    return out


@dataclass
class SourceReport:
    """What one source did.

    Args:
        checkpoint (str): The file.
        label (str): Modality / modules of the source.
        targets (list[str]): Target submodules.
        container (str): Where the state dict was found.
        prefix (str): The prefix alignment chosen.
        loaded (list[str]): Model keys written.
        adapted (dict[str, list[str]]): Repair name -> model keys it changed.
        excluded (list[str]): Model keys left alone by ``exclude``.
        missing (list[str]): Model keys of provided modules that got nothing.
        unexpected (list[str]): Checkpoint keys under a target the model lacks.
        mismatched (list[str]): ``key: checkpoint shape vs model shape``.
        regenerated (list[str]): Derived model keys left to the model.
        new (list[str]): Model keys the source format lacks by design.
        kept (list[str]): Targets the source provides nothing for.
        ignored (int): Checkpoint tensors outside the targets.
        stripped (list[str]): Wrapper prefixes removed.
        skipped (list[str]): Entries of the checkpoint's state dict that are not
            tensors (left out of the load).
        family (str): The checkpoint's trainer family (``'MMEngine Runner + EMAHook'``).
        weights (str): Which copy was taken and why
            (``'state_dict: EMA weights, MMEngine EMAHook (auto: ...)'``).
        identity (str): The file's identified format, in one line.
        verified (int): Sparse-conv modules checked by function (``verify``).
        verify_error (float): The largest relative error those checks saw.
        new_classes (list[str]): Model classes the checkpoint lacks (their rows
            keep the model's values).
        dropped_classes (list[str]): Checkpoint classes the model lacks.
        classes (list[str]): One line per head whose classes were mapped by name.
        features (list[str]): One line per first point-feature layer adapted by name.
        frozen (list[str]): Modules whose loaded tensors do not train (``freeze``).
    """
    checkpoint: str
    label: str
    targets: List[str] = field(default_factory=list)
    container: str = ''
    prefix: str = ''
    loaded: List[str] = field(default_factory=list)
    adapted: Dict[str, List[str]] = field(default_factory=dict)
    excluded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    regenerated: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)
    ignored: int = 0
    stripped: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    family: str = ''
    weights: str = ''
    identity: str = ''
    verified: int = 0
    verify_error: float = 0.0
    new_classes: List[str] = field(default_factory=list)
    dropped_classes: List[str] = field(default_factory=list)
    classes: List[str] = field(default_factory=list)
    features: List[str] = field(default_factory=list)
    frozen: List[str] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        out = {k: len(getattr(self, k)) for k in (
            'loaded', 'excluded', 'missing', 'unexpected', 'mismatched',
            'regenerated', 'new')}
        out.update({f'adapted:{k}': len(v) for k, v in self.adapted.items()})
        out['ignored'] = self.ignored
        return out

    def finetune_lines(self) -> List[str]:
        """Report lines for classes mapped by name, adapted point features, frozen modules."""
        out = [f'classes: {line}' for line in self.classes]
        if self.classes or self.new_classes or self.dropped_classes:
            out.append(f'new classes: {", ".join(self.new_classes) or "-"}; dropped classes: '
                       f'{", ".join(self.dropped_classes) or "-"}')
        out += [f'point features: {line}' for line in self.features]
        if self.frozen:
            out.append(f'frozen ({len(self.frozen)} modules, norm layers kept in eval mode): '
                       + '; '.join(compress_keys(self.frozen)[:12]))
        return out

    def to_dict(self, compress: bool = True) -> dict:
        d = asdict(self)
        d['counts'] = self.counts()
        if compress:
            for k in ('loaded', 'excluded', 'missing', 'unexpected',
                      'regenerated', 'new'):
                d[k] = compress_keys(d[k])
            d['adapted'] = {k: compress_keys(v) for k, v in d['adapted'].items()}
        return d


@dataclass
class LoadReport:
    """The report of one :func:`~mmfusionload.load_sources` call.

    Args:
        sources (list[SourceReport]): One per source, in order.
        dry_run (bool): Whether the model was left untouched on purpose.
        applied (bool): Whether tensors were written into the model.
        problems (list[str]): Problems found (a failed load raises instead).
    """
    sources: List[SourceReport] = field(default_factory=list)
    dry_run: bool = False
    applied: bool = False
    problems: List[str] = field(default_factory=list)
    title: str = 'mmfusionload'

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return dict(title=self.title, dry_run=self.dry_run, applied=self.applied,
                    ok=self.ok, problems=list(self.problems),
                    sources=[s.to_dict() for s in self.sources])

    def to_json(self, path: Optional[str] = None, indent: int = 1) -> str:
        """Serialize; also write to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
        return text

    def format(self, width: int = 120, details: bool = True, max_lines: int = 12) -> str:
        """Render the report as tables (``rich``), as plain text."""
        from rich.console import Console
        from rich.table import Table
        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False,
                          color_system=None, no_color=True)
        state = 'dry run' if self.dry_run else ('applied' if self.applied else 'not applied')
        table = Table(title=f'{self.title}: {len(self.sources)} source(s), {state}')
        table.add_column('source', overflow='fold')
        table.add_column('file', overflow='fold')
        for col in ('loaded', 'adapted', 'excl.', 'missing', 'unexp.', 'mism.'):
            table.add_column(col, no_wrap=True, justify='right' if col != 'adapted' else 'left')
        table.add_column('kept', overflow='fold')
        for s in self.sources:
            adapted = ', '.join(f'{k} {len(v)}' for k, v in s.adapted.items()) or '0'
            table.add_row(s.label, osp.basename(s.checkpoint) or s.checkpoint,
                          str(len(s.loaded)), adapted, str(len(s.excluded)),
                          str(len(s.missing)), str(len(s.unexpected)),
                          str(len(s.mismatched)), ', '.join(s.kept) or '-')
        console.print(table)
        for s in self.sources:
            console.print(f'[{s.label}] {s.checkpoint}: container {s.container or "?"}, '
                          f'targets {", ".join(t or "<model>" for t in s.targets) or "-"}, '
                          f'prefix {s.prefix or "-"}'
                          + (f', stripped {" ".join(s.stripped)}' if s.stripped else '')
                          + f', {s.ignored} tensor(s) outside the targets'
                          + (f', verified by function: {s.verified} sparse conv(s), largest '
                             f'error {s.verify_error:.1e}' if s.verified else ''),
                          markup=False, highlight=False)
            for head, text in (('format', s.identity), ('weights', s.weights)):
                if text:
                    console.print(f'[{s.label}] {head}: {text}', markup=False,
                                  highlight=False)
            for line in s.finetune_lines():
                console.print(f'[{s.label}] {line}', markup=False, highlight=False)
        if details:
            for s in self.sources:
                for name, keys in [('missing', s.missing), ('mismatched', s.mismatched),
                                   ('unexpected', s.unexpected), ('excluded', s.excluded),
                                   ('regenerated', s.regenerated), ('new', s.new)] + \
                        [(f'adapted ({k})', v) for k, v in s.adapted.items()]:
                    if keys:
                        console.print(f'[{s.label}] ' + format_group(name, keys, max_lines),
                                      markup=False, highlight=False)
        for p in self.problems:
            console.print(f'problem: {p}', markup=False, highlight=False)
        return buf.getvalue().rstrip()

    def __str__(self) -> str:
        return self.format()
