"""Derived tensors: rebuilt by the model from its config, never loaded."""
import re
from typing import List

from ..registry import REPAIRS
from .base import Entry, Repair

# Always rebuilt by the model (index tables).
DERIVED_ALWAYS: List[str] = [
    r'(^|\.)attention_bias_idxs$',
    r'(^|\.)relative_position_index$',
]
# Rebuilt from image size / depth bins: skipped when the live value differs.
DERIVED_IF_DIFFERENT: List[str] = [
    r'(^|\.)view_transform\.(frustum|dx|bx|nx)$',
]


def register_derived(pattern: str, always: bool = True) -> None:
    """Declare model keys matching ``pattern`` as derived (regenerated, not loaded).

    Args:
        pattern (str): Regex searched in the model key.
        always (bool): Skip always (True) or only when the checkpoint's value
            differs from the live one (False).
    """
    (DERIVED_ALWAYS if always else DERIVED_IF_DIFFERENT).append(pattern)


def is_derived(key: str) -> bool:
    """Whether the model key names a derived tensor (never reported missing)."""
    return any(re.search(p, key) for p in DERIVED_ALWAYS + DERIVED_IF_DIFFERENT)


def may_be_absent(key: str) -> bool:
    """Whether a checkpoint may lack the model key: derived tensors and BN's counter."""
    return is_derived(key) or bool(re.search(r'(^|\.)num_batches_tracked$', key))


@REPAIRS.register_module()
class SkipDerived(Repair):
    """Leave derived index tables and frustum-like tensors to the model."""
    name = 'regenerated'
    priority = 0

    def __call__(self, entry: Entry) -> None:
        if any(re.search(p, entry.key) for p in DERIVED_ALWAYS):
            entry.skip = 'derived index table, rebuilt by the model'
        elif any(re.search(p, entry.key) for p in DERIVED_IF_DIFFERENT):
            same = (tuple(entry.source.shape) == tuple(entry.target.shape)
                    and bool((entry.source.to(entry.target.device)
                              == entry.target).all()))
            if not same:
                entry.skip = 'derived from image size / depth bins, differs'
