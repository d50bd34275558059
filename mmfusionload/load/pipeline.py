"""Load several checkpoints into one model, each into its own submodules.

The pipeline, top to bottom: read -> unwrap -> rename -> select modality ->
plan against the model -> validate -> apply -> report. Nothing is written
into the model until every source has been planned and validated. A file
several sources name is read once; each source unwraps and plans on its own.
"""
import os.path as osp
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import (Any, Callable, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Union)

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from ..checkpoint.containers import Unwrapped, shape_of, unwrap
from ..files.lazy import is_lazy
from .distributed import read_all
from ..errors import FusionLoadError
from ..checkpoint.identify import auto_preset, identify_state
from .classes import plan_classes, take_rows
from .features import plan_features
from .freeze import freeze, frozen_modules, frozen_parts
from .modality import resolve_targets
from .prefix import Alignment, auto_alignment, explicit_alignment
from .presets import KeyPreset, get_preset, rename_keys
from ..files.reader import read_checkpoint
from .repairs import (Entry, Mapped, RepairProblem, SourceContext, is_record, may_be_absent,
                      repairs_in_order, run_repairs)
from ..report import (LoadReport, Mismatch, Placed, SourceReport, compress_keys, mismatch_problems,
                      overlap_problems)
from .source import SourceSpec, parse_source, source_list
from ..sparse.verify import verify_entries
from .values import entry_problem

SourceLike = Union[SourceSpec, Dict[str, Any]]


@dataclass
class SourcePlan:
    """Everything one source would write, checked but not yet applied."""
    spec: SourceSpec
    report: SourceReport
    entries: List[Entry] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def to_load(self) -> List[Entry]:
        return [e for e in self.entries if e.skip is None]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP/FSDP/MMEngine wrapper."""
    return model.module if is_model_wrapper(model) else model


def _under(key: str, targets: Sequence[str]) -> Optional[str]:
    for t in targets:
        if t == '' or key == t or key.startswith(t + '.'):
            return t
    return None


# Files read during one load, shared by the sources that name them (see ``reading_once``).
_FILES: ContextVar[Optional[Dict[Hashable, Any]]] = ContextVar('mmfusionload_files',
                                                                 default=None)
_UNREAD = object()


def read_key(spec: SourceSpec) -> Hashable:
    """What makes two sources one read: the file (a local path resolved, a URI as given)
    and the options that change what reading returns (``trust_checkpoint``).

    Unwrapping options (``weights``...) are not part of it: each source unwraps
    the shared result on its own.
    """
    path = osp.expanduser(spec.checkpoint)
    where = osp.realpath(path) if osp.exists(path) else spec.checkpoint
    return where, bool(spec.trust_checkpoint)


@contextmanager
def reading_once() -> Iterator[Dict[Hashable, Any]]:
    """Within the block, :func:`read_source` reads each file once, however many sources
    name it; what was read is dropped when the block ends (the sources' tensors stay
    alive as long as the sources do)."""
    token = _FILES.set({})
    try:
        yield _FILES.get()  # type: ignore[misc]
    finally:
        _FILES.reset(token)


def _under_any(targets: Sequence[str]) -> Callable[[str], bool]:
    """``lambda key: _under(key, targets) is not None``, one C call a key."""
    if '' in targets:
        return lambda key: True
    names, prefixes = frozenset(targets), tuple(t + '.' for t in targets)
    return lambda key: key in names or key.startswith(prefixes)


def _targeted(model_state: Dict[str, torch.Tensor], targets: Sequence[str]
              ) -> Dict[str, torch.Tensor]:
    """The model tensors under ``targets`` (what :func:`_under` finds, in one C call a key)."""
    if '' in targets:
        return dict(model_state)
    under = _under_any(targets)
    return {k: v for k, v in model_state.items() if under(k)}


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` for a name taken from the model's own state dict
    (every part is a child module), by plain dict lookups."""
    mod = model
    for part in name.split('.') if name else ():
        mod = mod._modules[part]  # type: ignore[assignment]
    return mod


def read_source(spec: SourceSpec) -> Unwrapped:
    """Read and unwrap one source's checkpoint (on CPU, read once into private memory).

    Inside :func:`reading_once`, a file another source already read is not read again
    (nor copied again), and sources with the same unwrapping options (``weights``)
    share one unwrapped state: their tensors are the same objects.
    """
    files = _FILES.get()
    key = read_key(spec) if files is not None else None
    raw = files.get(key, _UNREAD) if files is not None else _UNREAD
    if raw is _UNREAD:
        try:
            raw = read_checkpoint(spec.checkpoint, map_location='cpu',
                                  trust_checkpoint=spec.trust_checkpoint)
        except FusionLoadError as e:
            if files is not None:
                files[key] = e
            raise
        if files is not None:
            files[key] = raw
    if isinstance(raw, FusionLoadError):  # the same file failed for an earlier source
        raise FusionLoadError(list(raw.problems), raw.title)
    if files is None:
        return unwrap(raw, spec.checkpoint, prefer_ema=spec.prefer_ema, weights=spec.weights)
    # unwrapping depends on the source's own options: shared only between equal ones
    ukey = ('unwrapped', key, spec.weights, bool(spec.prefer_ema))
    if ukey not in files:
        files[ukey] = unwrap(raw, spec.checkpoint, prefer_ema=spec.prefer_ema,
                             weights=spec.weights)
    return files[ukey]


def plan_source(model: nn.Module,
                spec: SourceSpec,
                ckpt: Unwrapped,
                model_state: Optional[Dict[str, torch.Tensor]] = None) -> SourcePlan:
    """Plan one source against the live model.

    Args:
        model (nn.Module): The unwrapped model.
        spec (SourceSpec): The source.
        ckpt (Unwrapped): Its checkpoint tensors.
        model_state (dict, optional): ``model.state_dict(keep_vars=True)``,
            shared between sources.

    Returns:
        SourcePlan: Entries, report and problems (none raised here).
    """
    fname = spec.checkpoint
    report = SourceReport(fname, spec.label, container=ckpt.container,
                          stripped=list(ckpt.stripped), family=ckpt.family,
                          weights=ckpt.copy)
    report.skipped = list(ckpt.skipped)
    all_shapes = ckpt.shapes()
    if 'identity' not in ckpt.cache:  # the same for every source sharing ckpt
        ckpt.cache['identity'] = identify_state(fname, all_shapes, ckpt.metadata).one_line()
        if ckpt.fused:
            ckpt.cache['identity'] += (f'; {len(ckpt.fused)} spconv QAT fused conv-BN '
                                       'module(s) read as a conv and its BatchNorm')
    report.identity = ckpt.cache['identity']
    plan = SourcePlan(spec, report)
    try:
        targets = resolve_targets(model, spec.modality, spec.modules)
        if spec.preset == 'auto':
            if 'auto_preset' not in ckpt.cache:
                try:
                    ckpt.cache['auto_preset'] = auto_preset(list(ckpt.state), fname)
                except FusionLoadError as e:
                    ckpt.cache['auto_preset'] = e
            found = ckpt.cache['auto_preset']
            if isinstance(found, FusionLoadError):
                raise FusionLoadError(list(found.problems), found.title)
            spec = replace(spec, preset=found)
            report.identity += f'; preset=auto -> {spec.preset or "none"}'
        preset: Optional[KeyPreset] = get_preset(spec.preset) if spec.preset else None
    except FusionLoadError as e:
        plan.problems += [f'{fname}: {p}' for p in e.problems]
        return plan
    report.targets = targets
    if preset is not None and preset.spconv_layout and spec.spconv_layout == 'auto':
        spec = replace(spec, spconv_layout=preset.spconv_layout)
    state = ckpt.state
    if preset is not None and preset.convert is not None:
        state = preset.convert(dict(state))
    if model_state is None:
        model_state = dict(model.state_dict(keep_vars=True))
    targeted = _targeted(model_state, targets)

    try:
        renamed = rename_keys(list(state), spec.rename, preset, fname)
        if state is ckpt.state:
            shapes = {new: all_shapes[old] for new, old in renamed.items()}
        else:
            shapes = ({new: shape_of(state, old) for new, old in renamed.items()}
                      if is_lazy(state) else
                      {new: tuple(state[old].shape) for new, old in renamed.items()})
        tshapes = {k: tuple(v.shape) for k, v in targeted.items()}
        if spec.prefix == 'auto':
            align: Alignment = auto_alignment(shapes, tshapes, targets, fname)
        else:
            align = explicit_alignment(list(shapes), spec.prefix, shapes, tshapes, fname)
            if align.names == 0:
                raise FusionLoadError(
                    [f'{fname}: prefix {spec.prefix} places no tensor on the targeted '
                     f'modules ({", ".join(targets)})'], 'no matching keys')
    except FusionLoadError as e:
        plan.problems += e.problems
        return plan
    report.prefix = align.describe()
    report.ignored = len(state) - len(align.mapping)
    under_any = _under_any(targets)
    try:
        classes = plan_classes(model, spec, ckpt.meta, align.mapping, shapes, targeted,
                               under_any, fname)
        features, report.features = plan_features(model, spec, align.mapping, shapes,
                                                  targeted, under_any, fname)
    except FusionLoadError as e:
        plan.problems += e.problems
        return plan
    mapping = align.mapping
    takes: Dict[str, Any] = {}
    if classes is not None:
        mapping = dict(mapping)
        for key, (new, take) in classes.takes.items():
            if new in renamed and key in targeted:
                mapping[key] = new
                if take.dim is not None:
                    takes[key] = take
        for key in classes.keep:
            mapping.pop(key, None)
        report.new += sorted(classes.keep)
        report.new_classes, report.dropped_classes = classes.new, classes.dropped
        report.classes = classes.notes
    context = SourceContext(fname, spec, model, meta=dict(ckpt.meta or {}))
    if preset is not None and preset.orders is not None:
        context.orders = preset.orders(dict(all_shapes))
    heads = tuple(h + '.' for h in classes.heads) if classes is not None else ()
    return plan_mapping(plan, spec, context, state, mapping, renamed, shapes, targets,
                        targeted, ckpt.metadata, preset, features=features, takes=takes,
                        heads=heads)


def plan_mapping(plan: SourcePlan,
                 spec: SourceSpec,
                 context: SourceContext,
                 state: Mapping[str, torch.Tensor],
                 mapping: Mapping[str, str],
                 file_keys: Mapping[str, str],
                 shapes: Mapping[str, tuple],
                 targets: Sequence[str],
                 targeted: Dict[str, torch.Tensor],
                 metadata: Mapping[str, dict],
                 preset: Optional[KeyPreset] = None,
                 features: Optional[Mapping[str, Any]] = None,
                 takes: Optional[Mapping[str, Any]] = None,
                 heads: Tuple[str, ...] = ()) -> SourcePlan:
    """Plan the checkpoint tensors ``mapping`` places on the model: the one planner of
    :func:`load_sources` and of the ``load_from`` repair
    (:func:`~mmfusionload.load.load_from.repair_checkpoint`).

    Every mapped tensor of a ``targeted`` model key becomes an entry (unless
    ``spec.exclude`` matches it: excluded); one off the model is unexpected under
    a target, ignored elsewhere. The registered repairs run on every entry, which
    then is loaded (repaired when a repair changed it), regenerated or mismatched
    (a :class:`~mmfusionload.report.Mismatch` record and its problem line, the entry
    skipped). Last, targets that got nothing are kept and targeted model tensors
    the checkpoint lacks are missing (or new, by the preset's design).

    Args:
        plan (SourcePlan): Filled in: entries, report and problems.
        spec (SourceSpec): The source's options, as the repairs see them.
        context (SourceContext): Shared by the source's entries.
        state (Mapping): Checkpoint key -> tensor.
        mapping (Mapping): Model key -> name (the checkpoint key after renaming).
        file_keys (Mapping): Name -> checkpoint key.
        shapes (Mapping): Name -> the checkpoint tensor's shape.
        targets (Sequence[str]): Target submodules (``''``: the whole model).
        targeted (dict): The model tensors the source may write, by key.
        metadata (Mapping): The checkpoint's ``_metadata`` (module -> ``version``).
        preset (KeyPreset, optional): Names the model tensors new by design.
        features (Mapping, optional): Model key -> its point-feature step
            (:func:`~mmfusionload.load.features.plan_features`).
        takes (Mapping, optional): Model key -> the class rows it takes
            (:func:`~mmfusionload.load.classes.plan_classes`).
        heads (tuple[str]): ``'<head>.'`` of heads whose classes were mapped: a
            checkpoint tensor there the model lacks is a task or class it does not have.

    Returns:
        SourcePlan: ``plan``.
    """
    report, fname = plan.report, spec.checkpoint
    excludes = [re.compile(p) for p in spec.exclude]
    modules: Dict[str, nn.Module] = {}
    versions: Dict[str, Optional[int]] = {}
    model = context.model
    under_any = _under_any(targets)
    mapped, entries = context.mapped, plan.entries
    for key, new in mapping.items():
        file_key = file_keys[new]
        target = targeted.get(key)
        if target is None:  # every targeted key is under a target
            if heads and key.startswith(heads):
                report.ignored += 1  # a task or class output the model does not have
            elif under_any(key) and not is_record(key):
                report.unexpected.append(key)
            else:
                report.ignored += 1
            continue
        mod_name = key.rpartition('.')[0]
        module = modules.get(mod_name)
        if module is None:
            module = modules[mod_name] = _submodule(model, mod_name)
        file_mod = mod_name if file_key == key else file_key.rpartition('.')[0]
        if file_mod in versions:
            version = versions[file_mod]
        else:
            version = versions[file_mod] = (metadata.get(file_mod) or {}).get('version')
        feature = features.get(key) if features else None
        take = takes.get(key) if takes else None
        shape = feature.shape if feature is not None else \
            tuple(target.shape) if take is not None else shapes[new]
        mapped.append(Mapped(key, file_key, shape, module, mod_name, version))
        if excludes and any(p.search(key) for p in excludes):
            report.excluded.append(key)
            continue
        entry = Entry(key, file_key, state[file_key], target, module, mod_name,
                      version, spec, fname, context=context)
        if feature is not None:
            entry.add_step('point_features', feature, shape=feature.shape)
        if take is not None:
            entry.add_step('classes', lambda t, b=target, d=take.dim, p=take.pairs:
                           take_rows(t, b, d, p), shape=target.shape)
        entries.append(entry)

    repairs = repairs_in_order()
    loaded, regenerated, repaired = report.loaded, report.regenerated, report.repaired
    for e in entries:
        try:
            run_repairs(e, repairs)
        except RepairProblem as err:
            report.mismatched.append(Mismatch(e.key, e.file_key, e.source.shape,
                                              e.target.shape, 'repair', str(err)))
            e.skip = 'error'
            continue
        if e.skip:
            regenerated.append(e.key)
        elif e.shape != tuple(e.target.shape):
            report.mismatched.append(Mismatch(e.key, e.file_key, e.source.shape,
                                              e.target.shape))
            e.skip = 'error'
        else:
            loaded.append(e.key)
            for name, _ in e.steps:
                repaired.setdefault(name, []).append(e.key)
            report.placed.append(Placed(e.key, e.file_key, list(e.source.shape),
                                        str(e.source.dtype).replace('torch.', ''),
                                        [name for name, _ in e.steps]))

    plan.problems += mismatch_problems(
        fname, report.mismatched, lambda k: _under(k, targets) or k.split('.', 1)[0])
    _account(plan, targets, targeted, preset, excludes)
    return plan


def _provided(entries: Sequence[Entry], targets: Sequence[str]) -> set:
    """``{_under(e.key, targets) for e in entries}``, found once per module.

    A key that is no target name is under the target its module name (all
    before its last dot) is under: the answer of one key holds for its module.
    """
    names, found = set(targets), set()
    of_module: Dict[str, Optional[str]] = {}
    for e in entries:
        key = e.key
        if key in names:
            found.add(_under(key, targets))
            continue
        mod = key.rpartition('.')[0]
        if mod not in of_module:
            of_module[mod] = _under(key, targets)
    return found.union(of_module.values())


def _holds(targeted: Dict[str, torch.Tensor], target: str) -> bool:
    """``bool(_targeted(targeted, [target]))``, stopping at the first key."""
    return any(map(_under_any([target]), targeted))


def _account(plan: SourcePlan, targets: List[str], targeted: Dict[str, torch.Tensor],
             preset: Optional[KeyPreset], excludes) -> None:
    """Fill kept / missing / new and the strictness problems of a plan."""
    report, spec = plan.report, plan.spec
    provided = _provided(plan.entries, targets)
    report.kept = [t for t in targets if t not in provided and _holds(targeted, t)]
    if not provided - {None}:
        plan.problems.append(f'{spec.checkpoint}: provides nothing for the targeted '
                             f'modules ({", ".join(t or "<model>" for t in targets)})')
        return
    if spec.strict == 'all' and report.kept:
        plan.problems.append(f'{spec.checkpoint}: strict="all" but nothing arrives for '
                             f'{", ".join(report.kept)}')
    arrived = {e.key for e in plan.entries}
    arrived.update(report.new)  # tensors of new classes keep the model's values
    for key in targeted:
        if key in arrived or _under(key, targets) not in provided:
            continue
        if any(p.search(key) for p in excludes) or may_be_absent(key):
            continue
        if preset is not None and preset.is_new(key):
            report.new.append(key)
            continue
        report.missing.append(key)
    if report.missing and spec.strict:
        plan.problems.append(
            f'{spec.checkpoint}: {len(report.missing)} tensor(s) of the loaded modules '
            f'get nothing from this checkpoint: {"; ".join(compress_keys(report.missing)[:20])}'
            " (exclude them, or strict=False to keep their current values)")


def verify_plan(plan: SourcePlan, mode: Union[bool, str]) -> Dict[str, str]:
    """Check the plan's converted sparse kernels by function (``verify=mode``, see
    :mod:`mmfusionload.sparse.verify`): each that computes another function than the
    checkpoint's is no longer loaded but mismatched (kind ``'verify'``).

    Returns:
        dict: Model key -> problem, per kernel that failed.
    """
    to_load = {e.key: e for e in plan.to_load}
    found = verify_entries(list(to_load.values()), mode, plan.report)
    for key, problem in found.items():
        e = to_load[key]
        plan.report.mismatched.append(Mismatch(key, e.file_key, e.source.shape,
                                               e.target.shape, 'verify', problem))
        plan.report.loaded.remove(key)
    return found


def validate(plans: Sequence[SourcePlan], allow_overlap: bool = False) -> List[str]:
    """Check values and overlaps across all plans; return the problems.

    A tensor whose values cannot be written as planned is mismatched (kind
    ``'value'``) in its source's report, no longer loaded.
    """
    problems: List[str] = []
    writers: Dict[str, str] = {}
    pairs: Dict[tuple, List[str]] = {}
    for plan in plans:
        problems += plan.problems
        allow_nonfinite = plan.spec.allow_nonfinite
        report, refused = plan.report, set()
        # the values as written, after every step and the cast
        for e in plan.to_load:
            problem = entry_problem(e, allow_nonfinite)
            if problem:
                problems.append(problem)
                report.mismatched.append(Mismatch(e.key, e.file_key, _shape(e.source),
                                                  e.target.shape, 'value', problem))
                refused.add(e.key)
            if e.key in writers and not allow_overlap:
                pairs.setdefault((writers[e.key], e.filename), []).append(e.key)
            writers[e.key] = e.filename
        if refused:  # mismatched now, no longer loaded
            report.loaded[:] = [k for k in report.loaded if k not in refused]
    return problems + overlap_problems(pairs)


def _shape(value: Any) -> tuple:
    """A checkpoint value's shape (``()`` for what is no tensor)."""
    return tuple(getattr(value, 'shape', ()))


def check_targets(plans: Sequence[SourcePlan], extra_models: Sequence[nn.Module] = ()
                  ) -> List[str]:
    """Problems that would only show while writing: targets that cannot take a copy.

    A target whose elements overlap in memory (an ``expand``-ed buffer) or an
    extra model (EMA) whose tensor has another shape would fail half-way
    through :func:`apply`; they are found here, before anything is written.
    """
    problems = []
    extras = [dict(unwrap_model(m).state_dict(keep_vars=True)) for m in extra_models]
    for plan in plans:
        for e in plan.to_load:
            if torch._debug_has_internal_overlap(e.target) == 1:
                problems.append(f'{e.key}: the model tensor {list(e.target.shape)} shares '
                                'memory between its elements and cannot be loaded')
            for state in extras:
                if e.key in state and tuple(state[e.key].shape) != e.shape:
                    problems.append(f'{e.key}: extra model (EMA) holds '
                                    f'{list(state[e.key].shape)}, the load gives {list(e.shape)}')
    return problems


@torch.no_grad()
def apply(plans: Sequence[SourcePlan], extra_models: Sequence[nn.Module] = ()) -> None:
    """Write every planned tensor into the model (and into ``extra_models``).

    Raises:
        FusionLoadError: Writing failed (e.g. out of memory moving a tensor to
            its device); the message says how many tensors were written.
    """
    extras = [dict(unwrap_model(m).state_dict(keep_vars=True)) for m in extra_models]
    written = 0
    for plan in plans:
        for e in plan.to_load:
            try:
                # an unrepaired tensor on the target's device goes in as it is
                src, dst = e.source, e.target
                t = src if not e.steps and (src.is_cpu and dst.is_cpu
                                            or src.device == dst.device) else e.materialize()
                e.target.copy_(t)
                for state in extras:
                    if e.key in state:
                        state[e.key].copy_(t)
            except Exception as err:
                raise FusionLoadError(
                    [f'{e.filename}: writing {e.key} failed: {type(err).__name__}: {err}'],
                    f'checkpoint load failed while writing, after {written} tensor(s); '
                    'the model is partly loaded') from err
            written += 1


def load_sources(model: nn.Module,
                 sources: Iterable[SourceLike],
                 dry_run: bool = False,
                 allow_overlap: bool = False,
                 extra_models: Sequence[nn.Module] = (),
                 logger: Optional[Any] = 'current',
                 title: str = 'mmfusionload',
                 broadcast: Union[bool, str] = 'auto',
                 classes: Optional[Sequence[str]] = None) -> LoadReport:
    """Load checkpoints into parts of a model, all or nothing.

    Args:
        model (nn.Module): The model (wrappers are unwrapped).
        sources (Iterable[dict | SourceSpec]): One per checkpoint part; see
            :class:`~mmfusionload.load.source.SourceSpec` for the options. Sources
            naming the same file (and ``trust_checkpoint``) share one read.
        dry_run (bool): Plan and validate only; problems are reported in the
            returned report instead of raised. Defaults to False.
        allow_overlap (bool): Let a later source overwrite keys an earlier one
            wrote. Defaults to False.
        extra_models (Sequence[nn.Module]): Models that receive the same
            tensors (e.g. an EMA copy).
        logger: MMEngine logger (or ``'current'``, or None for silence).
        title (str): Report title.
        broadcast (bool | str): Under an initialized ``torch.distributed``
            process group of more than one process, rank 0 reads every file
            and broadcasts the tensors; the other ranks never open the files.
            ``'auto'`` (default): broadcast when such a group exists; ``True``:
            the same, an error without a process group; ``False``: every rank
            reads its own files. When broadcasting, call this on every rank.
            See :mod:`mmfusionload.load.distributed`.
        classes (Sequence[str], optional): The model's class names, for the sources
            that do not set ``model_classes`` (the class-indexed tensors of registered
            heads are loaded by class name, :mod:`mmfusionload.load.classes`).

    Returns:
        LoadReport: What was (or would be) loaded.

    Raises:
        FusionLoadError: Any problem in any source, unless ``dry_run``. The
            model is unchanged when it is raised.
    """
    model = unwrap_model(model)
    specs = []
    problems: List[str] = []
    for cfg in source_list(sources):
        try:
            spec = parse_source(cfg)
            if classes is not None and spec.model_classes is None:
                spec = parse_source(replace(spec, model_classes=list(classes)))
            specs.append(spec)
        except FusionLoadError as e:
            problems += e.problems
    report = LoadReport(dry_run=dry_run, title=title)
    if not specs and not problems:
        problems.append('no sources given')
    model_state = dict(model.state_dict(keep_vars=True))
    report.describe_model(model, model_state)
    plans: List[SourcePlan] = []
    with reading_once():  # one read of each file, however many sources name it
        read = read_all(specs, read_source, broadcast)
    for spec, ckpt in zip(specs, read):
        if isinstance(ckpt, FusionLoadError):
            problems += ckpt.problems
            report.sources.append(SourceReport(spec.checkpoint, spec.label))
            continue
        try:
            plan = plan_source(model, spec, ckpt, model_state)
        except Exception as e:  # a foreign-format conversion or rename that breaks
            problems.append(f'{spec.checkpoint}: {type(e).__name__}: {e}')
            report.sources.append(SourceReport(spec.checkpoint, spec.label))
            continue
        plans.append(plan)
        report.sources.append(plan.report)
    problems += validate(plans, allow_overlap)
    problems += check_targets(plans, extra_models)
    if not problems:  # prove converted sparse kernels by function before writing
        for plan in plans:
            problems += list(verify_plan(plan, plan.spec.verify).values())
    report.problems = problems
    if problems and not dry_run:
        if logger is not None:
            print_log(report.format(), logger=logger)
        err = FusionLoadError(problems, 'checkpoint load failed; the model is unchanged')
        err.report = report
        raise err
    if not dry_run:
        apply(plans, extra_models)
        report.applied = True
    for plan in plans:  # freeze=True: what the source loaded does not train
        if plan.spec.freeze:
            keys = [e.key for e in plan.to_load]
            plan.report.frozen = (frozen_modules(*frozen_parts(model, keys)) if dry_run
                                  else freeze(model, keys))
    if logger is not None:
        print_log('\n' + report.format(), logger=logger)
    return report
