"""A source: one checkpoint and what to load from it."""
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import FusionLoadError
from ..sparse.layouts import check_layout_option
from .features import feature_pair


@dataclass
class SourceSpec:
    """Options of one source (the dicts given to ``load_sources`` and the hook).

    Args:
        checkpoint (str): Path or URI MMEngine's ``CheckpointLoader`` knows.
        modality (str | list[str], optional): Modality preset name(s).
        modules (list[str], optional): Explicit submodule names.
        prefix (str | dict): ``'auto'`` or ``{checkpoint_prefix: model_prefix}``.
        rename (list[tuple[str, str]]): ``(regex, replacement)`` pairs.
        preset (str, optional): A registered key-mapping preset.
        spconv_layout (str): ``'auto'`` or one of
            :data:`~mmfusionload.sparse.layouts.LAYOUTS` (``'spconv2'``, ``'mmcv'``,
            ``'spconv2_rskc'``).
        exclude (list[str]): Regexes of model keys to leave as they are.
        strict (bool | str): True, False or ``'all'``.
        prefer_ema (bool): The same as ``weights='ema'`` (kept for old configs).
        allow_nonfinite (bool): Accept NaN/Inf values.
        trust_checkpoint (bool): Unpickle arbitrary globals (trusted files only).
        spatial_order (str): ``'auto'``, ``'zyx'`` or ``'xyz'``: the spatial axis
            order of the checkpoint's sparse encoders.
        verify (bool | str): ``'auto'`` (default): check by function every
            sparse conv a function-changing repair touched; True: every sparse
            conv loaded; False: none.
        name (str, optional): A label for the report.
        weights (str): Which copy of the weights: ``'auto'`` (what the file's
            trainer deploys, e.g. MMEngine's averaged ``state_dict`` when
            ``EMAHook`` ran), ``'ema'`` (the averaged copy; an error when the file
            has none) or ``'raw'`` (the trained, non-averaged copy).
        classes (list[str], optional): The checkpoint's class names (default: its
            ``meta['dataset_meta']['classes']``); the class-indexed tensors of the
            registered heads get the rows of the classes the model shares
            (:mod:`mmfusionload.load.classes`).
        model_classes (list[str], optional): The model's class names (the hook reads
            them from the run's dataset ``metainfo``; ``load_sources(classes=...)``).
        class_map (dict, optional): Checkpoint class name -> model class name
            (``{'bicycle': 'cyclist'}``).
        point_features (dict, optional): ``dict(checkpoint=..., model=...)``, each a
            preset name (``nuscenes``, ``kitti``, ``waymo``) or a list of feature
            names: the first layer reading raw point features is adapted by name
            (:mod:`mmfusionload.load.features`).
        freeze (bool): The tensors this source loads do not train, and the
            normalisation layers wholly inside what it loads stay in eval mode
            (:mod:`mmfusionload.load.freeze`).
    """
    checkpoint: str
    modality: Union[None, str, List[str]] = None
    modules: Optional[List[str]] = None
    prefix: Union[str, Dict[str, str]] = 'auto'
    rename: List[Tuple[str, str]] = field(default_factory=list)
    preset: Optional[str] = None
    spconv_layout: str = 'auto'
    exclude: List[str] = field(default_factory=list)
    strict: Union[bool, str] = True
    prefer_ema: bool = False
    allow_nonfinite: bool = False
    trust_checkpoint: bool = False
    spatial_order: str = 'auto'
    verify: Union[bool, str] = 'auto'
    name: Optional[str] = None
    weights: str = 'auto'
    classes: Optional[List[str]] = None
    model_classes: Optional[List[str]] = None
    class_map: Optional[Dict[str, str]] = None
    point_features: Optional[Dict[str, Any]] = None
    freeze: bool = False

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.modality is not None:
            return '+'.join([self.modality] if isinstance(self.modality, str)
                            else list(self.modality))
        if self.modules:
            return ','.join(self.modules)
        return 'model'


ALLOWED = tuple(f.name for f in fields(SourceSpec))


def _names(value: Any, what: str, problems: List[str]) -> Optional[List[str]]:
    """``value`` as a list of strings (None stays None), or a problem."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        problems.append(f'{what} must be a string or a list of strings, got {value!r}')
        return None
    return list(items)


def _regex(pattern: Any, what: str, problems: List[str]) -> None:
    if not isinstance(pattern, str):
        problems.append(f'{what} must be a regex string, got {pattern!r}')
        return
    try:
        re.compile(pattern)
    except re.error as e:
        problems.append(f'{what} {pattern!r} is not a valid regex: {e}')


def parse_source(cfg: Union[SourceSpec, Dict[str, Any]]) -> SourceSpec:
    """Check a source dict (or spec) and turn it into a :class:`SourceSpec`.

    Raises:
        FusionLoadError: Unknown keys (the message lists the allowed ones),
            a missing ``checkpoint`` or a bad option value.
    """
    if isinstance(cfg, SourceSpec):
        cfg = asdict(cfg)
    if not isinstance(cfg, dict):
        raise FusionLoadError([f'a source must be a dict, got {type(cfg).__name__}'],
                              'bad source')
    problems: List[str] = []
    unknown = sorted(set(cfg) - set(ALLOWED))
    if unknown:
        problems.append(f'unknown source option(s) {unknown}; allowed: {", ".join(ALLOWED)}')
    if not cfg.get('checkpoint'):
        problems.append(f'source {dict(cfg)} has no "checkpoint"')
    if problems:
        raise FusionLoadError(problems, 'bad source')
    spec = SourceSpec(**cfg)
    where = f'source {spec.checkpoint}:'
    spec.checkpoint = str(spec.checkpoint)
    modality = _names(spec.modality, f'{where} modality', problems)
    spec.modality = modality[0] if isinstance(spec.modality, str) else modality
    spec.modules = _names(spec.modules, f'{where} modules', problems)
    spec.exclude = _names(spec.exclude, f'{where} exclude', problems) or []
    for pattern in spec.exclude:
        _regex(pattern, f'{where} exclude', problems)
    if spec.preset is not None and not isinstance(spec.preset, str):
        problems.append(f'{where} preset must be a name, got {spec.preset!r}')
    bad_layout = check_layout_option(spec.spconv_layout)
    if bad_layout:
        problems.append(f'{where} {bad_layout}')
    if spec.spatial_order not in ('auto', 'zyx', 'xyz'):
        problems.append(f"{where} spatial_order must be 'auto', 'zyx' or 'xyz', "
                        f'got {spec.spatial_order!r}')
    if spec.verify not in (True, False, 'auto'):
        problems.append(f"{where} verify must be True, False or 'auto', got {spec.verify!r}")
    if spec.strict not in (True, False, 'all'):
        problems.append(f"{where} strict must be True, False or 'all', got {spec.strict!r}")
    if not (spec.prefix == 'auto' or (isinstance(spec.prefix, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in spec.prefix.items()))):
        problems.append(f"{where} prefix must be 'auto' or a {{checkpoint_prefix: "
                        f'model_prefix}} dict of strings, got {spec.prefix!r}')
    rules: Sequence = spec.rename or []
    if not isinstance(rules, (list, tuple)) or any(
            not (isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], str))
            for r in rules):
        problems.append(f'{where} rename must be a list of (regex, replacement) pairs, '
                        f'got {rules!r}')
    else:
        for pattern, repl in rules:
            _regex(pattern, f'{where} rename', problems)
        spec.rename = [tuple(r) for r in rules]  # type: ignore[misc]
    _check_weights(spec, where, problems)
    _check_finetune(spec, where, problems)
    if problems:
        raise FusionLoadError(problems, 'bad source')
    return spec


def _check_weights(spec: SourceSpec, where: str, problems: List[str]) -> None:
    """``weights`` is one of auto/ema/raw; ``prefer_ema=True`` becomes ``'ema'``."""
    if spec.weights not in ('auto', 'ema', 'raw'):
        problems.append(f"{where} weights must be 'auto', 'ema' or 'raw', got {spec.weights!r}")
    elif spec.prefer_ema:
        if spec.weights == 'raw':
            problems.append(f"{where} prefer_ema=True contradicts weights='raw'")
        spec.weights, spec.prefer_ema = 'ema', False


def _check_finetune(spec: SourceSpec, where: str, problems: List[str]) -> None:
    """``classes``, ``model_classes``, ``class_map``, ``point_features`` and ``freeze``."""
    for name in ('classes', 'model_classes'):
        value = getattr(spec, name)
        if value is None:
            continue
        names = _names(value, f'{where} {name}', problems)
        if names is not None and len(set(names)) != len(names):
            problems.append(f'{where} {name} names a class twice: {names}')
        setattr(spec, name, names)
    if spec.class_map is not None:
        if not isinstance(spec.class_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in spec.class_map.items()):
            problems.append(f'{where} class_map must be a {{checkpoint class: model class}} '
                            f'dict of strings, got {spec.class_map!r}')
        else:
            spec.class_map = dict(spec.class_map)
    if spec.point_features is not None:
        try:
            spec.point_features = feature_pair(spec.point_features)
        except ValueError as e:
            problems.append(f'{where} point_features: {e}')
    if spec.freeze not in (True, False):
        problems.append(f'{where} freeze must be True or False, got {spec.freeze!r}')


def source_list(sources: Any) -> List[Any]:
    """``sources`` as a list, or one clear error when it is not a list of sources.

    A single dict (``sources=dict(...)``), a spec or a path string is a common
    slip; iterating it would report each of its keys or characters as a bad
    source.

    Raises:
        FusionLoadError: ``sources`` is a dict, a spec, a string or not iterable.
    """
    if isinstance(sources, (dict, SourceSpec, str, bytes)) or not hasattr(sources, '__iter__'):
        kind = ('a path string' if isinstance(sources, (str, bytes)) else 'a single dict'
                if isinstance(sources, dict) else f'a single {type(sources).__name__}')
        shown = dict(sources) if isinstance(sources, dict) else sources
        raise FusionLoadError(
            [f'sources must be a list of source dicts, got {kind}: {shown!r}; write '
             "sources=[dict(checkpoint=..., modality=...)]"], 'bad sources')
    return list(sources)
