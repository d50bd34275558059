"""Derived tensors: rebuilt by the model from its config, never loaded."""
import re
from typing import Dict, List, Optional, Pattern, Tuple

from ...registry import REPAIRS
from ...sparse.modules import SPCONV_VOXEL_COUNT
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


_ANY_OF: Dict[Tuple[str, ...], Optional[Pattern]] = {}


def _search_any(patterns: List[str], key: str) -> bool:
    """``any(re.search(p, key) for p in patterns)``, with one compiled regex per list.

    Patterns with group references keep their own numbering: they are searched alone.
    """
    spec = tuple(patterns)
    if spec not in _ANY_OF:
        _ANY_OF[spec] = None
        if spec and all('\\' not in p.replace('\\.', '') for p in spec):
            try:
                _ANY_OF[spec] = re.compile('|'.join(f'(?:{p})' for p in spec))
            except re.error:  # e.g. a group name used twice, a flag mid-pattern
                pass
    combined = _ANY_OF[spec]
    if combined is not None:
        return combined.search(key) is not None
    return any(re.search(p, key) for p in spec)


# (always patterns, if-different patterns) -> model key -> which list matched first
# (1 always, 2 if different, 0 neither): a key is searched once per pattern lists
_KIND: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], Dict[str, int]] = {}
_KIND_LIMIT = 1 << 16  # keys remembered per pattern lists


def derived_kind(key: str) -> int:
    """1 when the model key matches ``DERIVED_ALWAYS``, else 2 when it matches
    ``DERIVED_IF_DIFFERENT``, else 0 (the lists as they are now, registrations included)."""
    spec = (tuple(DERIVED_ALWAYS), tuple(DERIVED_IF_DIFFERENT))
    memo = _KIND.get(spec)
    if memo is None:
        if len(_KIND) >= 64:
            _KIND.clear()
        memo = _KIND[spec] = {}
    kind = memo.get(key)
    if kind is None:
        kind = 0
        if _search_any(list(spec[0] + spec[1]), key):  # most keys: one search, no match
            kind = 1 if _search_any(spec[0], key) else 2 if _search_any(spec[1], key) else 0
        if len(memo) >= _KIND_LIMIT:
            memo.clear()
        memo[key] = kind
    return kind


def is_derived(key: str) -> bool:
    """Whether the model key names a derived tensor (never reported missing)."""
    return derived_kind(key) != 0


# Run-time records a module keeps next to its weights: a checkpoint may lack them and
# a model may lack them (spconv's voxel counter, ``record_voxel_count``).
RECORDS: List[str] = [r'(^|\.)' + SPCONV_VOXEL_COUNT + '$']


def is_record(key: str) -> bool:
    """Whether the key names a run-time record (never missing, never unexpected)."""
    return _search_any(RECORDS, key)


def may_be_absent(key: str) -> bool:
    """Whether a checkpoint may lack the model key: derived tensors, BN's counter and
    run-time records."""
    return (is_derived(key) or bool(re.search(r'(^|\.)num_batches_tracked$', key))
            or is_record(key))


@REPAIRS.register_module()
class SkipDerived(Repair):
    """Leave derived index tables and frustum-like tensors to the model."""
    name = 'regenerated'
    priority = 0

    def __call__(self, entry: Entry) -> None:
        kind = derived_kind(entry.key)
        if kind == 1:
            entry.skip = 'derived index table, rebuilt by the model'
        elif kind == 2:
            same = (tuple(entry.source.shape) == tuple(entry.target.shape)
                    and bool((entry.source.to(entry.target.device)
                              == entry.target).all()))
            if not same:
                entry.skip = 'derived from image size / depth bins, differs'
