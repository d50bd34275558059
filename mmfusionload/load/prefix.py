"""Align checkpoint key prefixes with the model's: ``backbone.`` vs ``img_backbone.`` vs none."""
from bisect import bisect_left
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import FusionLoadError

# Prefixes that occur in practice on either side of a mismatch.
COMMON_PREFIXES = ('', 'backbone.', 'img_backbone.', 'module.', 'model.')


def nested_prefixes(keys: Sequence[str]) -> Tuple[str, ...]:
    """Two-segment prefixes ``a.b.`` of the keys whose ``a.`` is a non-empty common
    prefix (``backbone.bottom_up.`` of a detectron2 file, ``model.backbone.``), in
    order of first appearance among the sorted keys."""
    return _nested(_Sorted(keys))


def _nested(keys: '_Sorted') -> Tuple[str, ...]:
    out: Dict[str, None] = {}
    for head in COMMON_PREFIXES:
        if not head:
            continue
        for rest in keys.under(head):
            seg, dot, tail = rest.partition('.')
            if dot and tail:
                out.setdefault(head + seg + '.')
    return tuple(out)


@dataclass
class Alignment:
    """A prefix rewrite ``strip`` -> ``add`` and the keys it maps.

    Args:
        pairs (dict[str, str]): Prefix rewrites, checkpoint -> model.
        mapping (dict[str, str]): Model key -> renamed checkpoint key, for
            every checkpoint key the rewrite applies to.
        score (int): Keys landing on a targeted model key of a compatible shape.
        names (int): Keys landing on a targeted model key, whatever its shape.
    """
    pairs: Dict[str, str]
    mapping: Dict[str, str]
    score: int = 0
    names: int = 0

    @property
    def rank(self) -> Tuple[int, int]:
        return (self.score, self.names)

    def describe(self) -> str:
        if all(s == a for s, a in self.pairs.items()):
            return 'identity'
        return ', '.join(f'{s or "<none>"} -> {a or "<none>"}'
                         for s, a in self.pairs.items()) or 'identity'


def compatible(src: Sequence[int], dst: Sequence[int]) -> bool:
    """Whether a tensor of shape ``src`` could become ``dst`` by a known repair.

    Equal shapes, a permutation (sparse-conv layouts), or a table resized
    along its grid with the same number of heads.
    """
    src, dst = tuple(src), tuple(dst)
    if src == dst or sorted(src) == sorted(dst):
        return True
    return len(src) == len(dst) == 2 and (src[0] == dst[0] or src[1] == dst[1])


def _apply(keys: Sequence[str], pairs: Mapping[str, str],
           collisions: Optional[List[Tuple[str, str, str]]] = None) -> Dict[str, str]:
    """Model key -> checkpoint key under prefix rewrites (longest prefix wins).

    Two checkpoint keys landing on one model key are added to ``collisions`` as
    ``(first, second, model key)``; the first is kept.
    """
    order = sorted(pairs, key=len, reverse=True)
    out: Dict[str, str] = {}
    for key in keys:
        for strip in order:
            if key.startswith(strip):
                new = pairs[strip] + key[len(strip):]
                if new in out and collisions is not None:
                    collisions.append((out[new], key, new))
                out.setdefault(new, key)
                break
    return out


def _score(mapping: Mapping[str, str], ckpt_shapes: Mapping[str, Sequence[int]],
           model_shapes: Mapping[str, Sequence[int]]) -> int:
    return sum(1 for m, c in mapping.items()
               if m in model_shapes and compatible(ckpt_shapes[c], model_shapes[m]))


def explicit_alignment(keys: Sequence[str], pairs: Mapping[str, str],
                       ckpt_shapes, model_shapes, filename: str = '') -> Alignment:
    """The alignment given by an explicit ``{checkpoint_prefix: model_prefix}``.

    Raises:
        FusionLoadError: Two checkpoint keys land on the same model key (the
            message names both).
    """
    collisions: List[Tuple[str, str, str]] = []
    mapping = _apply(keys, pairs, collisions)
    if collisions:
        raise FusionLoadError(
            [f'{filename}: checkpoint keys {a!r} and {b!r} both become {new!r} under prefix '
             f'{dict(pairs)}' for a, b, new in collisions[:20]], 'key collision')
    return Alignment(dict(pairs), mapping, _score(mapping, ckpt_shapes, model_shapes),
                     sum(1 for m in mapping if m in model_shapes))


class _Sorted:
    """Keys in sorted order, to find those under a prefix (a run of the sorted keys)
    without a pass over all of them."""

    def __init__(self, keys: Sequence[str]):
        self.keys = keys
        self.sorted: Optional[List[str]] = None

    def under(self, prefix: str) -> Dict[str, str]:
        """Rest after ``prefix`` -> key, for the keys starting with ``prefix``."""
        if not prefix:
            return dict(zip(self.keys, self.keys))
        if self.sorted is None:
            self.sorted = sorted(self.keys)
        keys, n = self.sorted, len(prefix)
        out = {}
        for i in range(bisect_left(keys, prefix), len(keys)):
            key = keys[i]
            if not key.startswith(prefix):
                break
            out[key[n:]] = key
        return out


class _Candidate:
    """One rewrite ``strip -> add`` of the keys with rests ``rests`` (rest -> checkpoint
    key): the rests landing on the model (``under_add``: rest -> model key for the model
    keys starting with ``add``), its score and count, and (when asked) the
    ``(model key, checkpoint key)`` pairs landing."""

    def __init__(self, strip: str, add: str, rests: Mapping[str, str],
                 under_add: Mapping[str, str], ckpt_shapes, model_shapes):
        self.rests, self.under_add = rests, under_add
        self.common = rests.keys() & under_add.keys()
        score = 0
        for r in self.common:
            src, dst = ckpt_shapes[rests[r]], model_shapes[under_add[r]]
            if src == dst or compatible(src, dst):
                score += 1
        self.alignment = Alignment({strip: add}, {}, score, len(self.common))
        self._pairs: Optional[frozenset] = None

    @property
    def pairs(self) -> frozenset:
        if self._pairs is None:
            self._pairs = frozenset((self.under_add[r], self.rests[r]) for r in self.common)
        return self._pairs

    def same_landing(self, other: '_Candidate') -> bool:
        """Whether both land the same pairs, for two of the same score and count."""
        return self.alignment.names == 0 or self.pairs == other.pairs


def auto_alignment(ckpt_shapes: Mapping[str, Sequence[int]],
                   model_shapes: Mapping[str, Sequence[int]],
                   targets: Sequence[str],
                   filename: str = '') -> Alignment:
    """Pick the prefix rewrite under which most checkpoint tensors land.

    Tries stripping each common prefix, each target's name and each two-segment
    prefix under a common one (:func:`nested_prefixes`, e.g. ``backbone.bottom_up.``)
    from the checkpoint keys and adding each target's name (or nothing), ranking every
    candidate by the number of checkpoint tensors that land on a targeted
    model key with a compatible shape, then by those landing on a targeted
    key at all (shape problems are then reported key by key).

    Args:
        ckpt_shapes (Mapping[str, Sequence[int]]): Checkpoint key -> shape.
        model_shapes (Mapping[str, Sequence[int]]): Targeted model key -> shape.
        targets (Sequence[str]): Target submodule names (``''`` = whole model).
        filename (str): For messages.

    Returns:
        Alignment: The best candidate.

    Raises:
        FusionLoadError: Two different alignments tie, or the best one places
            less than half of the tensors it could.
    """
    keys = list(ckpt_shapes)
    tnames = [t + '.' for t in targets if t]
    ckpt_keys, model_keys = _Sorted(keys), _Sorted(list(model_shapes))
    strips = list(dict.fromkeys(COMMON_PREFIXES + tuple(tnames) + _nested(ckpt_keys)))
    adds = list(dict.fromkeys(('', ) + tuple(tnames)))
    under: Dict[str, Dict[str, str]] = {}  # add -> rest -> model key
    seen: List[_Candidate] = []  # no two landing the same pairs: the first one stays
    by_rank: Dict[Tuple[int, int], List[_Candidate]] = {}
    for strip in strips:
        rests = ckpt_keys.under(strip)
        if strip and not rests:
            continue
        for add in adds:
            if strip == add and strip:
                continue
            if add not in under:
                under[add] = model_keys.under(add)
            cand = _Candidate(strip, add, rests, under[add], ckpt_shapes, model_shapes)
            rivals = by_rank.setdefault(cand.alignment.rank, [])
            if not any(cand.same_landing(other) for other in rivals):
                seen.append(cand)
                rivals.append(cand)
    ranked = sorted((c.alignment for c in seen), key=lambda a: a.rank, reverse=True)
    best = ranked[0]
    (strip, add), = best.pairs.items()
    if not strip:
        best.mapping = dict(zip(keys, keys)) if not add else {add + key: key for key in keys}
    else:
        best.mapping = {add + key[len(strip):]: key for key in keys if key.startswith(strip)}
    need = min(len(keys), len(model_shapes))
    if best.names == 0:
        raise FusionLoadError(
            [f'{filename}: no checkpoint tensor lands on the targeted modules '
             f'({", ".join(t or "<whole model>" for t in targets)}) under any '
             f'prefix alignment; checkpoint keys look like '
             f'{", ".join(keys[:3])}; model keys look like '
             f'{", ".join(list(model_shapes)[:3])}'], 'no matching keys')
    ties = [a for a in ranked[1:] if a.rank == best.rank]
    if ties:
        raise FusionLoadError(
            [f'{filename}: prefix alignments tie at {best.score} tensors: '
             f'{"; ".join(a.describe() for a in [best] + ties)}; pass '
             'prefix={checkpoint_prefix: model_prefix} to choose'],
            'ambiguous prefix')
    if best.names * 2 < need:
        raise FusionLoadError(
            [f'{filename}: best prefix alignment ({best.describe()}) places only '
             f'{best.names} of {need} tensors; candidates: '
             f'{"; ".join(f"{a.describe()} ({a.names})" for a in ranked[:4])}; '
             'is this the right checkpoint for these modules?'], 'poor match')
    return best
