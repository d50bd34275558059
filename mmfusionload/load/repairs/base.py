"""What a repair sees: one planned tensor, and the interface repairs implement."""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

Transform = Callable[[torch.Tensor], torch.Tensor]


class RepairProblem(Exception):
    """A repair found a tensor it cannot place; the message names key and shapes."""


@dataclass
class Mapped:
    """One checkpoint tensor a source maps onto a model tensor, loaded or excluded.

    Args:
        key (str): Model key.
        file_key (str): Key in the checkpoint.
        shape (tuple): The checkpoint tensor's shape.
        module (nn.Module): Module owning the model tensor.
        module_name (str): Model name of ``module``.
        file_version (int, optional): The checkpoint's ``_metadata`` version for it.
    """
    key: str
    file_key: str
    shape: Tuple[int, ...]
    module: nn.Module
    module_name: str
    file_version: Optional[int] = None


@dataclass
class SourceContext:
    """What the entries of one source share, for decisions taken per file or per encoder.

    Args:
        filename (str): The checkpoint, for messages.
        options (Any): The source's options.
        model (nn.Module, optional): The live model.
        mapped (list[Mapped]): Every tensor the source maps onto the model,
            excluded ones included (their shapes are evidence too).
        meta (dict): The checkpoint's ``meta``.
        orders (dict): Checkpoint key prefix -> ``(axis order, evidence)``
            the source's preset read from the file.
        cache (dict): Decisions, computed once by the repairs that need them.
    """
    filename: str = ''
    options: Any = None
    model: Optional[nn.Module] = None
    mapped: List[Mapped] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
    orders: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    cache: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Entry:
    """One checkpoint tensor planned onto one model tensor.

    Args:
        key (str): Model key.
        file_key (str): Key in the checkpoint (after unwrapping).
        source (torch.Tensor): The checkpoint tensor (in the reader's private memory).
        target (torch.Tensor): The live parameter or buffer.
        module (nn.Module): Module owning ``target``.
        module_name (str): Model name of ``module``.
        file_version (int, optional): ``_metadata`` version the checkpoint
            recorded for the module ``file_key`` belongs to.
        options (Any): The source's options (:class:`~mmfusionload.load.source.SourceSpec`).
        filename (str): The checkpoint, for messages.
        shape (tuple): Shape after the planned steps.
        dtype (torch.dtype): dtype after the planned steps.
        steps (list): ``(repair name, transform)`` pairs, in order.
        skip (str, optional): Why the tensor is not loaded (regenerated).
        context (SourceContext, optional): Shared by the entries of one source.
        facts (dict): What repairs decided about the tensor (e.g. the source
            and target sparse-kernel layouts), for the checks after planning.
    """
    key: str
    file_key: str
    source: torch.Tensor
    target: torch.Tensor
    module: nn.Module
    module_name: str
    file_version: Optional[int] = None
    options: Any = None
    filename: str = ''
    shape: Tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    steps: List[Tuple[str, Transform]] = field(default_factory=list)
    skip: Optional[str] = None
    context: Optional[SourceContext] = None
    facts: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.shape = tuple(self.source.shape)
        self.dtype = self.source.dtype

    @property
    def param_name(self) -> str:
        """Name of the tensor inside its module (``weight``, ``bias``...)."""
        return self.key.rsplit('.', 1)[-1]

    def add_step(self, name: str, fn: Transform, shape=None, dtype=None) -> None:
        """Plan ``fn`` on this tensor and record the resulting shape/dtype."""
        self.steps.append((name, fn))
        if shape is not None:
            self.shape = tuple(shape)
        if dtype is not None:
            self.dtype = dtype

    def materialize(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The tensor to copy into ``target``: moved to its device, then repaired."""
        t = self.source
        device = device or self.target.device
        if t.device != device:
            t = t.to(device, non_blocking=True)
        for _, fn in self.steps:
            t = fn(t)
        return t


class Repair:
    """A registered repair. Subclasses set ``name``/``priority`` and implement ``__call__``.

    ``__call__(entry)`` looks at the entry (checkpoint tensor, live target,
    module, options) and either does nothing, plans a transform with
    :meth:`Entry.add_step`, marks the entry skipped, or raises
    :class:`RepairProblem`.
    """
    name = 'repair'
    priority = 50

    def __call__(self, entry: Entry) -> None:
        raise NotImplementedError
