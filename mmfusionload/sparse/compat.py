"""Compatibility helpers for running the sparse-convolution stack on CPU.

spconv 2.x runs its forward pass on CPU, but its native-algorithm backward
(``spconv.pytorch.ops.indice_conv_backward``) calls
``get_current_stream()`` unconditionally, and that function is
``torch.cuda.current_stream().cuda_stream``: on a CPU-only torch it raises
``AssertionError: Torch not compiled with CUDA enabled``. The stream is only
used by the CUDA kernels, so on a machine without CUDA it is safe to answer
with the null stream ``0`` (the value spconv itself uses on its CPU paths).

:func:`patch_spconv_cpu_stream` does that replacement. spconv defines
``get_current_stream`` in ``spconv.pytorch.cppcore`` and several of its
modules bind it by name with ``from spconv.pytorch.cppcore import
get_current_stream`` (``ops``, ``hash``, ``utils`` and the quantization
modules), and look that *module-level* name up at call time. Patching only
``cppcore`` would therefore not reach ``ops.indice_conv_backward``: the patch
rebinds the name in every loaded ``spconv`` module that holds the original
function, and in ``cppcore`` so that modules imported later pick up the
replacement too.
"""
import functools
import importlib
import sys
from typing import Callable

import torch

#: Attribute set on the replacement function so a patch is recognised.
_PATCH_FLAG = '_mmfusionload_cpu_stream'


def spconv_available() -> bool:
    """Whether spconv 2.x (``spconv.pytorch``) can be imported.

    Returns:
        bool: True when ``import spconv.pytorch`` succeeds.
    """
    try:
        importlib.import_module('spconv.pytorch')
    except ImportError:
        return False
    return True


def _is_patched(func: Callable) -> bool:
    return getattr(func, _PATCH_FLAG, False)


def _make_cpu_stream(original: Callable[[], int]) -> Callable[[], int]:

    @functools.wraps(original)
    def get_current_stream() -> int:
        """Null CUDA stream: CUDA is absent, so only CPU kernels run."""
        return 0

    setattr(get_current_stream, _PATCH_FLAG, True)
    return get_current_stream


def patch_spconv_cpu_stream() -> bool:
    """Let spconv 2.x run backward passes on a machine without CUDA.

    Replaces ``get_current_stream`` (which asks
    ``torch.cuda.current_stream()``) with a function returning ``0`` in
    ``spconv.pytorch.cppcore`` and in every loaded ``spconv`` module that
    imported it by name (``spconv.pytorch.ops``, ``spconv.pytorch.hash``,
    ``spconv.pytorch.utils``, ...). The original stays reachable as the
    replacement's ``__wrapped__`` attribute.

    It does nothing when CUDA is available (spconv's own function is right
    there) or when spconv is not installed. Calling it again is harmless:
    the patch is applied once, and modules of spconv imported after the
    first call are patched on the next call (modules importing
    ``get_current_stream`` from ``cppcore`` after the patch get the
    replacement anyway).

    Examples:
        >>> from mmfusionload.sparse.compat import patch_spconv_cpu_stream
        >>> patch_spconv_cpu_stream()  # on a CPU-only machine with spconv
        True

    Returns:
        bool: True when spconv's stream look-up is patched after the call
        (by this call or an earlier one); False when CUDA is available or
        spconv is not installed, in which case nothing was changed.
    """
    if torch.cuda.is_available():
        return False
    try:
        cppcore = importlib.import_module('spconv.pytorch.cppcore')
        # importing the package loads ops, conv and the modules that bind
        # get_current_stream by name, so they are patched below.
        importlib.import_module('spconv.pytorch')
    except ImportError:
        return False

    current = cppcore.get_current_stream
    if _is_patched(current):
        original = current.__wrapped__
        replacement = current
    else:
        original = current
        replacement = _make_cpu_stream(original)

    for name, module in list(sys.modules.items()):
        if module is None or not (name == 'spconv'
                                  or name.startswith('spconv.')):
            continue
        if getattr(module, 'get_current_stream', None) is original:
            setattr(module, 'get_current_stream', replacement)
    return True
