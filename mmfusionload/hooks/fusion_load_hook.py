"""``FusionLoadHook``: per-modality checkpoints and the ``load_from`` repair in a Runner."""
import os.path as osp
from typing import List, Optional, Sequence, Union

from mmengine.dist import is_main_process
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..errors import FusionLoadError
from ..sparse.layouts import check_layout_option
from ..load.load_from import fill_targets_of, repair_checkpoint
from ..load.pipeline import load_sources, unwrap_model
from ..files.reader import install_checkpoint_loader
from ..report import LoadReport, compress_keys
from ..load.source import SourceSpec, parse_source, source_list


@HOOKS.register_module()
class FusionLoadHook(Hook):
    """Load separate checkpoints into separate parts of the model at run start.

    Loads once, at the first of ``before_train``, ``before_val`` and
    ``before_test``: after ``init_weights`` and after ``load_from``. It also
    repairs the ``load_from`` checkpoint before MMEngine applies it, and makes
    MMEngine read local checkpoints through the package's restricted
    unpickler, so Runner-saved checkpoints load on torch >= 2.6.

    Args:
        sources (Sequence[dict]): Sources, as for
            :func:`~mmfusionload.load_sources`.
        load_on_resume (bool): Load even when the run resumes (by default the
            resumed weights win). Defaults to False.
        repair_load_from (bool): Repair the ``load_from`` checkpoint.
            Defaults to True.
        load_from_spconv_layout (str): Sparse-kernel layout of the
            ``load_from`` checkpoint (``'auto'`` or one of
            :data:`~mmfusionload.sparse.layouts.LAYOUTS`).
        load_from_weights (str): Which copy of the ``load_from`` checkpoint the
            model gets: ``'auto'`` (what MMEngine deploys: ``state_dict``, the
            averaged weights when ``EMAHook`` wrote the file), ``'ema'`` or ``'raw'``.
            An ``EMAHook`` of this run starts from the same copy. Not used on
            resume, where MMEngine restores both copies itself.
        allow_overlap (bool): Let a later source overwrite an earlier one.
        trust_checkpoint (bool): Read local checkpoints (``load_from``,
            ``resume``, ``Pretrained``) with plain unpickling. Only for
            trusted files. Defaults to False.
        report_file (str, optional): JSON report name in ``work_dir``.
        html_report (str, optional): Name of the report as a page
            (:meth:`~mmfusionload.LoadReport.to_html`) in ``work_dir``, also written
            when the load fails; None writes none.
        load_from_strict (bool): Stop the run (``FusionLoadError``, before
            MMEngine applies the file) when the ``load_from`` checkpoint lacks
            tensors of the model that no source of this hook loads; by default
            MMEngine keeps their initial values and warns. Defaults to False.
        broadcast (bool | str): In a distributed run, rank 0 reads each source
            file and broadcasts its tensors to the other ranks, which never open
            it (``'auto'``: whenever the process group has more than one
            process; ``False``: every rank reads). See
            :func:`~mmfusionload.load_sources`.
        verify (bool | str): Default ``verify`` of the sources that do not set
            it: ``'auto'`` checks by function every sparse conv a
            function-changing repair touched, ``True`` every sparse conv
            loaded, ``False`` none. See :mod:`mmfusionload.sparse.verify`.

    The model's class names (for sources whose checkpoint has other classes, see
    :mod:`mmfusionload.load.classes`) are the ``metainfo['classes']`` of the run's
    dataset. A source with ``freeze=True`` keeps what it loaded from training (see
    :mod:`mmfusionload.load.freeze`); under DDP the wrapper needs
    ``find_unused_parameters=True``.

    Example:
        >>> custom_imports = dict(imports=['mmfusionload'])
        >>> custom_hooks = [dict(type='FusionLoadHook', sources=[
        ...     dict(modality='lidar', checkpoint='work_dirs/lidar/epoch_20.pth'),
        ...     dict(modality='camera', checkpoint='swint-nuimages.pth')])]
    """
    priority = 'ABOVE_NORMAL'  # before EMAHook copies the load_from weights

    def __init__(self,
                 sources: Sequence[Union[dict, SourceSpec]] = (),
                 load_on_resume: bool = False,
                 repair_load_from: bool = True,
                 load_from_spconv_layout: str = 'auto',
                 load_from_weights: str = 'auto',
                 allow_overlap: bool = False,
                 trust_checkpoint: bool = False,
                 report_file: Optional[str] = 'fusionload_report.json',
                 html_report: Optional[str] = 'fusionload_report.html',
                 broadcast: Union[bool, str] = 'auto',
                 load_from_strict: bool = False,
                 verify: Union[bool, str] = 'auto'):
        bad_layout = check_layout_option(load_from_spconv_layout, 'load_from_spconv_layout')
        if bad_layout:
            raise FusionLoadError([bad_layout], 'bad option')
        if broadcast not in (True, False, 'auto'):
            raise FusionLoadError([f"broadcast must be 'auto', True or False, got {broadcast!r}"],
                                  'bad option')
        if load_from_weights not in ('auto', 'ema', 'raw'):
            raise FusionLoadError([f"load_from_weights must be 'auto', 'ema' or 'raw', "
                                   f'got {load_from_weights!r}'], 'bad option')
        self.load_from_weights = load_from_weights
        if verify not in (True, False, 'auto'):
            raise FusionLoadError([f"verify must be 'auto', True or False, got {verify!r}"],
                                  'bad option')
        self.sources: List[SourceSpec] = [
            parse_source(dict(s, verify=s.get('verify', verify)) if isinstance(s, dict) else s)
            for s in source_list(sources)]
        self.verify = verify
        self.load_on_resume = load_on_resume
        self.repair_load_from = repair_load_from
        self.load_from_spconv_layout = load_from_spconv_layout
        self.allow_overlap = allow_overlap
        self.report_file = report_file
        self.html_report = html_report
        self.broadcast = broadcast
        self.load_from_strict = load_from_strict
        self.report: Optional[LoadReport] = None
        self._load_from_report = None
        self._resumed = False
        self._done = False
        install_checkpoint_loader(trust_checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Repair the ``load_from`` checkpoint before MMEngine applies it."""
        if runner._resume:
            self._resumed = True
            if not self.load_on_resume:
                return
        if not self.repair_load_from:
            return
        model = unwrap_model(runner.model)
        self._load_from_report = repair_checkpoint(
            checkpoint, model, filename=str(runner._load_from or 'load_from'),
            fill_targets=fill_targets_of(model, self.sources),
            spconv_layout=self.load_from_spconv_layout,
            weights='auto' if runner._resume else self.load_from_weights,
            verify=self.verify)
        missing = self._load_from_report.missing
        if self.load_from_strict and missing:
            raise FusionLoadError(
                [f'{self._load_from_report.checkpoint}: {len(missing)} model tensor(s) get '
                 f'nothing from it: {"; ".join(compress_keys(missing)[:12])}'],
                'load_from lacks tensors of the model (they would keep their initial '
                'values); load_from_strict=False to run anyway')

    def before_train(self, runner) -> None:
        self._load(runner, 'train')

    def before_val(self, runner) -> None:
        self._load(runner, 'val')

    def before_test(self, runner) -> None:
        self._load(runner, 'test')

    def _load(self, runner, stage: str = 'train') -> None:
        if self._done:
            return
        self._done = True
        if self._resumed and not self.load_on_resume:
            print_log('FusionLoadHook: run resumed from a checkpoint; its weights win, '
                      'sources not loaded (load_on_resume=True to load them)',
                      logger='current')
            return
        # without sources the report holds only load_from, which MMEngine applied
        report = LoadReport(title='FusionLoadHook', applied=self._load_from_report is not None)
        if self.sources:
            ema = [h.ema_model.module for h in runner.hooks
                   if isinstance(h, EMAHook) and hasattr(h, 'ema_model')]
            check_freeze_wrapper(runner.model, self.sources)
            try:
                report = load_sources(runner.model, self.sources,
                                      allow_overlap=self.allow_overlap,
                                      extra_models=ema, logger=None,
                                      title='FusionLoadHook', broadcast=self.broadcast,
                                      classes=dataset_classes(runner, stage))
            except FusionLoadError as e:
                if e.report is not None:
                    self._write(runner, e.report)
                raise
            if ema:
                print_log("FusionLoadHook: EMAHook's averaged model received the same "
                          'tensors as the model (the copy named per source below)',
                          logger='current')
        if self._load_from_report is not None:
            report.sources.insert(0, self._load_from_report)
        self.report = report
        print_log('\n' + report.format(), logger='current')
        self._write(runner, report)

    def _write(self, runner, report: LoadReport) -> None:
        """Write the JSON report and the page into the run's ``work_dir`` (rank 0)."""
        if not (is_main_process() and runner.work_dir):
            return
        if not report.model:
            report.describe_model(unwrap_model(runner.model))
        if self.report_file:
            report.to_json(osp.join(runner.work_dir, self.report_file))
        if self.html_report:
            report.to_html(osp.join(runner.work_dir, self.html_report))


def dataset_classes(runner, stage: str = 'train') -> Optional[List[str]]:
    """The class names of the run's dataset for ``stage`` (its ``metainfo['classes']``), or
    None when the run has no such dataset or it names no classes."""
    try:
        loader = getattr(runner, f'{stage}_dataloader')
        meta = getattr(getattr(loader, 'dataset', None), 'metainfo', None) or {}
    except Exception:  # no loop of this stage in the run
        return None
    names = meta.get('classes') if isinstance(meta, dict) else None
    if isinstance(names, (list, tuple)) and all(isinstance(c, str) for c in names):
        return list(names)
    return None


def check_freeze_wrapper(model, sources: Sequence[SourceSpec]) -> None:
    """Stop before loading when a source freezes parameters under a DDP wrapper that was
    built without ``find_unused_parameters=True``: DDP would wait for their gradients.

    Raises:
        FusionLoadError: The wrapper and the frozen sources, with the fix.
    """
    frozen = [s.label for s in sources if s.freeze]
    if not frozen or not is_model_wrapper(model):
        return
    if getattr(model, 'find_unused_parameters', True) is False:
        raise FusionLoadError(
            [f'sources {frozen} set freeze=True, but the model is wrapped by '
             f'{type(model).__name__} without find_unused_parameters: it would wait for '
             'the gradients of the frozen parameters; set model_wrapper_cfg=dict('
             "type='MMDistributedDataParallel', find_unused_parameters=True) in the config"],
            'freeze needs find_unused_parameters=True')


def is_fusion_load_hook(cfg: dict) -> bool:
    """Whether a ``custom_hooks`` entry builds a :class:`FusionLoadHook`.

    ``type`` may be the class, ``'FusionLoadHook'`` or a scoped name such as
    ``'mmengine.FusionLoadHook'``.
    """
    kind = cfg.get('type') if isinstance(cfg, dict) else type(cfg)
    name = kind if isinstance(kind, str) else getattr(kind, '__name__', '')
    return name.split('.')[-1] == FusionLoadHook.__name__
