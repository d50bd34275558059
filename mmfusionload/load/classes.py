"""Head classes by name: class-indexed tensors keep the rows of the classes both sides share.

A checkpoint trained on one dataset (nuScenes' 10 classes) and a model for another
(``car``, ``pedestrian``, ``cyclist``) share some classes by name. Every registered
head (``HEAD_CLASS_RULES``, looked up by the head's class name along its MRO) says
which of its tensors hold one row (or input column) per class; those get the rows
of the shared classes, in the model's order. Classes the checkpoint lacks keep the
model's initial values (*new classes*); classes the model lacks are *dropped*.

A rule is a function ``rule(ctx: HeadContext) -> HeadPlan``; register one with
``HEAD_CLASS_RULES.register_module(name='MyHead', module=rule)``.

Facts read from MMDetection 3.3.0, MMDetection3D 1.4.0 and MMDetection3D's
``projects/BEVFusion`` (dev-1.x, 1.4.0):

- ``TransFusionHead``: ``heatmap_head`` is ``Sequential(ConvModule, Conv2d(hidden,
  num_classes))``; ``class_encoding`` is ``Conv1d(num_classes, hidden, 1)`` (one input
  column per class: the one-hot label of each query); every ``prediction_heads[i]`` is
  a ``SeparateHead`` whose ``heatmap`` Sequential ends in a conv with ``num_classes``
  outputs (one more, the background, last, without a sigmoid classifier).
- ``CenterHead``: ``task_heads[t]`` is a ``SeparateHead`` whose ``heatmap`` ends in a
  conv with one output per class of task ``t``; the other branches of a task (``reg``,
  ``height``...) are shared by its classes; the dataset's classes are the tasks'
  classes in order.
- ``AnchorHead`` / ``RetinaHead`` (MMDetection): ``conv_cls`` / ``retina_cls`` has
  ``num_base_priors x cls_out_channels`` outputs, class fastest (``cls_out_channels``
  is ``num_classes``, or one more with the background last for a softmax classifier).
- ``Anchor3DHead``: ``conv_cls`` has ``num_anchors x num_classes`` outputs, class
  fastest (its loss reshapes the permuted scores to ``(-1, num_classes)``).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import FusionLoadError
from ..registry import HEAD_CLASS_RULES


@dataclass
class Take:
    """Where one model tensor of a head comes from.

    Args:
        file_rel (str): The checkpoint tensor, relative to the head (usually the
            model tensor's own name; another task's for ``CenterHead``).
        dim (int, optional): The class-indexed dimension, or None for a whole tensor.
        pairs (list[tuple[int, int]]): ``(model index, checkpoint index)`` along
            ``dim``; the model's other indices keep the model's values.
    """
    file_rel: str
    dim: Optional[int] = None
    pairs: List[Tuple[int, int]] = field(default_factory=list)


@dataclass
class HeadPlan:
    """What a rule decides for one head.

    Args:
        takes (dict): Model tensor (relative to the head) -> :class:`Take`.
        keep (list[str]): Model tensors (relative) that keep the model's values
            (every class they serve is new).
        new (list[str]): Model classes the checkpoint lacks.
        dropped (list[str]): Checkpoint classes the model lacks.
        note (str): One line for the report.
    """
    takes: Dict[str, Take] = field(default_factory=dict)
    keep: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    note: str = ''


@dataclass
class HeadContext:
    """What a rule sees.

    Args:
        head (nn.Module): The live head.
        name (str): Its name in the model.
        src (list[str]): The checkpoint's class names, ``class_map`` applied.
        dst (list[str], optional): The model's class names.
        file_shapes (dict): The checkpoint's tensors under the head (names relative
            to the head) -> shape.
        model_shapes (dict): The model's tensors under the head -> shape.
        filename (str): The checkpoint, for messages.
    """
    head: nn.Module
    name: str
    src: List[str]
    dst: Optional[List[str]]
    file_shapes: Dict[str, Tuple[int, ...]]
    model_shapes: Dict[str, Tuple[int, ...]]
    filename: str = ''

    def fail(self, what: str) -> FusionLoadError:
        return FusionLoadError([f'{self.filename}: {self.name} '
                                f'({type(self.head).__name__}): {what}'], 'bad classes')

    def model_classes(self) -> List[str]:
        if self.dst is None:
            raise self.fail('the model\'s class names are unknown: give them to load_sources '
                            '(classes=...) or as the source option model_classes (the '
                            "FusionLoadHook reads them from the run's dataset metainfo)")
        return self.dst


def match(src: Sequence[str], dst: Sequence[str]) -> Tuple[List[Tuple[int, int]], List[str],
                                                              List[str]]:
    """``(model index, checkpoint index)`` of the classes both name, the new and the dropped.

    Args:
        src (Sequence[str]): Checkpoint classes (``class_map`` applied).
        dst (Sequence[str]): Model classes.
    """
    where = {c: i for i, c in enumerate(src)}
    pairs = [(j, where[c]) for j, c in enumerate(dst) if c in where]
    return pairs, [c for c in dst if c not in where], [c for c in src if c not in set(dst)]


def take_rows(t: torch.Tensor, base: torch.Tensor, dim: int,
              pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``base`` (the model's tensor) with ``t``'s indices ``pairs[i][1]`` along ``dim`` placed
    at ``pairs[i][0]``; computed in ``t``'s dtype, on ``t``'s device."""
    out = base.detach().to(device=t.device, dtype=t.dtype, copy=True)
    if pairs:
        dst = torch.tensor([p[0] for p in pairs], device=t.device)
        src = torch.tensor([p[1] for p in pairs], device=t.device)
        out.index_copy_(dim, dst, t.index_select(dim, src))
    return out


def _last(seq: nn.Module) -> int:
    return len(seq) - 1  # type: ignore[arg-type]


def _rows(ctx: HeadContext, rel: str, dim: int, pairs: List[Tuple[int, int]],
          plan: HeadPlan) -> None:
    """Plan a class-indexed tensor (present in both) as ``pairs`` along ``dim``."""
    if rel in ctx.model_shapes and rel in ctx.file_shapes:
        plan.takes[rel] = Take(rel, dim, pairs)


def _with_background(ctx: HeadContext, rel: str, dim: int, pairs: List[Tuple[int, int]]
                     ) -> List[Tuple[int, int]]:
    """``pairs`` plus the background (last) index when both sides have one."""
    if rel not in ctx.model_shapes or rel not in ctx.file_shapes:
        return pairs
    n_dst, n_src = ctx.model_shapes[rel][dim], ctx.file_shapes[rel][dim]
    if n_dst == len(ctx.model_classes()) and n_src == len(ctx.src):
        return pairs
    if n_dst == len(ctx.model_classes()) + 1 and n_src == len(ctx.src) + 1:
        return pairs + [(n_dst - 1, n_src - 1)]
    raise ctx.fail(f'{rel} has {n_src} class outputs in the checkpoint for {len(ctx.src)} '
                   f'classes and {n_dst} in the model for {len(ctx.model_classes())}: the class '
                   'names do not fit the head')


def transfusion_rule(ctx: HeadContext) -> HeadPlan:
    """BEVFusion's ``TransFusionHead``: the dense heatmap's last conv (rows), the class
    encoding (input columns) and every decoder layer's ``heatmap`` prediction (rows)."""
    head, plan = ctx.head, HeadPlan()
    pairs, plan.new, plan.dropped = match(ctx.src, ctx.model_classes())
    last = _last(head.heatmap_head)
    for p in ('weight', 'bias'):
        rel = f'heatmap_head.{last}.{p}'
        _rows(ctx, rel, 0, _with_background(ctx, rel, 0, pairs), plan)
    _rows(ctx, 'class_encoding.weight', 1,
          _with_background(ctx, 'class_encoding.weight', 1, pairs), plan)
    for i, pred in enumerate(head.prediction_heads):
        last = _last(pred.heatmap)
        for p in ('weight', 'bias'):
            rel = f'prediction_heads.{i}.heatmap.{last}.{p}'
            _rows(ctx, rel, 0, _with_background(ctx, rel, 0, pairs), plan)
    return plan


def _task_split(ctx: HeadContext, n_tasks_hint: int) -> List[List[str]]:
    """The checkpoint's classes per task, from its heatmap sizes (tasks hold the dataset's
    classes in order)."""
    sizes, t = [], 0
    while True:
        found = [r for r in ctx.file_shapes if r.startswith(f'task_heads.{t}.heatmap.')
                 and r.endswith('.weight')]
        if not found:
            break
        last = max(found, key=lambda r: int(r.split('.')[3]))
        sizes.append(ctx.file_shapes[last][0])
        t += 1
    if sum(sizes) != len(ctx.src):
        raise ctx.fail(f'the checkpoint\'s {len(sizes)} task heatmap(s) have {sizes} classes '
                       f'(sum {sum(sizes)}), but its class names are {len(ctx.src)}: '
                       f'{list(ctx.src)}')
    out, i = [], 0
    for n in sizes:
        out.append(list(ctx.src[i:i + n]))
        i += n
    return out


def centerpoint_rule(ctx: HeadContext) -> HeadPlan:
    """MMDetection3D's ``CenterHead``: per-task heatmaps by name; a model task whose classes
    come from one checkpoint task also takes that task's other branches."""
    head, plan = ctx.head, HeadPlan()
    src_tasks = _task_split(ctx, len(head.task_heads))
    dst_tasks = [list(c) for c in head.class_names]
    if ctx.dst is not None:
        flat = [c for task in dst_tasks for c in task]
        if flat != list(ctx.dst):
            raise ctx.fail(f'its tasks\' classes {dst_tasks} are not the model\'s classes '
                           f'{list(ctx.dst)} in order')
    task_of = {c: s for s, task in enumerate(src_tasks) for c in task}
    used = set()
    notes = []
    for t, classes in enumerate(dst_tasks):
        prefix = f'task_heads.{t}.'
        mine = [r for r in ctx.model_shapes if r.startswith(prefix)]
        sources = sorted({task_of[c] for c in classes if c in task_of})
        plan.new += [c for c in classes if c not in task_of]
        if not sources:
            plan.keep += mine
            notes.append(f'task {t} {classes}: new')
            continue
        if len(sources) > 1:
            split = {s: [c for c in classes if task_of.get(c) == s] for s in sources}
            raise ctx.fail(f'the model\'s task {t} {classes} takes classes from checkpoint '
                           'tasks ' + ', '.join(f'{s} {v}' for s, v in split.items())
                           + ': their regression branches differ; group these classes '
                           'as the checkpoint does')
        s = sources[0]
        used.update(c for c in classes if c in task_of)
        pairs, _, _ = match(src_tasks[s], classes)
        heat = [r for r in mine if r.startswith(f'{prefix}heatmap.')]
        last = max((int(r.split('.')[3]) for r in heat), default=-1)
        for rel in mine:
            file_rel = f'task_heads.{s}.' + rel[len(prefix):]
            if file_rel not in ctx.file_shapes:
                continue
            if rel in (f'{prefix}heatmap.{last}.weight', f'{prefix}heatmap.{last}.bias'):
                plan.takes[rel] = Take(file_rel, 0, pairs)
            else:
                plan.takes[rel] = Take(file_rel)
        notes.append(f'task {t} {classes} <- checkpoint task {s} {src_tasks[s]}')
    plan.dropped = [c for c in ctx.src if c not in used]
    plan.note = '; '.join(notes)
    return plan


def _anchor_pairs(ctx: HeadContext, rel: str, anchors: int) -> List[Tuple[int, int]]:
    """Rows of an ``anchors x classes`` (class fastest) output, background last if any."""
    dst = ctx.model_classes()
    n_dst, n_src = ctx.model_shapes[rel][0], ctx.file_shapes[rel][0]
    if n_dst % anchors or n_src % anchors:
        raise ctx.fail(f'{rel}: {n_src} (checkpoint) and {n_dst} (model) outputs are not '
                       f'{anchors} anchors x classes')
    c_dst, c_src = n_dst // anchors, n_src // anchors
    bg_dst, bg_src = c_dst - len(dst), c_src - len(ctx.src)
    if bg_dst not in (0, 1) or bg_dst != bg_src:
        raise ctx.fail(f'{rel}: {n_src} outputs for {len(ctx.src)} checkpoint classes and '
                       f'{n_dst} for {len(dst)} model classes do not make {anchors} anchors '
                       'x classes on both sides')
    pairs, _, _ = match(ctx.src, dst)
    if bg_dst:
        pairs = pairs + [(c_dst - 1, c_src - 1)]
    return [(a * c_dst + j, a * c_src + i) for a in range(anchors) for j, i in pairs]


def _anchor_rule(conv: str) -> Callable[[HeadContext], HeadPlan]:
    def rule(ctx: HeadContext) -> HeadPlan:
        plan = HeadPlan()
        _, plan.new, plan.dropped = match(ctx.src, ctx.model_classes())
        anchors = int(ctx.head.num_base_priors)
        for p in ('weight', 'bias'):
            rel = f'{conv}.{p}'
            if rel in ctx.model_shapes and rel in ctx.file_shapes:
                plan.takes[rel] = Take(rel, 0, _anchor_pairs(ctx, rel, anchors))
        return plan
    rule.__doc__ = f"""MMDetection's anchor heads: ``{conv}`` rows, anchors x classes."""
    return rule


#: MMDetection's ``AnchorHead`` classifies with ``conv_cls``.
anchor_head_rule = _anchor_rule('conv_cls')
#: MMDetection's ``RetinaHead`` classifies with ``retina_cls``.
retina_rule = _anchor_rule('retina_cls')


def anchor3d_rule(ctx: HeadContext) -> HeadPlan:
    """MMDetection3D's ``Anchor3DHead``: ``conv_cls`` rows when every class uses the same
    anchors (one anchor range); class-specific anchors change the regression rows too."""
    head = ctx.head
    ranges = getattr(head.prior_generator, 'ranges', [None])
    if len(ranges) != 1:
        raise ctx.fail(f'its anchors are per class ({len(ranges)} anchor ranges): loading '
                       'classes by name needs anchors shared by every class')
    plan = HeadPlan()
    _, plan.new, plan.dropped = match(ctx.src, ctx.model_classes())
    anchors = int(head.num_anchors)
    for p in ('weight', 'bias'):
        rel = f'conv_cls.{p}'
        if rel in ctx.model_shapes and rel in ctx.file_shapes:
            plan.takes[rel] = Take(rel, 0, _anchor_pairs(ctx, rel, anchors))
    return plan


HEAD_CLASS_RULES.register_module(name='TransFusionHead', module=transfusion_rule)
HEAD_CLASS_RULES.register_module(name='CenterHead', module=centerpoint_rule)
HEAD_CLASS_RULES.register_module(name='AnchorHead', module=anchor_head_rule)
HEAD_CLASS_RULES.register_module(name='RetinaHead', module=retina_rule)
HEAD_CLASS_RULES.register_module(name='Anchor3DHead', module=anchor3d_rule)


def rule_of(module: nn.Module) -> Optional[Callable[[HeadContext], HeadPlan]]:
    """The registered rule of ``module``'s class or its nearest base class."""
    for cls in type(module).__mro__:
        rule = HEAD_CLASS_RULES.module_dict.get(cls.__name__)
        if rule is not None:
            return rule
    return None


def checkpoint_classes(meta: Optional[dict]) -> Optional[List[str]]:
    """The class names an MMEngine (``dataset_meta.classes``) or MMDetection 2.x
    (``CLASSES``) checkpoint records in its ``meta``."""
    meta = meta or {}
    names = (meta.get('dataset_meta') or {}).get('classes') or meta.get('CLASSES')
    if isinstance(names, (list, tuple)) and all(isinstance(c, str) for c in names):
        return list(names)
    return None


@dataclass
class ClassPlan:
    """The class decisions of one source.

    Args:
        takes (dict): Model key -> ``(checkpoint-side key under the model's naming
            (renamed key), Take)``.
        keep (set): Model keys that keep the model's values.
        new (list[str]), dropped (list[str]): Over every head.
        notes (list[str]): One line per head.
        heads (list[str]): The model names of the heads planned.
    """
    takes: Dict[str, Tuple[str, Take]] = field(default_factory=dict)
    heads: List[str] = field(default_factory=list)
    keep: set = field(default_factory=set)
    new: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _head_prefix(model_prefix: str, mapping: Dict[str, str]) -> Optional[str]:
    """The checkpoint-side (renamed) prefix of a model head, from any tensor mapped under it."""
    for key, new in mapping.items():
        if key.startswith(model_prefix):
            rel = key[len(model_prefix):]
            if new.endswith(rel):
                return new[:len(new) - len(rel)]
    return None


def plan_classes(model: nn.Module, spec, meta: Optional[dict], mapping: Dict[str, str],
                 shapes: Dict[str, Tuple[int, ...]], targeted: Dict[str, torch.Tensor],
                 under: Callable[[str], bool], filename: str) -> Optional[ClassPlan]:
    """Plan every registered head under the source's targets.

    Active when the source sets ``classes`` or ``class_map``, or when the checkpoint
    records class names and the model's (``model_classes``) differ from them.

    Args:
        model (nn.Module): The model.
        spec (SourceSpec): The source (``classes``, ``class_map``, ``model_classes``).
        meta (dict, optional): The checkpoint's ``meta``.
        mapping (dict): Model key -> checkpoint key under the model's naming.
        shapes (dict): Checkpoint key (model naming) -> shape.
        targeted (dict): The model's tensors under the targets.
        under (callable): Whether a model name is under the targets.
        filename (str): For messages.

    Returns:
        ClassPlan | None: None when no class mapping is asked for.

    Raises:
        FusionLoadError: Unknown class names, or a head whose tensors do not fit them.
    """
    src = spec.classes or checkpoint_classes(meta)
    dst = spec.model_classes
    class_map = dict(spec.class_map or {})
    asked = bool(spec.classes or class_map)
    if src is None:
        if asked:
            raise FusionLoadError([f'{filename}: class_map given but the checkpoint records no '
                                   'class names (meta.dataset_meta.classes); give them as the '
                                   'source option classes'], 'bad classes')
        return None
    unknown = sorted(set(class_map) - set(src))
    if unknown:
        raise FusionLoadError([f'{filename}: class_map names {unknown}, which are not '
                               f'checkpoint classes {list(src)}'], 'bad classes')
    mapped = [class_map.get(c, c) for c in src]
    twice = sorted({c for c in mapped if mapped.count(c) > 1})
    if twice:
        raise FusionLoadError([f'{filename}: class_map makes {twice} name more than one '
                               f'checkpoint class ({list(src)} -> {mapped})'], 'bad classes')
    if not asked and (dst is None or list(dst) == mapped):
        return None
    out = ClassPlan()
    done: List[str] = []
    for name, module in model.named_modules():
        if not name or not under(name) or any(name.startswith(d + '.') for d in done):
            continue
        rule = rule_of(module)
        if rule is None:
            continue
        prefix = name + '.'
        model_shapes = {k[len(prefix):]: tuple(v.shape) for k, v in targeted.items()
                        if k.startswith(prefix)}
        file_prefix = _head_prefix(prefix, mapping)
        if file_prefix is None or not model_shapes:
            continue
        done.append(name)
        file_shapes = {k[len(file_prefix):]: s for k, s in shapes.items()
                       if k.startswith(file_prefix)}
        ctx = HeadContext(module, name, mapped, list(dst) if dst is not None else None,
                          file_shapes, model_shapes, filename)
        plan = rule(ctx)
        for rel, take in plan.takes.items():
            out.takes[prefix + rel] = (file_prefix + take.file_rel, take)
        out.keep.update(prefix + rel for rel in plan.keep)
        out.new += [c for c in plan.new if c not in out.new]
        out.dropped += [c for c in plan.dropped if c not in out.dropped]
        renames = [f'{a}->{b}' for a, b in class_map.items()]
        out.notes.append(f'{name} ({type(module).__name__}): {len(src)} -> '
                         f'{len(ctx.dst) if ctx.dst is not None else "?"} classes'
                         + (f' ({", ".join(renames)})' if renames else '')
                         + (f'; {plan.note}' if plan.note else ''))
    out.heads = done
    if asked and not done:
        raise FusionLoadError([f'{filename}: classes/class_map given, but no registered head '
                               f'({", ".join(sorted(HEAD_CLASS_RULES.module_dict))}) under '
                               'the targets gets tensors from this checkpoint'], 'bad classes')
    return out
