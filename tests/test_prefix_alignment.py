"""The prefix alignment search against a direct search over every candidate rewrite."""
import random
from typing import Dict, List, Tuple

import pytest

from mmfusionload.errors import FusionLoadError
from mmfusionload.load.prefix import COMMON_PREFIXES, Alignment, auto_alignment, compatible


def reference(ckpt_shapes, model_shapes, targets, filename=''):
    """Every candidate rewrite applied to every key, as the documented rule says."""
    keys = list(ckpt_shapes)
    tnames = [t + '.' for t in targets if t]
    nested = sorted({h + k[len(h):].split('.', 1)[0] + '.' for k in keys for h in COMMON_PREFIXES
                     if h and k.startswith(h) and k[len(h):].count('.') >= 1
                     and not k[len(h):].endswith('.')})
    nested = sorted(nested, key=lambda p: (COMMON_PREFIXES.index(p.split('.', 1)[0] + '.'), p))
    strips = list(dict.fromkeys(COMMON_PREFIXES + tuple(tnames) + tuple(nested)))
    adds = list(dict.fromkeys(('', ) + tuple(tnames)))
    seen: Dict[frozenset, Alignment] = {}
    for strip in strips:
        rests = [(k[len(strip):], k) for k in keys if k.startswith(strip)]
        if strip and not rests:
            continue
        for add in adds:
            if strip == add and strip:
                continue
            mapping = {add + rest: key for rest, key in rests}
            landing = [(m, c) for m, c in mapping.items() if m in model_shapes]
            score = sum(1 for m, c in landing if compatible(ckpt_shapes[c], model_shapes[m]))
            sig = frozenset(landing)
            if sig not in seen:
                seen[sig] = Alignment({strip: add}, mapping, score, len(landing))
    ranked = sorted(seen.values(), key=lambda a: a.rank, reverse=True)
    best = ranked[0]
    need = min(len(keys), len(model_shapes))
    ties = [a for a in ranked[1:] if a.rank == best.rank]
    if best.names == 0:
        return 'none'
    if ties:
        return ('tie', [a.describe() for a in [best] + ties])
    if best.names * 2 < need:
        return ('poor', [(a.describe(), a.names) for a in ranked[:4]])
    return best


def _random_case(rng: random.Random) -> Tuple[dict, dict, List[str]]:
    heads = ['img_backbone', 'img_neck', 'pts_backbone', 'bbox_head', 'backbone', 'model',
             'module', 'a.b', 'a', 'backbone.bottom_up', 'model.img_backbone']
    leaves = ['conv.weight', 'conv.bias', 'bn.weight', 'blocks.0.w', 'blocks.1.w', 'x', 'b.c.w']
    targets = rng.sample(['img_backbone', 'img_neck', 'pts_backbone', 'bbox_head', 'a',
                          'a.b'], rng.randint(1, 3))
    shapes = [(2, ), (3, ), (2, 3), (3, 2)]
    model = {}
    for t in targets:
        for leaf in rng.sample(leaves, rng.randint(1, len(leaves))):
            model[f'{t}.{leaf}'] = rng.choice(shapes)
    ckpt = {}
    for _ in range(rng.randint(1, 20)):
        head = rng.choice(heads + [''] * 3)
        pre = rng.choice(['', 'module.', 'backbone.']) if rng.random() < 0.3 else ''
        key = pre + (head + '.' if head else '') + rng.choice(leaves)
        ckpt[key] = rng.choice(shapes)
    return ckpt, model, targets


@pytest.mark.parametrize('seed', range(6))
def test_auto_alignment_matches_a_search_over_every_rewrite(seed):
    rng = random.Random(seed)
    for _ in range(300):
        ckpt, model, targets = _random_case(rng)
        want = reference(ckpt, model, targets, 'f.pth')
        try:
            got = auto_alignment(ckpt, model, targets, 'f.pth')
        except FusionLoadError as e:
            text = ' '.join(e.problems)
            if want == 'none':
                assert e.title == 'no matching keys', text
            elif want[0] == 'tie':
                assert e.title == 'ambiguous prefix' and '; '.join(want[1]) in text, (want, text)
            else:
                assert e.title == 'poor match', text
                assert '; '.join(f'{d} ({n})' for d, n in want[1]) in text, (want, text)
            continue
        assert isinstance(want, Alignment), (want, got)
        assert got.pairs == want.pairs and (got.score, got.names) == (want.score, want.names)
        assert list(got.mapping.items()) == list(want.mapping.items())
