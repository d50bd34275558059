"""Sharded safetensors: ``model.safetensors.index.json`` and the shards it names."""
import json
import os.path as osp
from typing import Dict, Iterator, List, Tuple

import torch

from ..errors import FusionLoadError
from .lazy import LazyState, SafetensorsState

INDEX_SUFFIX = '.safetensors.index.json'


def is_sharded_index(path: str) -> bool:
    """Whether ``path`` names a sharded-safetensors index (by suffix)."""
    return str(path).endswith(INDEX_SUFFIX)


class ShardedSafetensorsState(LazyState):
    """The shards of an index as one lazy ``key -> tensor`` mapping.

    The index's ``weight_map`` (key -> shard file name) decides which shard holds a
    key. Every shard must lie in the index's folder and hold the keys the index
    gives it; shards are opened when the mapping is built (headers only).

    Args:
        path (str): The ``*.safetensors.index.json`` file.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, encoding='utf-8') as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise FusionLoadError([f'{path}: not a readable index: {type(e).__name__}: {e}'],
                                  'cannot read checkpoint') from e
        wmap = index.get('weight_map') if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise FusionLoadError([f'{path}: "weight_map" must be a non-empty '
                                   '{key: shard file} mapping'], 'cannot read checkpoint')
        folder = osp.dirname(osp.abspath(path))
        problems = []
        self.shards: Dict[str, SafetensorsState] = {}
        for name in dict.fromkeys(wmap.values()):
            shard = osp.normpath(osp.join(folder, name))
            if osp.dirname(shard) != folder:
                problems.append(f'{path}: shard {name!r} is not a file in the index\'s folder')
            elif not osp.isfile(shard):
                problems.append(f'{path}: shard {name!r} does not exist')
            else:
                self.shards[name] = SafetensorsState(shard)
        if not problems:
            for key, name in wmap.items():
                if key not in self.shards[name]:
                    problems.append(f'{path}: the index puts {key!r} in {name}, which does '
                                    'not hold it')
        if problems:
            raise FusionLoadError(problems[:20], 'cannot read checkpoint')
        self.weight_map: Dict[str, str] = dict(wmap)
        self.metadata: Dict[str, str] = {
            k: str(v) for k, v in (index.get('metadata') or {}).items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.shards[self.weight_map[key]][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def __contains__(self, key) -> bool:
        return key in self.weight_map

    @property
    def materialized(self) -> List[str]:
        """Keys whose tensors have been created."""
        return [k for s in self.shards.values() for k in s.materialized]

    def shape(self, key: str) -> Tuple[int, ...]:
        """The tensor's shape, from its shard's header."""
        return self.shards[self.weight_map[key]].shape(key)

    def dtype(self, key: str) -> str:
        """The tensor's dtype as safetensors names it."""
        return self.shards[self.weight_map[key]].dtype(key)


def read_sharded(path: str) -> dict:
    """A sharded safetensors checkpoint as ``{'state_dict': lazy mapping, 'meta': ...}``."""
    state = ShardedSafetensorsState(path)
    return {'state_dict': state, 'meta': dict(state.metadata)}
