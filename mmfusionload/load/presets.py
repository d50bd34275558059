"""Key-mapping presets: named rename rules for checkpoints in foreign formats, both ways."""
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import FusionLoadError
from ..registry import KEY_PRESETS

Rule = Tuple[str, str]


class KeyPreset:
    """Rename rules for one checkpoint format.

    Args:
        rules (Sequence[tuple[str, str]]): ``(regex, replacement)`` pairs
            applied in order with :func:`re.sub`. A replacement of ``None``
            drops matching keys.
        new_keys (Sequence[str]): Regexes of model keys the format does not
            have (e.g. the extra output norms MMDetection's Swin adds); such
            keys keep their weights and are not reported missing.
        spconv_layout (str, optional): Layout of the format's sparse-conv
            kernels (``'spconv2'`` or ``'mmcv'``) when the source says
            ``'auto'``.
        convert (Callable, optional): Whole-dict conversion run before the
            rules, for formats that need more than renames (returns a dict).
        orders (Callable, optional): The spatial axis order the format's
            tensors were trained in, read from the file: called with the
            file's key -> shape, returns converted key prefix -> ``(order,
            evidence)`` (``'zyx'`` or ``'xyz'``; for 2-D BEV layers, the
            order of the encoder whose BEV map they read).
        reverse_rules (Sequence[tuple[str, str]]): The reverse of ``rules``
            (MMDetection3D names -> the format's), applied in order like
            ``rules``; with any given, a key no reverse rule matches has no
            place in the format and is left out of an export.
        reverse (Callable, optional): The reverse of ``convert``, run after
            ``reverse_rules``: MMDetection3D tensors -> ``(the format's tensors,
            keys it has no place for)``.
        container (tuple[str, dict], optional): Where the format keeps its
            tensors and what else its files hold at the top level
            (``('model_state', {'version': ...})``); default ``state_dict``.
        order (str, optional): The spatial axis order (``'zyx'``/``'xyz'``) of
            the format's sparse encoder, written by an export.
        export_layout (str, optional): The sparse-kernel layout an export writes
            (default: ``spconv_layout``, else ``'spconv2'``).
    """

    def __init__(self,
                 rules: Sequence[Tuple[str, Optional[str]]] = (),
                 new_keys: Sequence[str] = (),
                 spconv_layout: Optional[str] = None,
                 convert: Optional[Callable[[Dict[str, torch.Tensor]],
                                            Dict[str, torch.Tensor]]] = None,
                 orders: Optional[Callable[[Dict[str, Tuple[int, ...]]],
                                           Dict[str, Tuple[str, str]]]] = None,
                 reverse_rules: Sequence[Tuple[str, Optional[str]]] = (),
                 reverse: Optional[Callable[[Dict[str, torch.Tensor]],
                                            Tuple[Dict[str, torch.Tensor], List[str]]]] = None,
                 container: Optional[Tuple[str, Dict[str, Any]]] = None,
                 order: Optional[str] = None,
                 export_layout: Optional[str] = None):
        self.rules = [(re.compile(p), r) for p, r in rules]
        self.new_keys = [re.compile(p) for p in new_keys]
        self.spconv_layout = spconv_layout
        self.convert = convert
        self.orders = orders
        self.reverse_rules = [(re.compile(p), r) for p, r in reverse_rules]
        self.reverse = reverse
        self.container = container
        self.order = order
        self.export_layout = export_layout

    @property
    def exports(self) -> bool:
        """Whether the preset states its reverse (an export to the format exists)."""
        return bool(self.reverse_rules) or self.reverse is not None

    def export_name(self, key: str) -> Optional[str]:
        """The format's name of the MMDetection3D ``key`` (None: no place for it)."""
        matched = False
        for pattern, repl in self.reverse_rules:
            if pattern.search(key):
                if repl is None:
                    return None
                key, matched = pattern.sub(repl, key), True
        return key if matched or not self.reverse_rules else None

    def export_state(self, state: Mapping[str, torch.Tensor]
                     ) -> Tuple['OrderedDict[str, torch.Tensor]', List[str]]:
        """MMDetection3D tensors under the format's names: ``reverse_rules``, then
        ``reverse``. Returns ``(tensors, keys left out)``."""
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        left: List[str] = []
        for k, v in state.items():
            new = self.export_name(k)
            if new is None:
                left.append(k)
                continue
            if new in out:
                raise FusionLoadError([f'{k!r} and another key both become {new!r} in the '
                                       'export'], 'key collision')
            out[new] = v
        if self.reverse is not None:
            out, more = self.reverse(out)
            left += list(more)
        return OrderedDict(out), left

    def rename(self, key: str) -> Optional[str]:
        """The new name of ``key``, or None to drop it."""
        for pattern, repl in self.rules:
            if pattern.search(key):
                if repl is None:
                    return None
                key = pattern.sub(repl, key)
        return key

    def is_new(self, model_key: str) -> bool:
        """Whether the format lacks ``model_key`` by design."""
        return any(p.search(model_key) for p in self.new_keys)


def register_preset(name: str, preset: KeyPreset, force: bool = False) -> KeyPreset:
    """Register ``preset`` under ``name`` for ``preset=`` in sources.

    ``KEY_PRESETS`` holds factories, so a preset may also be registered as a
    function returning a :class:`KeyPreset`.
    """

    def factory() -> KeyPreset:
        return preset

    factory.__name__ = f'preset_{name.replace("-", "_")}'
    KEY_PRESETS.register_module(name=name, module=factory, force=force)
    return preset


def get_preset(name: str) -> KeyPreset:
    """The registered preset ``name``."""
    factory = KEY_PRESETS.get(name)
    if factory is None:
        raise FusionLoadError(
            [f'unknown preset {name!r}; registered: '
             f'{", ".join(sorted(KEY_PRESETS.module_dict)) or "none"}'], 'bad source')
    return factory()


# The foreign-format presets ('mit-bevfusion', 'swin-original',
# 'cream-efficientvit') live in ``mmfusionload.formats``.


def rename_keys(keys: Sequence[str],
                rules: Sequence[Rule] = (),
                preset: Optional[KeyPreset] = None,
                filename: str = '') -> Dict[str, str]:
    """Map checkpoint keys to new names, refusing collisions.

    Args:
        keys (Sequence[str]): Checkpoint keys.
        rules (Sequence[tuple[str, str]]): User ``(regex, replacement)`` pairs,
            applied after the preset.
        preset (KeyPreset, optional): A registered preset.
        filename (str): For messages.

    Returns:
        dict[str, str]: New key -> checkpoint key (dropped keys left out).
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    if preset is None and not compiled and len(set(keys)) == len(keys):
        return {key: key for key in keys}  # each key keeps its (unique) name
    out: Dict[str, str] = {}
    problems = []
    for key in keys:
        new: Optional[str] = preset.rename(key) if preset else key
        if new is None:
            continue
        for pattern, repl in compiled:
            new = pattern.sub(repl, new)
        if new in out:
            problems.append(f'{filename}: {out[new]!r} and {key!r} both become '
                            f'{new!r} after renaming')
            continue
        out[new] = key
    if problems:
        raise FusionLoadError(problems, 'key collision after renaming')
    return out
