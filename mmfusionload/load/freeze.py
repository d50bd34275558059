"""Freezing per source: what a source loaded does not train.

``freeze=True`` on a source: every parameter it loaded gets ``requires_grad=False``
(MMEngine's optimizer wrappers skip parameters without gradients; under DDP the
wrapper must be built with ``find_unused_parameters=True``), and every normalisation
layer with running statistics (``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*``
with ``track_running_stats``) whose tensors it loaded wholly stays in eval mode: a
forward pre-hook puts it back in eval mode before each forward, so no ``model.train()``
of the run (MMEngine's loops call it every epoch) lets its statistics move. The hook
is part of the module, so a deep copy (``EMAHook``'s averaged model) keeps it.
"""
from typing import Iterable, List, Tuple

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

#: The attribute marking a module kept in eval mode.
FROZEN_FLAG = '_fusionload_eval'


def _stay_in_eval(module: nn.Module, args) -> None:
    """Forward pre-hook: the module computes in eval mode (running statistics fixed)."""
    module.training = False


def keep_in_eval(module: nn.Module) -> None:
    """Put ``module`` in eval mode now and before each of its forwards (idempotent)."""
    module.eval()
    if not getattr(module, FROZEN_FLAG, False):
        module.register_forward_pre_hook(_stay_in_eval)
        setattr(module, FROZEN_FLAG, True)


def is_kept_in_eval(module: nn.Module) -> bool:
    """Whether :func:`keep_in_eval` was applied to ``module``."""
    return bool(getattr(module, FROZEN_FLAG, False))


def frozen_parts(model: nn.Module, keys: Iterable[str]) -> Tuple[List[str], List[str]]:
    """The parameters among ``keys`` and the norm layers whose tensors ``keys`` hold wholly.

    Args:
        model (nn.Module): The unwrapped model.
        keys (Iterable[str]): Model keys a source loads.

    Returns:
        tuple: Parameter names, norm-layer names.
    """
    keys = set(keys)
    params = [n for n, _ in model.named_parameters() if n in keys]
    norms = []
    for name, m in model.named_modules():
        if not isinstance(m, _NormBase) or not m.track_running_stats:
            continue
        own = [f'{name}.{n}' if name else n
               for n, _ in list(m.named_parameters(recurse=False))
               + list(m.named_buffers(recurse=False)) if n != 'num_batches_tracked']
        if own and all(k in keys for k in own):
            norms.append(name)
    return params, norms


def freeze(model: nn.Module, keys: Iterable[str]) -> List[str]:
    """Freeze what ``keys`` name in ``model``: ``requires_grad=False`` on its parameters,
    norm layers wholly among them kept in eval mode.

    Returns:
        list[str]: The modules holding frozen parameters or kept in eval mode.
    """
    params, norms = frozen_parts(model, keys)
    chosen = set(params)
    for name, p in model.named_parameters():
        if name in chosen:
            p.requires_grad_(False)
    for name in norms:
        keep_in_eval(model.get_submodule(name))
    return frozen_modules(params, norms)


def frozen_modules(params: List[str], norms: List[str]) -> List[str]:
    """The module names :func:`freeze` reports for these parts."""
    return sorted({p.rpartition('.')[0] for p in params} | set(norms))
