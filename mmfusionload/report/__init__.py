"""The load report: what went where, what was repaired, what is missing."""
import io
import json
import os.path as osp
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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


def format_group(name: str, keys: Sequence[str], max_lines: int = 12) -> str:
    """One report line: ``name (count): key; key; … N more``, keys compressed.

    :class:`Mismatch` records are shown one line each (:meth:`Mismatch.describe`).
    """
    lines = ([k.describe() if isinstance(k, Mismatch) else str(k) for k in keys]
             if any(isinstance(k, Mismatch) for k in keys) else compress_keys(keys))
    more = f' … {len(lines) - max_lines} more' if len(lines) > max_lines else ''
    return f'{name} ({len(keys)}): ' + '; '.join(lines[:max_lines]) + more


# ---------------------------------------------------------------- the vocabulary

#: What happened to a tensor, in the order the tables, the details and the JSON
#: ``counts`` use: word -> one-line meaning (the legend).
STATUSES: Dict[str, str] = OrderedDict([
    ('loaded', 'written into the model from the checkpoint (repaired ones included)'),
    ('repaired', 'loaded after a registered repair changed it (layout, axis order, dtype, '
                 'size...)'),
    ('regenerated', 'derived tensor the model computes itself (the checkpoint copy is not '
                    'used)'),
    ('new', 'absent from this checkpoint format by design, or left to another source (keeps '
            "the model's value)"),
    ('kept', "target module the checkpoint provides nothing for (its tensors keep the model's "
             'values)'),
    ('excluded', "left alone by the source's exclude patterns"),
    ('missing', "in a loaded module but not in the checkpoint (keeps the model's value)"),
    ('mismatched', 'in the checkpoint but cannot be placed (its shape, a repair, verify or '
                   'its values)'),
    ('unexpected', 'in the checkpoint under a target module, but not in the model'),
    ('ignored', 'in the checkpoint outside the target modules'),
])

#: The statuses counted per model module (``kept`` is a module's, ``ignored`` a file's).
KEY_STATUSES = ('loaded', 'repaired', 'regenerated', 'new', 'excluded', 'missing',
                'mismatched', 'unexpected')

#: Why a checkpoint tensor cannot be placed: kind -> meaning.
MISMATCH_KINDS: Dict[str, str] = OrderedDict([
    ('shape', "the checkpoint tensor's shape differs from the model's"),
    ('repair', 'a repair cannot place it'),
    ('verify', "the converted kernel computes another function than the checkpoint's"),
    ('value', 'its values cannot be written as planned (NaN/Inf, a cast that overflows, '
              'no dense tensor)'),
])

#: The note of a target module the checkpoint provides nothing for.
KEPT_NOTE = 'kept (nothing in the checkpoint)'


def legend(words: Iterable[str], sources: Sequence['SourceReport'] = ()) -> str:
    """One line naming what each of ``words`` (report statuses) means, in table order;
    ``kept`` too when one of ``sources`` kept a target."""
    used = set(words) | ({'kept'} if any(s.kept for s in sources) else set())
    return 'legend: ' + '; '.join(f'{w} = {m}' for w, m in STATUSES.items() if w in used)


@dataclass
class Mismatch:
    """A checkpoint tensor that cannot be placed into its model tensor.

    Args:
        key (str): Model key.
        file_key (str): Key in the checkpoint.
        checkpoint_shape (list[int]): The checkpoint tensor's shape, as stored.
        model_shape (list[int]): The model tensor's shape.
        kind (str): Why, one of :data:`MISMATCH_KINDS`.
        reason (str): The message: for ``'shape'`` the kind's meaning, for the
            other kinds the problem line (it names the file).
    """
    key: str
    file_key: str
    checkpoint_shape: List[int]
    model_shape: List[int]
    kind: str = 'shape'
    reason: str = ''

    def __post_init__(self):
        if self.kind not in MISMATCH_KINDS:
            raise ValueError(f'Mismatch kind must be one of {", ".join(MISMATCH_KINDS)}, '
                             f'got {self.kind!r}')
        self.checkpoint_shape = [int(v) for v in self.checkpoint_shape]
        self.model_shape = [int(v) for v in self.model_shape]
        if not self.reason:
            self.reason = MISMATCH_KINDS[self.kind]

    def describe(self) -> str:
        """One line about the tensor (a shape mismatch without the file)."""
        if self.kind != 'shape':
            return self.reason
        named = f' (checkpoint {self.file_key})' if self.file_key != self.key else ''
        return (f'size mismatch for {self.key}{named}: checkpoint {self.checkpoint_shape}, '
                f'model {self.model_shape}')

    def problem(self, filename: str) -> str:
        """The problem line of the load: :meth:`describe`, naming ``filename``."""
        return f'{filename}: {self.describe()}' if self.kind == 'shape' else self.reason


def size_mismatch_problems(filename: str,
                           mismatches: Sequence[Mismatch],
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
        mismatches (Sequence[Mismatch]): Records of kind ``'shape'``.
        module_of (Callable[[str], str]): Model key -> the module it is
            counted under.
        min_summary (int): Fewest same-rank mismatches that are summed up.
        examples (int): Examples named in the summary.

    Returns:
        list[str]: One line per problem.
    """
    width = [m for m in mismatches if len(m.checkpoint_shape) == len(m.model_shape)]
    if len(width) < min_summary:
        return [m.problem(filename) for m in mismatches]
    modules = list(dict.fromkeys(module_of(m.key) for m in width))
    eg = '; '.join(f'{m.key}: checkpoint {m.checkpoint_shape}, model {m.model_shape}'
                   for m in width[:examples])
    out = [f'{filename}: {len(width)} tensors of {len(modules)} module(s) '
           f'({", ".join(modules)}) differ in width: a different model size? e.g. {eg} '
           '(every tensor is listed under "mismatched" in the report and its JSON)']
    return out + [m.problem(filename) for m in mismatches
                  if len(m.checkpoint_shape) != len(m.model_shape)]


def mismatch_problems(filename: str, mismatches: Sequence[Mismatch],
                      module_of: Callable[[str], str]) -> List[str]:
    """The problem lines of a source's mismatches: each repair or verify problem
    once (a file-level one is raised by every kernel), then the shape mismatches
    (summed up, see :func:`size_mismatch_problems`)."""
    lines = list(dict.fromkeys(m.problem(filename) for m in mismatches if m.kind != 'shape'))
    return lines + size_mismatch_problems(
        filename, [m for m in mismatches if m.kind == 'shape'], module_of)


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
class Placed:
    """A checkpoint tensor planned onto a model tensor.

    Args:
        key (str): Model key.
        file_key (str): Key in the checkpoint.
        shape (list[int]): The checkpoint tensor's shape, as stored.
        dtype (str): Its dtype (``float32``...).
        steps (list[str]): The repairs that changed it, in order.
    """
    key: str
    file_key: str
    shape: List[int]
    dtype: str
    steps: List[str] = field(default_factory=list)


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
        repaired (dict[str, list[str]]): Repair name -> model keys it changed
            (read also as ``adapted``).
        excluded (list[str]): Model keys left alone by ``exclude``.
        missing (list[str]): Model keys of provided modules that got nothing.
        unexpected (list[str]): Checkpoint keys under a target the model lacks.
        mismatched (list[Mismatch]): Checkpoint tensors that cannot be placed.
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
        placed (list[Placed]): Every checkpoint tensor planned onto a model tensor,
            with the repairs that changed it.
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
    repaired: Dict[str, List[str]] = field(default_factory=dict)
    excluded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Mismatch] = field(default_factory=list)
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
    placed: List[Placed] = field(default_factory=list)
    new_classes: List[str] = field(default_factory=list)
    dropped_classes: List[str] = field(default_factory=list)
    classes: List[str] = field(default_factory=list)
    features: List[str] = field(default_factory=list)
    frozen: List[str] = field(default_factory=list)

    @property
    def adapted(self) -> Dict[str, List[str]]:
        """The former name of :attr:`repaired` (read-only)."""
        return self.repaired

    def keys_of(self, status: str) -> List[str]:
        """The model keys (checkpoint keys for ``unexpected``) of a per-key status."""
        if status == 'repaired':
            return list(dict.fromkeys(k for keys in self.repaired.values() for k in keys))
        if status == 'mismatched':
            return [m.key for m in self.mismatched]
        return list(getattr(self, status))

    def counts(self) -> Dict[str, int]:
        """How many tensors got each status (:data:`STATUSES`, in order; ``kept``
        counts target modules), then ``repaired:NAME`` per repair."""
        out = {w: len(self.keys_of(w)) for w in KEY_STATUSES}
        out['kept'] = len(self.kept)
        out['ignored'] = self.ignored
        out = {w: out[w] for w in STATUSES}
        out.update({f'repaired:{k}': len(v) for k, v in self.repaired.items()})
        return out

    def to_dict(self, compress: bool = True) -> dict:
        """The report as JSON-ready data: key lists (compressed patterns when
        ``compress``), mismatches as objects and ``counts``."""
        d = asdict(self)
        d['counts'] = self.counts()
        if compress:
            for k in ('loaded', 'excluded', 'missing', 'unexpected',
                      'regenerated', 'new'):
                d[k] = compress_keys(d[k])
            d['repaired'] = {k: compress_keys(v) for k, v in d['repaired'].items()}
        return d

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

    def summary(self) -> str:
        """One line: container, targets, prefix, what was ignored, repaired and verified."""
        repairs = ', '.join(f'{k} {len(v)}' for k, v in self.repaired.items())
        return (f'container {self.container or "?"}, '
                f'targets {", ".join(t or "<model>" for t in self.targets) or "-"}, '
                f'prefix {self.prefix or "-"}'
                + (f', stripped {" ".join(self.stripped)}' if self.stripped else '')
                + f', {self.ignored} tensor(s) outside the targets'
                + (f', repairs: {repairs}' if repairs else '')
                + (f', verified by function: {self.verified} sparse conv(s), largest '
                   f'error {self.verify_error:.1e}' if self.verified else ''))

    def header_lines(self) -> List[str]:
        """The lines above a source's table: the file with :meth:`summary`, its format,
        the copy of the weights taken and what fine-tuning options did."""
        out = [f'[{self.label}] {self.checkpoint}: {self.summary()}']
        for head, text in (('format', self.identity), ('weights', self.weights)):
            if text:
                out.append(f'[{self.label}] {head}: {text}')
        out += [f'[{self.label}] {line}' for line in self.finetune_lines()]
        return out

    def detail_lines(self, max_lines: int = 12, max_mismatched: int = 3) -> List[str]:
        """The keys of each status, compressed, one line per status (per repair), in
        the legend's order; mismatches are summed up among the problems, so only the
        first ``max_mismatched`` are shown."""
        groups = [(f'repaired ({name})', keys) for name, keys in self.repaired.items()]
        groups += [(w, self.mismatched if w == 'mismatched' else getattr(self, w))
                   for w in KEY_STATUSES if w not in ('loaded', 'repaired')]
        return [f'[{self.label}] ' + format_group(
                    name, keys, max_mismatched if name == 'mismatched' else max_lines)
                for name, keys in groups if keys]

    def module_rows(self, row_notes: Optional[Dict[str, str]] = None
                    ) -> List[Tuple[str, Dict[str, int], str]]:
        """``(model module, counts, note)`` per target module: the keys of every
        per-key status counted under the deepest target they lie in (other keys
        under their first name), kept targets noted.

        Args:
            row_notes (dict, optional): Module -> note replacing the default one
                (extra modules get a row).
        """
        targets = [t for t in self.targets if t not in ('', '<model>')]
        rows: Dict[str, Dict[str, int]] = OrderedDict()
        for t in list(targets) + list(row_notes or {}):
            rows.setdefault(t, dict.fromkeys(KEY_STATUSES, 0))
        for word in KEY_STATUSES:
            for key in self.keys_of(word):
                row = rows.setdefault(module_of_key(key, targets),
                                      dict.fromkeys(KEY_STATUSES, 0))
                row[word] += 1
        kept = set(self.kept)
        return [(name, counts, (row_notes or {}).get(name, KEPT_NOTE if name in kept else ''))
                for name, counts in rows.items()]


def module_of_key(key: str, targets: Sequence[str]) -> str:
    """The deepest of ``targets`` holding ``key``, else the key's first name."""
    for t in sorted(targets, key=len, reverse=True):
        if t not in ('', '<model>') and (key == t or key.startswith(t + '.')):
            return t
    return key.split('.', 1)[0] if '.' in key else '<root>'


def status_table(title: str, head: Sequence[str],
                 rows: Sequence[Tuple[Sequence[str], Dict[str, int], str]]):
    """A ``rich`` table of status counts: the ``head`` columns, one column per
    per-key status some row has (``loaded`` always), then a note.

    Args:
        title (str): Table title (none when empty).
        head (Sequence[str]): Names of the leading text columns.
        rows (Sequence[tuple]): ``(head values, counts, note)`` per row.

    Returns:
        tuple: The table and the status columns it shows.
    """
    from rich.table import Table
    from rich.text import Text
    words = [w for w in KEY_STATUSES if w == 'loaded' or any(r[1].get(w) for r in rows)]
    table = Table(title=Text(title) if title else None, title_justify='left')
    for name in head:
        table.add_column(name, overflow='fold')
    for w in words:
        table.add_column(w, justify='right', no_wrap=True)
    table.add_column('note', overflow='fold')
    for values, counts, note in rows:
        table.add_row(*(Text(v) for v in values),
                      *(str(counts[w]) if counts.get(w) else '-' for w in words), Text(note))
    return table, words


@dataclass
class LoadReport:
    """The report of one :func:`~mmfusionload.load_sources` call.

    Args:
        sources (list[SourceReport]): One per source, in order.
        dry_run (bool): Whether the model was left untouched on purpose.
        applied (bool): Whether tensors were written into the model.
        problems (list[str]): Problems found (a failed load raises instead).
        title (str): What the load was (``'FusionLoadHook'``, ``'inspect'``...).
        model (list): ``[key, shape, dtype]`` of every tensor of the model's state
            dict, in its order (what :meth:`to_html` draws the model from).
    """
    sources: List[SourceReport] = field(default_factory=list)
    dry_run: bool = False
    applied: bool = False
    problems: List[str] = field(default_factory=list)
    title: str = 'mmfusionload'
    model: List[list] = field(default_factory=list)

    def describe_model(self, model, state: Optional[Mapping] = None) -> 'LoadReport':
        """Record the tensors of ``model`` (an ``nn.Module``) in :attr:`model`;
        ``state``: its ``state_dict(keep_vars=True)`` when the caller holds it already."""
        state = model.state_dict(keep_vars=True) if state is None else state
        self.model = [[k, list(v.shape), str(v.dtype).replace('torch.', '')]
                      for k, v in state.items()]
        return self

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self, compress: bool = True) -> dict:
        """The report as JSON-ready data (see :meth:`SourceReport.to_dict`)."""
        return dict(title=self.title, dry_run=self.dry_run, applied=self.applied,
                    ok=self.ok, problems=list(self.problems),
                    sources=[s.to_dict(compress) for s in self.sources], model=self.model)

    def to_json(self, path: Optional[str] = None, indent: int = 1) -> str:
        """Serialize; also write to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
        return text

    def table(self):
        """The summary table (one row per source) and the status words it shows."""
        state = 'dry run' if self.dry_run else ('applied' if self.applied else 'not applied')
        rows = []
        for s in self.sources:
            counts = {w: len(s.keys_of(w)) for w in KEY_STATUSES}
            note = f'{KEPT_NOTE}: {", ".join(s.kept)}' if s.kept else ''
            rows.append(((s.label, osp.basename(s.checkpoint) or s.checkpoint), counts, note))
        return status_table(f'{self.title}: {len(self.sources)} source(s), {state}',
                            ('source', 'file'), rows)

    def format(self, width: int = 120, details: bool = True, max_lines: int = 12) -> str:
        """Render the report as plain text: the summary table, each source's header,
        its details (when ``details``), the legend and the problems."""
        from rich.console import Console
        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False,
                          color_system=None, no_color=True)
        table, words = self.table()
        console.print(table)
        lines = [line for s in self.sources for line in s.header_lines()]
        if details:
            lines += [line for s in self.sources for line in s.detail_lines(max_lines)]
        lines.append(legend(words, self.sources))
        lines += [f'problem: {p}' for p in self.problems]
        for line in lines:
            console.print(line, markup=False, highlight=False)
        return buf.getvalue().rstrip()

    def to_html(self, path: Optional[str] = None) -> str:
        """The report as one self-contained HTML page (:mod:`mmfusionload.report.html`);
        also written to ``path`` when given."""
        from .html import render_html
        page = render_html(self)
        if path:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(page)
        return page

    def __str__(self) -> str:
        return self.format()
