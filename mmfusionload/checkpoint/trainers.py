"""What a checkpoint's containers mean, per trainer family, and which copy to take.

Each family below is recognised by the top-level entries its trainer writes. The facts
that decide which copy is averaged (EMA) and which one the family's own loader deploys
were read from the libraries named next to them:

- MMEngine 0.10.7, ``mmengine/hooks/ema_hook.py``: ``EMAHook.before_save_checkpoint``
  stores ``ema_model.state_dict()`` as ``ema_state_dict`` (keys ``module.<key>`` plus the
  ``steps`` counter) and then swaps the values of every ``module.<key>`` with
  ``state_dict[<key>]``. A Runner checkpoint written with ``EMAHook`` therefore holds the
  **averaged** weights in ``state_dict`` and the **raw** (trained) ones in
  ``ema_state_dict``. ``after_load_checkpoint`` swaps them back only on resume; with
  ``load_from`` the model and the EMA model both get ``state_dict``.
- MMCV 1.x ``mmcv/runner/hooks/ema.py``: the averaged weights live in the model as
  buffers ``ema_<key with '.' -> '_'>``; ``after_train_epoch`` swaps them with the
  parameters, so which copy the regular keys hold at save time depends on the hook
  running before or after ``CheckpointHook`` (MMDetection 2.x configs set
  ``priority=49``). The file does not say which: only ``auto`` (the regular keys, what
  ``load_checkpoint`` deploys) is taken.
- timm (``timm/models/_helpers.py``, 0.9/1.0): ``CheckpointSaver`` writes
  ``state_dict`` (raw) and ``state_dict_ema``; ``load_checkpoint(use_ema=True)``, the
  default, deploys ``state_dict_ema`` when present.
- detectron2 (fvcore ``Checkpointer.save``; DD3D): ``model`` (the only copy), with
  ``optimizer``, ``scheduler`` and ``iteration`` when written during training.
- DeiT / Cream (``main.py``): ``model`` (raw) and ``model_ema`` (timm ``ModelEma``'s
  module); evaluation and fine-tuning load ``model``.
- OpenPCDet (``pcdet/utils/common_utils`` / ``tools/train_utils``): ``model_state``,
  ``optimizer_state``, ``epoch``, ``it``, ``version='pcdet+<version>'``; no EMA.
- PyTorch Lightning: ``state_dict`` under the LightningModule's attribute names and
  ``pytorch-lightning_version``; no EMA copy by default.
- BEVDet family (BEVDet, BEVDepth ports; ``mmdet3d/core/hook/ema.py``,
  ``MEGVIIEMAHook``): next to the regular checkpoint it writes ``epoch_<n>_ema.pth``
  (``{'epoch', 'state_dict', 'updates'}``) or ``iter_<n>_ema.pth`` (``'iter'`` instead of
  ``'epoch'``), whose ``state_dict`` is ``ModelEMA.ema.state_dict()``: the averaged
  model alone, under the model's own keys. The raw weights are in the other file.
"""
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

import torch

from ..errors import FusionLoadError, describe
from ..files.lazy import is_lazy

WEIGHTS = ('auto', 'ema', 'raw')
EMA, RAW, ONLY = 'ema', 'raw', 'weights'
ROLE = {EMA: 'EMA weights', RAW: 'raw weights', ONLY: 'weights'}
MMCV1_EMA_PREFIX = 'ema_'
# detectron2 (fvcore ``Checkpointer.save``): ``model`` plus the checkpointables and
# ``iteration``; its FPN detectors keep the feature extractor under this prefix.
DETECTRON2_BOTTOM_UP = 'backbone.bottom_up.'
# BEVDet's MEGVIIEMAHook.save_checkpoint / save_checkpoint_iter write exactly these entries.
BEVDET_EMA_ENTRIES = (frozenset({'epoch', 'state_dict', 'updates'}),
                      frozenset({'iter', 'state_dict', 'updates'}))


def version_text(value: Any) -> str:
    """A version a file stores, as text: a string (its first 64 characters) or a
    number; anything else gives ``''`` (no ``str()`` of an object the file built)."""
    if type(value) is str:
        return value[:64]
    if type(value) in (int, float):
        return describe(value)
    return ''


def is_state_dict(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty mapping of mostly tensors."""
    if is_lazy(obj):
        return len(obj) > 0
    return (isinstance(obj, Mapping) and len(obj) > 0
            and sum(torch.is_tensor(v) for v in obj.values()) >= max(1, len(obj) // 2))


@dataclass
class Copy:
    """One copy of the weights in a checkpoint.

    Args:
        key (str): Where it is (``'state_dict'``, ``'ema_state_dict'``...).
        kind (str): ``'ema'``, ``'raw'`` or ``'weights'`` (the file has no EMA copy).
        why (str): The fact that says so (``'MMEngine EMAHook'``).
        state (Mapping): Its tensors, keyed as the model keys them.
    """
    key: str
    kind: str
    why: str
    state: Mapping = field(repr=False, default_factory=dict)

    def describe(self) -> str:
        return f'{self.key}: {ROLE[self.kind]}, {self.why}'


@dataclass
class Family:
    """A checkpoint's trainer family and its copies.

    Args:
        name (str): The family (``'MMEngine Runner + EMAHook'``...).
        copies (list[Copy]): Every copy of the weights, in file order.
        auto (str): Key of the copy the family's own loader deploys.
        auto_why (str): Why that one.
        fixed (str): When set, only ``auto`` can be taken, for this reason.
        version (str): The trainer's version when the file records it.
    """
    name: str
    copies: List[Copy]
    auto: str
    auto_why: str
    fixed: str = ''
    version: str = ''

    def copy(self, key: str) -> Copy:
        return next(c for c in self.copies if c.key == key)

    @property
    def has_ema(self) -> bool:
        return any(c.kind == EMA for c in self.copies)


@dataclass
class Choice:
    """The copy taken from a checkpoint and why.

    Args:
        family (str): The trainer family.
        key (str): The container taken.
        kind (str): ``'ema'``, ``'raw'`` or ``'weights'``.
        why (str): Which copy and why, for the report.
        state (Mapping): Its tensors.
    """
    family: str
    key: str
    kind: str
    why: str
    state: Mapping = field(repr=False, default_factory=dict)

    def describe(self) -> str:
        return f'{self.key}: {self.why}'


def _meta(ckpt: Mapping) -> Dict[str, Any]:
    meta = ckpt.get('meta')
    return meta if isinstance(meta, dict) else {}


def _mmengine_raw(ema_state: Mapping) -> 'OrderedDict[str, Any]':
    """``ema_state_dict`` as model keys: ``module.`` removed, ``steps`` left out."""
    out: 'OrderedDict[str, Any]' = OrderedDict(
        (k[len('module.'):] if isinstance(k, str) else k, v)  # unwrap refuses other keys
        for k, v in ema_state.items() if not isinstance(k, str) or k.startswith('module.'))
    metadata = getattr(ema_state, '_metadata', None)
    if metadata:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len('module.'):] if k.startswith('module.') else '', v)
            for k, v in metadata.items()
            if isinstance(k, str) and (k == 'module' or k.startswith('module.')))
    return out


def _mmcv1_ema_keys(state: Mapping) -> List[str]:
    """MMCV 1.x ``EMAHook`` buffers (``ema_<key with '.' -> '_'>``) in ``state``."""
    if is_lazy(state):
        return []
    keys = [k for k in state if isinstance(k, str)]  # other keys are refused by unwrap
    flat = {MMCV1_EMA_PREFIX + k.replace('.', '_') for k in keys
            if not k.startswith(MMCV1_EMA_PREFIX)}
    return [k for k in keys if k.startswith(MMCV1_EMA_PREFIX) and k in flat]


def _without(state: Mapping, keys: List[str]) -> 'OrderedDict[str, Any]':
    drop = set(keys)
    out: 'OrderedDict[str, Any]' = OrderedDict((k, v) for k, v in state.items()
                                               if k not in drop)
    metadata = getattr(state, '_metadata', None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def family_of(ckpt: Any, filename: str = '') -> Family:
    """Recognise a checkpoint's trainer family and its copies of the weights.

    Args:
        ckpt: What the file holds.
        filename (str): For messages.

    Returns:
        Family: The family, its copies and the one its loader deploys.

    Raises:
        FusionLoadError: No state dict in the file (the message names what it holds).
    """
    if not isinstance(ckpt, Mapping):
        raise FusionLoadError(
            [f'{filename}: holds a {type(ckpt).__name__}, not a checkpoint '
             '(expected a dict of tensors or a dict with "state_dict"/"model")'],
            'not a checkpoint')
    meta = _meta(ckpt)
    sd = ckpt.get('state_dict')
    model_state = ckpt.get('model_state')
    version = version_text(ckpt.get('version', ''))

    if is_state_dict(model_state):
        name = 'OpenPCDet' if version.startswith('pcdet') else 'model_state (OpenPCDet-style)'
        return Family(name, [Copy('model_state', ONLY, name, model_state)], 'model_state',
                      'the only copy', version=version)
    if is_state_dict(sd) and 'pytorch-lightning_version' in ckpt:
        v = version_text(ckpt['pytorch-lightning_version'])
        return Family('PyTorch Lightning', [Copy('state_dict', ONLY, 'PyTorch Lightning', sd)],
                      'state_dict', 'the only copy', version=v)
    if is_state_dict(sd) and is_state_dict(ckpt.get('ema_state_dict')):
        raw = _mmengine_raw(ckpt['ema_state_dict'])
        v = version_text(meta.get('mmengine_version') or meta.get('mmengine') or '')
        return Family('MMEngine Runner + EMAHook', [
            Copy('state_dict', EMA, 'MMEngine EMAHook', sd),
            Copy('ema_state_dict', RAW, 'MMEngine EMAHook swaps the copies at save', raw)],
            'state_dict', 'what load_from deploys', version=v)
    if is_state_dict(sd) and is_state_dict(ckpt.get('state_dict_ema')):
        return Family('timm', [
            Copy('state_dict', RAW, 'timm CheckpointSaver', sd),
            Copy('state_dict_ema', EMA, 'timm ModelEma', ckpt['state_dict_ema'])],
            'state_dict_ema', 'timm load_checkpoint(use_ema=True) deploys it',
            version=version)
    if is_state_dict(sd) and frozenset(map(str, ckpt)) in BEVDET_EMA_ENTRIES:
        return Family('BEVDet MEGVIIEMAHook', [
            Copy('state_dict', EMA, 'BEVDet MEGVIIEMAHook *_ema.pth (the averaged model alone; '
                 'the raw weights are in the regular checkpoint)', sd)],
            'state_dict', 'the only copy, averaged')
    if is_state_dict(sd) and not is_lazy(sd):
        ema_keys = _mmcv1_ema_keys(sd)
        mmcv_v = meta.get('mmcv_version')
        mmengine_v = meta.get('mmengine_version')
        if mmengine_v or 'message_hub' in ckpt:
            name, v = 'MMEngine Runner', version_text(mmengine_v or '')
        elif mmcv_v or any(type(k) is str and k.startswith('mmdet') for k in meta):
            name, v = 'MMCV 1.x Runner', version_text(mmcv_v or '')
        elif 'arch' in ckpt:
            name, v = 'timm', version
        else:
            name, v = 'state_dict container', ''
        if ema_keys:
            return Family(name + ' + MMCV 1.x EMAHook', [
                Copy('state_dict', ONLY, 'regular keys; the ema_* buffers are left out',
                     _without(sd, ema_keys))], 'state_dict', 'what load_checkpoint deploys',
                fixed=(f'MMCV 1.x EMAHook buffers {MMCV1_EMA_PREFIX}* are present, but the '
                       'file does not say whether they were swapped with the parameters '
                       'before saving (it depends on the hook priority)'), version=v)
        return Family(name, [Copy('state_dict', ONLY, name, sd)], 'state_dict',
                      'the only copy', version=v)
    if is_state_dict(sd):
        name = ('safetensors (sharded)' if type(sd).__name__ == 'ShardedSafetensorsState'
                else 'safetensors')
        return Family(name, [Copy('state_dict', ONLY, name, sd)], 'state_dict',
                      'the only copy')
    if (is_state_dict(ckpt.get('model')) and 'model_ema' not in ckpt
            and ('iteration' in ckpt or any(isinstance(k, str) and k.startswith(
                DETECTRON2_BOTTOM_UP) for k in ckpt['model']))):
        return Family('detectron2', [Copy('model', ONLY, 'detectron2 Checkpointer',
                                          ckpt['model'])], 'model', 'the only copy')
    if is_state_dict(ckpt.get('model')):
        copies = [Copy('model', RAW if is_state_dict(ckpt.get('model_ema')) else ONLY,
                       'DeiT/Cream model', ckpt['model'])]
        if is_state_dict(ckpt.get('model_ema')):
            copies.append(Copy('model_ema', EMA, 'DeiT/Cream ModelEma', ckpt['model_ema']))
        return Family('DeiT/Cream', copies, 'model',
                      'their evaluation and fine-tuning load model')
    for key in ('state_dict', 'model'):
        inner = ckpt.get(key)
        if isinstance(inner, Mapping) and is_state_dict(inner.get('state_dict')):
            name = f'{key}.state_dict'
            return Family('nested state_dict', [Copy(name, ONLY, 'nested', inner['state_dict'])],
                          name, 'the only copy')
    if is_state_dict(ckpt):
        return Family('plain state dict', [Copy('<bare>', ONLY, 'plain state dict', ckpt)],
                      '<bare>', 'the only copy')
    found = ', '.join(sorted(k if type(k) is str else describe(k) for k in ckpt.keys())[:12]) \
        or 'nothing'
    raise FusionLoadError(
        [f'{filename}: no state dict found (looked for state_dict, ema_state_dict, '
         f'state_dict_ema, model, model_ema, model_state or a bare dict of tensors; '
         f'the file holds: {found})'], 'not a checkpoint')


def choose_copy(ckpt: Any, filename: str, weights: str = 'auto') -> Choice:
    """Take the copy of the weights ``weights`` asks for.

    Args:
        ckpt: What the file holds.
        filename (str): For messages.
        weights (str): ``'auto'``: what the family's own loader deploys; ``'ema'``:
            the averaged copy (an error when the file has none); ``'raw'``: the
            trained, non-averaged copy (the only copy when no EMA ran).

    Returns:
        Choice: The copy, its family and the reason, e.g.
        ``'state_dict: EMA weights, MMEngine EMAHook (auto: what load_from deploys)'``.
    """
    if weights not in WEIGHTS:
        raise FusionLoadError([f"{filename}: weights must be 'auto', 'ema' or 'raw', "
                               f'got {weights!r}'], 'bad source')
    fam = family_of(ckpt, filename)
    if weights == 'auto':
        c = fam.copy(fam.auto)
        return Choice(fam.name, c.key, c.kind,
                      f'{ROLE[c.kind]}, {c.why} (auto: {fam.auto_why})', c.state)
    if fam.fixed:
        raise FusionLoadError([f"{filename}: weights={weights!r} cannot be honoured: "
                               f"{fam.fixed}; use weights='auto'"], 'ambiguous checkpoint')
    want = [c for c in fam.copies if c.kind == weights]
    if not want and weights == RAW:
        want = [c for c in fam.copies if c.kind == ONLY]
    if not want:
        held = '; '.join(c.describe() for c in fam.copies)
        if weights == EMA:
            raise FusionLoadError([f"{filename}: weights='ema' but this {fam.name} checkpoint "
                                   f'has no EMA copy (it holds {held})'], 'no EMA weights')
        raise FusionLoadError([f"{filename}: weights='raw' but this {fam.name} checkpoint "
                               f'holds only averaged weights ({held}); load the regular '
                               'checkpoint for the raw ones'], 'no raw weights')
    c = want[0]
    return Choice(fam.name, c.key, c.kind, f'{ROLE[c.kind]}, {c.why} (weights={weights!r})',
                  c.state)


def describe_copies(fam: Family) -> List[Tuple[str, str]]:
    """``(container, meaning)`` of every copy, the deployed one marked."""
    return [(c.key, ROLE[c.kind] + (' (auto)' if c.key == fam.auto else ''))
            for c in fam.copies]
