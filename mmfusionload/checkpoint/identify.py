"""Name a checkpoint's format before loading it: family, fingerprint, layout, options.

:func:`identify` reads what a file holds and reports, from the file alone:

- the trainer family and its containers (which copy is EMA; see
  :mod:`mmfusionload.checkpoint.trainers`);
- a format fingerprint from the key names (MMDetection3D BEVFusion, mit-han-lab
  BEVFusion, OpenPCDet, Microsoft Swin, Cream EfficientViT, timm, MMDetection
  detector, plain backbone), or ``unknown format`` with the top-level key groups;
- the sparse-kernel layout with its evidence (the one decider,
  :func:`~mmfusionload.sparse.decide.decide_layout`, on the file's kernels,
  their ``_metadata`` versions and output widths, and the matched format's
  preset), and the spatial axis order when a kernel shows it;
- the source options that load it (``preset='auto'`` resolves to the same preset).
"""
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import FusionLoadError, describe
from ..registry import KEY_PRESETS
from ..sparse.decide import decide_layout, file_kernels
from ..sparse.layouts import LAYOUT_DEFS, LAYOUTS
from ..files.lazy import is_lazy
from .fused import describe as describe_fused
from .trainers import Family, describe_copies, family_of

UNKNOWN = 'unknown format'


@dataclass(frozen=True)
class Fingerprint:
    """A format recognised by its key names.

    Args:
        name (str): The format.
        preset (str, optional): The registered preset that loads it, if any.
        modality (str, optional): What it usually provides in a fusion model.
        test (Callable): ``test(keys) -> evidence`` (empty when it does not match).
        generic (bool): Only tried when no specific format matched.
        notes (Callable, optional): ``notes(keys) -> lines`` said about a file of this
            format (what its preset leaves out).
    """
    name: str
    preset: Optional[str]
    modality: Optional[str]
    test: Callable[[Sequence[str]], str]
    generic: bool = False
    notes: Optional[Callable[[Sequence[str]], List[str]]] = None


_WORD = frozenset('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_')


def literal_head(pattern: str) -> str:
    """The text every match of ``pattern`` (searched, no flags) starts the key with:
    the literal characters after a leading ``^``, up to the first one that is not
    plainly literal; '' when there is none or the pattern has a top-level ``|``."""
    if not pattern.startswith('^') or '[' in pattern:
        return ''
    depth, i = 0, 0
    while i < len(pattern):  # a top-level alternative would not be anchored
        c = pattern[i]
        if c == '\\':
            i += 2
            continue
        depth += (c == '(') - (c == ')')
        if c == '|' and depth == 0:
            return ''
        i += 1
    out, i = [], 1
    while i < len(pattern):
        c = pattern[i]
        if c == '\\' and pattern[i + 1:i + 2] == '.':
            lit, step = '.', 2
        elif c in _WORD:
            lit, step = c, 1
        else:
            break
        if pattern[i + step:i + step + 1] in ('?', '*', '+', '{'):
            break  # the character may be absent or repeated
        out.append(lit)
        i += step
    return ''.join(out)


class KeyList(list):
    """Keys with their first dotted components, found once for all fingerprint tests."""

    @property
    def heads(self) -> frozenset:
        if '_heads' not in self.__dict__:
            self.__dict__['_heads'] = frozenset(k.split('.', 1)[0] for k in self)
        return self.__dict__['_heads']


def _may_start(keys: Sequence[str], head: str) -> bool:
    """False only when no key can start with ``head`` (judged from ``KeyList.heads``)."""
    if not head or not isinstance(keys, KeyList):
        return True
    first, dot, _ = head.partition('.')
    if dot:
        return first in keys.heads
    return any(h.startswith(first) for h in keys.heads)


def having(*patterns: str, least: int = 1, all_of: bool = False):
    regs = [(re.compile(p), literal_head(p)) for p in patterns]

    def test(keys: Sequence[str]) -> str:
        hits = [(r.pattern, next(filter(r.search, keys), None) if _may_start(keys, head)
                 else None) for r, head in regs]
        found = [(p, k) for p, k in hits if k is not None]
        if (all_of and len(found) < len(regs)) or len(found) < least:
            return ''
        return 'keys like ' + ', '.join(k for _, k in found[:3])
    return test


def unprefixed(test, prefix: str = 'backbone.'):
    """``test`` on the keys with ``prefix`` removed (a detector holding the backbone)."""
    def inner(keys: Sequence[str]) -> str:
        own = [k[len(prefix):] for k in keys if k.startswith(prefix)] \
            if _may_start(keys, prefix) else []
        return test(keys) or (test(own) if own else '')
    return inner


#: Formats of this package's own stack; each foreign format registers its own
#: (:func:`register_fingerprint`, beside its key preset in ``mmfusionload/formats/``).
FINGERPRINTS: List[Fingerprint] = [
    Fingerprint('MMDetection3D BEVFusion', None, None,
                having(r'^pts_middle_encoder\.', r'^(view_transform|fusion_layer)\.',
                        r'^bbox_head\.', least=2)),
    Fingerprint('MMDetection3D detector', None, None,
                having(r'^(pts_)?(voxel_encoder|middle_encoder)\.',
                        r'^pts_(backbone|neck|bbox_head)\.', least=1), generic=True),
    Fingerprint('MMDetection detector', None, 'camera',
                having(r'^backbone\.', r'^(neck|rpn_head|roi_head|bbox_head)\.', all_of=True),
                generic=True),
    # recognised by its container (``arch``/``state_dict_ema``), not by key names
    Fingerprint('timm', None, 'camera', lambda keys: '', generic=True),
    Fingerprint('plain backbone', None, 'camera',
                having(r'^(conv1|stem|patch_embed|stages|layer1|layers|blocks|features)\.',
                        least=1), generic=True),
]


def register_fingerprint(fp: Fingerprint, force: bool = False) -> Fingerprint:
    """Register a format's fingerprint; a specific one is tried before every generic one.

    Raises:
        KeyError: The name is taken (unless ``force``).
    """
    old = next((i for i, f in enumerate(FINGERPRINTS) if f.name == fp.name), None)
    if old is not None:
        if not force:
            raise KeyError(f'fingerprint {fp.name!r} is already registered')
        FINGERPRINTS[old] = fp
        return fp
    at = len(FINGERPRINTS) if fp.generic else next(
        (i for i, f in enumerate(FINGERPRINTS) if f.generic), len(FINGERPRINTS))
    FINGERPRINTS.insert(at, fp)
    return fp


def key_groups(keys: Sequence[str], limit: int = 12) -> List[str]:
    """Top-level key groups with their counts (``backbone. (120)``)."""
    counts: 'Counter[str]' = Counter(k.split('.', 1)[0] + ('.' if '.' in k else '')
                                     for k in keys)
    return [f'{g} ({n})' for g, n in counts.most_common(limit)]


def match_formats(keys: Sequence[str]) -> List[Tuple[Fingerprint, str]]:
    """The fingerprints the keys match, with evidence; generic ones only as a fallback."""
    keys = KeyList(keys)
    specific = [(f, ev) for f in FINGERPRINTS if not f.generic for ev in [f.test(keys)] if ev]
    if specific:
        return specific
    return [(f, ev) for f in FINGERPRINTS if f.generic for ev in [f.test(keys)] if ev][:1]


# ---------------------------------------------------------------- sparse kernels

def sparse_layout(shapes: Mapping[str, Tuple[int, ...]], metadata: Mapping[str, dict],
                  preset: Optional[str] = None) -> Tuple[Optional[str], str]:
    """The file's sparse-kernel layout and the evidence for it
    (:func:`~mmfusionload.sparse.decide.decide_layout` on the file's kernels).

    Args:
        shapes (Mapping): Key -> shape.
        metadata (Mapping): The state dict's ``_metadata``.
        preset (str, optional): The matched format's preset; its ``spconv_layout``,
            when it has one, is what the source says.

    Returns:
        tuple: ``(layout or None, evidence)``.
    """
    versions = {mod: (meta or {}).get('version') for mod, meta in metadata.items()}
    kernels = file_kernels(shapes, versions)
    if not kernels:
        return None, 'no sparse-conv kernels'
    factory = KEY_PRESETS.get(preset) if preset else None
    said = getattr(factory(), 'spconv_layout', None) if factory is not None else None
    if said:
        decision = decide_layout(kernels, said, f'preset {preset!r}: spconv_layout={said!r}')
    else:
        decision = decide_layout(kernels)
    return decision.layout, decision.evidence


def axis_order(shapes: Mapping[str, Tuple[int, ...]],
               layout: Optional[str]) -> Tuple[Optional[str], str]:
    """The spatial axis order a kernel shows, e.g. a ``(3, 1, 1)`` height-reducing conv.

    The encoders' last conv reduces the height axis alone (kernel 3 along it, 1 along
    the two BEV axes): where that 3 sits says whether the order is z-y-x or x-y-z.
    """
    if layout is None:
        return None, 'unknown without the kernel layout'
    for k, s in shapes.items():
        if len(s) != 5 or not k.endswith('.weight') or 'conv_out' not in k:
            continue
        spatial = LAYOUT_DEFS[layout].geometry(s).kernel
        if sorted(spatial) == [1, 1, 3]:
            order = {0: 'z-y-x', 2: 'x-y-z'}.get(spatial.index(3))
            if order:
                return order, f'{k} has spatial kernel {spatial} (height axis reduced alone)'
    return None, 'no kernel shows it'


# ---------------------------------------------------------------- identity

@dataclass
class Identity:
    """What a checkpoint is, from the file alone.

    Args:
        path (str): The file.
        family (str): Trainer family.
        copies (list[tuple[str, str]]): Container -> meaning (``'EMA weights (auto)'``).
        formats (list[tuple[str, str]]): Matched format names and their evidence.
        preset (str, optional): The preset that loads it when unambiguous.
        layout (str, optional): Sparse-kernel layout.
        layout_evidence (str): Why.
        axes (str, optional): Spatial axis order.
        axes_evidence (str): Why.
        groups (list[str]): Top-level key groups.
        options (dict): Source options that load it.
        notes (list[str]): Further remarks.
        marked (bool): Every sparse kernel's module has ``_metadata`` version 2
            (MMDetection3D's spconv 2.x modules mark themselves).
    """
    path: str
    family: str = ''
    copies: List[Tuple[str, str]] = field(default_factory=list)
    formats: List[Tuple[str, str]] = field(default_factory=list)
    preset: Optional[str] = None
    layout: Optional[str] = None
    layout_evidence: str = ''
    axes: Optional[str] = None
    axes_evidence: str = ''
    groups: List[str] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    marked: bool = field(default=False, repr=False)

    @property
    def format(self) -> str:
        if not self.formats:
            return UNKNOWN
        return ' or '.join(n for n, _ in self.formats)

    @property
    def ambiguous(self) -> bool:
        return len(self.formats) > 1

    def one_line(self) -> str:
        """The facts in one line (the top of a source's report)."""
        parts = [self.format + (f' ({", ".join(self.groups[:6])})'
                                if not self.formats else '')]
        if self.layout or self.layout_evidence not in ('', 'no sparse-conv kernels'):
            parts.append(f'sparse kernels {self.layout or "undecided"}')
        if self.axes:
            parts.append(f'axes {self.axes}')
        if self.preset:
            parts.append(f'preset {self.preset}')
        return '; '.join(parts)

    def lines(self) -> List[str]:
        """Every fact, one per line (``mmfusionload identify``)."""
        out = [f'file: {self.path}', f'family: {self.family}']
        out += [f'  {k}: {m}' for k, m in self.copies]
        if self.formats:
            for name, ev in self.formats:
                out.append(f'format: {name} ({ev})')
            if self.ambiguous:
                out.append('format: ambiguous; preset=auto refuses it, name the preset')
        else:
            out.append(f'format: {UNKNOWN}; top-level key groups: {", ".join(self.groups)}')
        out.append(f'sparse-kernel layout: {self.layout or "-"} ({self.layout_evidence})')
        out.append(f'spatial axis order: {self.axes or "-"} ({self.axes_evidence})')
        if self.options:
            opts = ', '.join(f'{k}={v!r}' for k, v in self.options.items())
            out.append(f'source: dict({opts})')
        out += [f'note: {n}' for n in self.notes]
        return out

    def to_dict(self) -> dict:
        return dict(path=self.path, family=self.family, copies=self.copies,
                    format=self.format, formats=self.formats, preset=self.preset,
                    layout=self.layout, layout_evidence=self.layout_evidence,
                    axes=self.axes, axes_evidence=self.axes_evidence, groups=self.groups,
                    options=self.options, notes=self.notes)


def _shapes(state: Mapping, path: str = '') -> 'OrderedDict[str, Tuple[int, ...]]':
    lazy = is_lazy(state)
    out: 'OrderedDict[str, Tuple[int, ...]]' = OrderedDict()
    for k in state:
        if type(k) is not str:
            raise FusionLoadError([f'{path}: state dict key {describe(k)} is not a string'],
                                  'not a checkpoint')
        if lazy:
            out[k] = tuple(state.shape(k))
        else:
            v = state[k]
            if hasattr(v, 'shape'):
                out[k] = tuple(v.shape)
    return out


def identify_state(path: str, shapes: Mapping[str, Tuple[int, ...]],
                   metadata: Mapping[str, dict], family: str = '') -> Identity:
    """Identify a state dict from its keys, shapes and ``_metadata`` (no tensor read)."""
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in shapes]
    ident = Identity(path, family=family, groups=key_groups(keys))
    ident.formats = [(f.name, ev) for f, ev in match_formats(keys)]
    named = {f.name: f for f in FINGERPRINTS}
    if len(ident.formats) == 1:
        ident.preset = named[ident.formats[0][0]].preset
    by_key = dict(zip(keys, shapes.values()))
    ident.layout, ident.layout_evidence = sparse_layout(by_key, metadata, ident.preset)
    kernels = file_kernels(by_key, {m: (v or {}).get('version') for m, v in metadata.items()})
    ident.marked = bool(kernels) and all((k.version or 0) >= 2 for k in kernels)  # no option
    ident.axes, ident.axes_evidence = axis_order(by_key, ident.layout)
    return ident


def identify_checkpoint(ckpt: Any, path: str) -> Identity:
    """Identify what a read checkpoint holds (see :func:`identify`)."""
    fam: Family = family_of(ckpt, path)
    chosen = fam.copy(fam.auto)
    metadata = dict(getattr(chosen.state, '_metadata', None) or {})
    ident = identify_state(path, _shapes(chosen.state, path), metadata,
                           fam.name + (f' {fam.version}' if fam.version else ''))
    ident.copies = describe_copies(fam)
    if fam.name.startswith('timm') and all(
            {f.name: f for f in FINGERPRINTS}[n].generic for n, _ in ident.formats):
        ident.formats = [('timm', f'{fam.name} container ({", ".join(c.key for c in fam.copies)})')]
    if fam.fixed:
        ident.notes.append(fam.fixed)
    opts: Dict[str, Any] = OrderedDict(checkpoint=path)
    if ident.formats and not ident.ambiguous:
        modality = {f.name: f.modality for f in FINGERPRINTS}.get(ident.formats[0][0])
        if modality:
            opts['modality'] = modality
    if ident.preset:
        opts['preset'] = ident.preset
    if ident.layout and not ident.marked:
        opts['spconv_layout'] = ident.layout
    if fam.has_ema and not fam.fixed:
        by_kind = {c.kind: c.key for c in fam.copies}
        raw = by_kind.get('raw', by_kind.get('weights'))
        ident.notes.append(f"weights='auto' takes {fam.auto} ({fam.auto_why}); "
                           f"weights='ema' takes {by_kind['ema']}, "
                           + (f"weights='raw' takes {raw}" if raw else
                              "weights='raw' is refused: the file holds the averaged "
                              'weights alone'))
    if ident.formats and not ident.ambiguous:
        ident.options = dict(opts)
    fp = {f.name: f for f in FINGERPRINTS}.get(ident.formats[0][0]) \
        if ident.formats and not ident.ambiguous else None
    if fp is not None and fp.notes is not None:
        ident.notes += fp.notes(list(chosen.state))
    ident.notes += describe_fused(list(chosen.state), metadata)
    if ident.layout is None and 'no sparse-conv' not in ident.layout_evidence:
        ident.notes.append(f"set spconv_layout={' or '.join(repr(x) for x in LAYOUTS)} on "
                           'the source: the file does not decide it')
    return ident


def identify(path: str, trust_checkpoint: bool = False) -> Identity:
    """Read ``path`` and identify it.

    Args:
        path (str): Checkpoint file or URI.
        trust_checkpoint (bool): Unpickle arbitrary globals (trusted files only).

    Returns:
        Identity: The facts, and the source options that load the file.
    """
    from ..files.reader import read_checkpoint
    ckpt = read_checkpoint(path, map_location='cpu', trust_checkpoint=trust_checkpoint)
    try:
        return identify_checkpoint(ckpt, path)
    except FusionLoadError:
        raise
    except Exception as e:  # what the file holds broke an assumption: name the file
        raise FusionLoadError([f'{path}: cannot identify what it holds: '
                               f'{type(e).__name__}: {str(e)[:200]}'], 'not a checkpoint') from e


def auto_preset(keys: Sequence[str], filename: str) -> Optional[str]:
    """The preset ``preset='auto'`` stands for, from the keys.

    Returns:
        str | None: The preset, or None when the keys need none (MMDetection3D names).

    Raises:
        FusionLoadError: Several formats match (the message names them), or none.
    """
    found = match_formats([k[len('module.'):] if k.startswith('module.') else k
                           for k in keys])
    if not found:
        raise FusionLoadError(
            [f"{filename}: preset='auto' cannot name the format ({UNKNOWN}; top-level "
             f'key groups: {", ".join(key_groups(keys))}); set preset= or rename='],
            'bad source')
    if len(found) > 1:
        raise FusionLoadError(
            [f"{filename}: preset='auto' is ambiguous: the keys match "
             + '; '.join(f'{f.name} (preset {f.preset or "none"}: {ev})' for f, ev in found)
             + '; name the preset'], 'bad source')
    return found[0][0].preset
