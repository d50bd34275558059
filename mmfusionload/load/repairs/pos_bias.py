"""Relative position-bias tables whose size follows the window: resized, never dropped."""
import math
import re

import torch
import torch.nn.functional as F

from ...registry import REPAIRS
from .base import Entry, Repair, RepairProblem


def resize_attention_biases(t: torch.Tensor, size: int) -> torch.Tensor:
    """Resize EfficientViT ``attention_biases`` ``[h, s1*s1]`` to ``[h, size*size]``.

    Bicubic over the offset grid, as Cream's detection loader does.
    """
    h, n = t.shape
    s1 = math.isqrt(n)
    out = F.interpolate(t.reshape(1, h, s1, s1).float(), size=(size, size),
                        mode='bicubic', align_corners=False)
    return out.reshape(h, size * size).to(t.dtype)


def resize_relative_position_table(t: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a Swin ``relative_position_bias_table`` ``[L1*L1, h]`` to ``[length*length, h]``."""
    n, h = t.shape
    l1 = math.isqrt(n)
    grid = t.transpose(0, 1).reshape(1, h, l1, l1).float()
    out = F.interpolate(grid, size=(length, length), mode='bicubic', align_corners=False)
    return out.reshape(h, length * length).transpose(0, 1).contiguous().to(t.dtype)


def _square(n: int) -> bool:
    return math.isqrt(n)**2 == n


@REPAIRS.register_module()
class ResizePositionBias(Repair):
    """Resize ``attention_biases`` / ``relative_position_bias_table`` to the live window.

    A different number of heads is an error naming the key.
    """
    name = 'resize'
    priority = 20
    # regex -> which dim holds the heads
    TABLES = {r'(^|\.)attention_biases$': 0, r'(^|\.)relative_position_bias_table$': 1}

    def __call__(self, entry: Entry) -> None:
        if len(entry.shape) != 2 or entry.target.dim() != 2:
            return
        dst = tuple(entry.target.shape)
        if entry.shape == dst:
            return
        for pattern, head_dim in self.TABLES.items():
            if not re.search(pattern, entry.key):
                continue
            grid_dim = 1 - head_dim
            where = f'{entry.filename}: {entry.file_key} -> {entry.key}'
            if entry.shape[head_dim] != dst[head_dim]:
                raise RepairProblem(
                    f'{where}: {entry.shape[head_dim]} heads in the checkpoint '
                    f'{list(entry.shape)}, {dst[head_dim]} in the model {list(dst)}')
            if not (_square(entry.shape[grid_dim]) and _square(dst[grid_dim])):
                raise RepairProblem(f'{where}: table {list(entry.shape)} -> '
                                    f'{list(dst)} is not over a square grid')
            side = math.isqrt(dst[grid_dim])
            fn = resize_attention_biases if head_dim == 0 else resize_relative_position_table
            entry.add_step(self.name, lambda t, s=side, f=fn: f(t, s), shape=dst)
            return
