"""spconv's QAT fused conv-BN modules in a checkpoint, as a conv followed by its BatchNorm.

Facts read from spconv 2.3.8, ``spconv/pytorch/quantization/intrinsic/qat/modules.py``:
``_SparseConvBn`` (``SparseConvBn``, ``SparseConvBnReLU``, ``SparseConvBnAddReLU``) is one
module with ``_version = 2`` holding ``weight`` (the conv's, in the conv's own layout),
``bias`` (when the float conv had one), ``bn.{weight, bias, running_mean, running_var,
num_batches_tracked}`` (a ``BatchNorm1d``) and ``weight_fake_quant.*`` (the FakeQuantize
state). In eval mode it computes ``bn(conv(x, W) + bias)`` (``fused_mean = running_mean -
bias``), with ``W`` fake-quantised; ``to_float`` gives the float function.

A QAT model is the float model with each ``SparseSequential(conv, BN, ReLU)`` fused into its
first item, so the BatchNorm a fused module stands for is the next item of its sequence
(``A.3`` -> ``A.4``), or ``bnN`` beside ``convN`` (MMDetection3D's ``SparseBasicBlock``).
The file is read as that float model: ``A.3.bn.*`` -> ``A.4.*``, the conv bias folded into
``running_mean`` (``BN(Wx + b)`` with mean ``m`` is ``BN(Wx)`` with mean ``m - b``, and the
bias cancels against the batch mean in training), the FakeQuantize state left out.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import FusionLoadError

QAT_VERSION = 2  # _SparseConvBn._version
BN = 'bn.'
BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
FAKE_QUANT = 'weight_fake_quant.'
BN_VERSION = 2  # torch.nn.BatchNorm1d._version (torch 2.x)


def fused_conv_bn(keys, metadata: Mapping[str, dict]) -> List[str]:
    """Module names of spconv QAT fused conv-BN modules: ``_metadata`` version 2 with a
    ``weight`` of 3 or more dims and ``bn.running_mean``."""
    keyset = set(keys)
    out = []
    for mod, info in metadata.items():
        if not mod or (info or {}).get('version') != QAT_VERSION:
            continue
        if f'{mod}.weight' in keyset and f'{mod}.{BN}running_mean' in keyset:
            out.append(mod)
    return out


def bn_place(module: str) -> Optional[str]:
    """Where the BatchNorm of the fused module ``module`` sits in the float model:
    the next item of its sequence, or ``bnN`` beside ``convN``; None when neither."""
    parent, _, last = module.rpartition('.')
    head = parent + '.' if parent else ''
    if last.isdigit():
        return f'{head}{int(last) + 1}'
    m = re.fullmatch(r'conv(\d*)', last)
    if m:
        return f'{head}bn{m.group(1)}'
    return None


def describe(keys, metadata: Mapping[str, dict]) -> List[str]:
    """What ``identify`` says of the fused modules of a file (nothing without any)."""
    mods = fused_conv_bn(keys, metadata)
    if not mods:
        return []
    placed = [(m, bn_place(m)) for m in mods]
    ok = [f'{m} -> {m} + {p}' for m, p in placed if p]
    bad = [m for m, p in placed if not p]
    text = (f'{len(mods)} spconv QAT fused conv-BN module(s) (_metadata version 2 with bn.*): '
            'read as a conv followed by its BatchNorm, the conv bias folded into '
            'running_mean, the FakeQuantize state left out')
    if ok:
        text += f' ({"; ".join(ok[:3])}{"; ..." if len(ok) > 3 else ""})'
    lines = [text]
    if bad:
        lines.append(f'refused: {", ".join(bad[:5])}: a fused module not named as a sequence '
                     'item or convN, so its BatchNorm has no known place')
    return lines


def unfuse(state: Mapping[str, torch.Tensor], metadata: Dict[str, dict],
           filename: str = '') -> Tuple['OrderedDict[str, torch.Tensor]', Dict[str, dict],
                                        List[str]]:
    """Rewrite the fused conv-BN modules of ``state`` as a conv and its BatchNorm.

    Returns:
        tuple: ``(state, metadata, fused module names)``; ``state`` is returned as it is
        when it holds none.

    Raises:
        FusionLoadError: A fused module whose BatchNorm has no known place, or whose
            place the file already uses (the message names the module).
    """
    mods = fused_conv_bn(list(state), metadata)
    if not mods:
        return state, metadata, []  # type: ignore[return-value]
    problems = []
    places: Dict[str, str] = {}
    for m in mods:
        place = bn_place(m)
        if place is None:
            problems.append(f'{filename}: {m} is a spconv QAT fused conv-BN module '
                            f'(_metadata version 2, {m}.bn.*): its BatchNorm has no place in '
                            'a float model (the module is neither a sequence item nor convN); '
                            'rename it with rename= after converting, or save the float model')
            continue
        taken = [k for k in state if k.startswith(place + '.')]
        if taken:
            problems.append(f'{filename}: {m} is a spconv QAT fused conv-BN module, but the '
                            f'place of its BatchNorm, {place}, already holds {taken[0]}')
            continue
        places[m] = place
    if problems:
        raise FusionLoadError(problems, 'fused conv-BN module')
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    new_meta = OrderedDict(metadata)
    for k, v in state.items():
        mod = next((m for m in places if k.startswith(m + '.')), None)
        if mod is None:
            out[k] = v
            continue
        rest = k[len(mod) + 1:]
        if rest.startswith(FAKE_QUANT) or rest == 'bias':
            continue
        if rest.startswith(BN):
            name = rest[len(BN):]
            out[f'{places[mod]}.{name}'] = v
            continue
        out[k] = v
    for mod, place in places.items():
        bias = state.get(mod + '.bias')
        mean_key = f'{place}.running_mean'
        if bias is not None:
            mean = out[mean_key]
            if tuple(mean.shape) != tuple(bias.shape):
                raise FusionLoadError(
                    [f'{filename}: {mod}.bias {list(bias.shape)} does not fit '
                     f'{mod}.bn.running_mean {list(mean.shape)}'], 'fused conv-BN module')
            out[mean_key] = mean - bias.to(mean.dtype)
        for k in [k for k in new_meta if k == mod + '.bn' or k.startswith(mod + '.' + FAKE_QUANT)
                  or k == mod + '.' + FAKE_QUANT[:-1]]:
            del new_meta[k]
        new_meta[place] = {'version': BN_VERSION}
    return out, dict(new_meta), mods
