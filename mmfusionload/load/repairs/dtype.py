"""dtype repair: cast floating checkpoints (float16, bfloat16, float64) to the model's dtype."""
import torch

from ...registry import REPAIRS
from .base import Entry, Repair, RepairProblem


@REPAIRS.register_module()
class CastDtype(Repair):
    """Cast a floating-point tensor to the target's floating dtype."""
    name = 'cast'
    priority = 15  # before a resize, which then computes in the model's precision

    def __call__(self, entry: Entry) -> None:
        dst = entry.target.dtype
        if entry.dtype == dst:
            return
        if entry.dtype.is_floating_point and dst.is_floating_point:
            entry.add_step(self.name, lambda t, d=dst: t.to(d), dtype=dst)
        elif not entry.dtype.is_floating_point and not dst.is_floating_point \
                and entry.dtype != torch.bool and dst != torch.bool:
            entry.add_step(self.name, lambda t, d=dst: t.to(d), dtype=dst)
        else:
            raise RepairProblem(
                f'{entry.filename}: {entry.file_key} is {entry.dtype} but model '
                f'key {entry.key} is {dst}')
