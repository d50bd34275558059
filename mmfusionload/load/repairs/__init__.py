"""Registered tensor repairs, run on every planned tensor in ``priority`` order.

Add one with ``@REPAIRS.register_module()`` on a :class:`Repair` subclass.
"""
from typing import List, Optional

from ...registry import REPAIRS
from .base import Entry, Mapped, Repair, RepairProblem, SourceContext
from .bev_order import BevOrder
from .derived import SkipDerived, is_derived, is_record, may_be_absent, register_derived
from .dtype import CastDtype
from .pos_bias import (ResizePositionBias, resize_attention_biases,
                       resize_relative_position_table)
from .spconv_layout import (AxisOrder, SpconvLayout, convert_kernel, decide_sparse,
                            kernel_shape, module_geometry, module_layout)


def repairs_in_order() -> List[Repair]:
    """One instance of every registered repair, by ``priority``."""
    return sorted((cls() for cls in REPAIRS.module_dict.values()),
                  key=lambda r: r.priority)


def run_repairs(entry: Entry, repairs: Optional[List[Repair]] = None) -> None:
    """Run the repairs on ``entry`` in order, until one marks it skipped.

    Args:
        entry (Entry): The planned tensor; repairs add steps or skip it.
        repairs (list[Repair], optional): Defaults to :func:`repairs_in_order`.

    Raises:
        RepairProblem: A repair cannot place the tensor.
    """
    for repair in repairs if repairs is not None else repairs_in_order():
        repair(entry)
        if entry.skip:
            return


__all__ = [
    'Entry', 'Mapped', 'Repair', 'RepairProblem', 'SourceContext', 'SkipDerived', 'CastDtype',
    'ResizePositionBias', 'SpconvLayout', 'is_derived', 'is_record', 'may_be_absent',
    'register_derived',
    'run_repairs',
    'repairs_in_order', 'resize_attention_biases', 'resize_relative_position_table',
    'convert_kernel', 'kernel_shape', 'module_layout', 'module_geometry', 'decide_sparse',
    'AxisOrder', 'BevOrder'
]
