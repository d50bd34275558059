"""What a stored sparse-convolution kernel computes, per library, and every conversion.

A sparse convolution maps features ``x[site]`` (``in`` channels) to
``y[o] = sum_k x[i(o, k)] @ K[k]`` (``out`` channels), where ``k`` runs over the
kernel offsets in C order over the spatial dims and ``K`` is the **function
kernel**: a ``[*kernel, in, out]`` tensor. Which input site ``i(o, k)`` pairs
with which output ``o`` depends on the kind (submanifold, strided, transposed,
inverse) but not on the library; what differs between libraries is how the
stored ``weight`` is read into ``K``. A layout is defined here by that reading
(``decode``: stored weight -> ``K``) and its inverse (``encode``); every
conversion is ``encode(dst, decode(src, w))`` and every axis reordering a
permutation of ``K``'s spatial dims. Nothing else in the package permutes
a sparse kernel.

The readings, from the libraries' forward code:

- spconv 2.x (read from spconv 2.3.8, ``spconv/pytorch/conv.py``,
  ``SparseConvolutionBase``; ``SPCONV_SAVED_WEIGHT_LAYOUT`` unset,
  ``ALL_WEIGHT_IS_KRSC = True``): the weight is ``[out, *k, in]`` ("KRSC").
  The general path (submanifold, strided, transposed, inverse; native and
  implicit-GEMM algorithms alike) uses ``weight[:, k, :]`` transposed as
  ``K[k]``. The ``conv1x1`` path is taken when the kernel volume is 1 and the
  conv is submanifold or its stride volume is 1 (``__init__``:
  ``conv1x1 = kv == 1``, ``if not subm: conv1x1 &= kv_stride == 1``); its
  forward is ``torch.mm(features, weight.view(in, out))``: the same memory
  read as ``[in, out]``, **not** the transpose of ``[out, in]``. Such a
  weight holds ``K`` in the same memory order as MMCV's, so converting it is
  a reshape; permuting it ``[out, *k, in] <-> [*k, in, out]`` computes another
  function whenever ``in, out > 1``. (MMDetection3D 1.4.0's loading override,
  ``_load_from_state_dict`` in ``overwrite_spconv/write_spconv2.py``, permutes
  every kernel, volume 1 included.) A volume-1 conv with stride > 1 takes the
  general path.
- MMCV's ``SparseConvolution`` (read from MMCV 2.1.0, ``mmcv/ops/sparse_conv.py``)
  and spconv 1.x (read from spconv 1.2.1, ``spconv/conv.py``): the weight is
  ``[*k, in, out]`` and is ``K`` itself on every path (the volume-1 path is
  ``torch.mm(features, weight.view(in, out))``).

- spconv 2.0 and 2.1 as allocated by their Native algorithm (read from spconv
  2.1.25, ``spconv/pytorch/conv.py`` and ``ops.indice_conv``;
  ``SPCONV_FILTER_HWIO`` unset): the weight is ``[*k, out, in]`` ("RSKC") and
  the general path reads ``K[k] = weight[k].T``. spconv 2.0 allocates every
  conv so; spconv 2.1 every conv that runs the Native algorithm (every
  CPU-only build, every kernel of volume > 32, ``algo=Native``), while its
  implicit-GEMM convs hold ``[out, *k, in]`` (``spconv2``); spconv 2.2.0 made
  every weight ``[out, *k, in]`` (CHANGELOG 2.2.0;
  ``docs/SPCONV_2_BREAKING_CHANGEs.md``). No version writes a marker of which.
  The ``conv1x1`` path is ``torch.mm(features, weight.view(in, out))`` as in
  later versions: the memory read as ``[in, out]``. It is taken when the
  kernel volume is 1 and, from 2.1.11 on, the conv is submanifold or of stride
  1 (2.0 to 2.1.10 took it for every volume-1 conv, strided ones too, keeping
  the input's sites: a function no later spconv module computes; the reading
  here is 2.1.11's).

MMCV's and spconv 1.x's volume-1 path keeps the input's sites whatever the
stride; spconv 2.x's ``conv1x1`` path too (it is only taken with stride 1).
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

SPCONV2 = 'spconv2'
MMCV = 'mmcv'
SPCONV2_RSKC = 'spconv2_rskc'
#: Every layout name: the values of the ``spconv_layout`` / ``--to-layout`` options.
LAYOUTS = (SPCONV2, MMCV, SPCONV2_RSKC)
#: The layouts a spconv 2.x module holds (what ``_metadata`` version 2 is evidence of).
SPCONV2_LAYOUTS = (SPCONV2, SPCONV2_RSKC)
ZYX, XYZ = 'zyx', 'xyz'
ORDERS = (ZYX, XYZ)

Kernel = Tuple[int, ...]


def volume(kernel: Sequence[int]) -> int:
    """Number of kernel offsets."""
    v = 1
    for k in kernel:
        v *= int(k)
    return v


@dataclass(frozen=True)
class Geometry:
    """What a sparse-conv weight's shape depends on.

    Args:
        kernel (tuple[int]): Kernel size per spatial dim.
        cin (int): Input channels.
        cout (int): Output channels.
    """
    kernel: Kernel
    cin: int
    cout: int

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    def reversed(self) -> 'Geometry':
        return Geometry(tuple(reversed(self.kernel)), self.cin, self.cout)


def _spconv2_decode(w: torch.Tensor, pointwise: bool) -> torch.Tensor:
    cout, kernel, cin = w.shape[0], tuple(w.shape[1:-1]), w.shape[-1]
    if pointwise:  # conv1x1: mm(features, weight.view(in, out))
        return w.reshape(*kernel, cin, cout)
    # general path: weight[:, k, :].T for every offset k
    return w.reshape(cout, -1).t().contiguous().view(*kernel, cin, cout)


def _spconv2_encode(kern: torch.Tensor, pointwise: bool) -> torch.Tensor:
    kernel, cin, cout = tuple(kern.shape[:-2]), kern.shape[-2], kern.shape[-1]
    if pointwise:
        return kern.reshape(cout, *kernel, cin)
    return kern.reshape(-1, cout).t().contiguous().view(cout, *kernel, cin)


def _identity(t: torch.Tensor, pointwise: bool) -> torch.Tensor:
    return t


def _rskc_decode(w: torch.Tensor, pointwise: bool) -> torch.Tensor:
    kernel, cout, cin = tuple(w.shape[:-2]), w.shape[-2], w.shape[-1]
    if pointwise:  # conv1x1: mm(features, weight.view(in, out))
        return w.reshape(*kernel, cin, cout)
    return w.transpose(-1, -2).contiguous()  # general path: weight[k].T for every offset k


def _rskc_encode(kern: torch.Tensor, pointwise: bool) -> torch.Tensor:
    kernel, cin, cout = tuple(kern.shape[:-2]), kern.shape[-2], kern.shape[-1]
    if pointwise:
        return kern.reshape(*kernel, cout, cin)
    return kern.transpose(-1, -2).contiguous()


def is_pointwise(kernel: Sequence[int], stride: Sequence[int] = (1, ), subm: bool = True) -> bool:
    """Whether spconv 2.x computes a conv as a per-site ``mm`` (its ``conv1x1`` path):
    kernel volume 1, and submanifold or stride volume 1 (spconv 2.3.8)."""
    return volume(kernel) == 1 and (subm or volume(stride) == 1)


@dataclass(frozen=True)
class Layout:
    """One library's sparse-kernel layout.

    Args:
        name (str): One of :data:`LAYOUTS`.
        libraries (str): Who stores it, with the version the reading is from.
        stored (str): The stored weight's shape.
        computes (str): What the stored weight computes.
        decode (Callable): ``(stored weight, pointwise)`` -> function kernel
            ``[*k, in, out]``; ``pointwise``: see :func:`is_pointwise`.
        encode (Callable): ``(function kernel, pointwise)`` -> stored weight.
        version (int): ``_metadata`` version MMDetection3D writes for it.
        axes (str): Where the stored dims are: ``'o*i'`` (``[out, *k, in]``),
            ``'*io'`` (``[*k, in, out]``) or ``'*oi'`` (``[*k, out, in]``).
    """
    name: str
    libraries: str
    stored: str
    computes: str
    decode: Callable[[torch.Tensor, bool], torch.Tensor]
    encode: Callable[[torch.Tensor, bool], torch.Tensor]
    version: int
    axes: str

    def shape(self, geom: Geometry) -> Tuple[int, ...]:
        """The stored shape of a kernel of ``geom``."""
        if self.axes == 'o*i':
            return (geom.cout, *geom.kernel, geom.cin)
        if self.axes == '*oi':
            return (*geom.kernel, geom.cout, geom.cin)
        return (*geom.kernel, geom.cin, geom.cout)

    def geometry(self, shape: Sequence[int]) -> Geometry:
        """The geometry a stored shape stands for in this layout."""
        shape = tuple(int(s) for s in shape)
        if self.axes == 'o*i':
            return Geometry(shape[1:-1], shape[-1], shape[0])
        if self.axes == '*oi':
            return Geometry(shape[:-2], shape[-1], shape[-2])
        return Geometry(shape[:-2], shape[-2], shape[-1])


LAYOUT_DEFS: Dict[str, Layout] = {
    SPCONV2: Layout(
        SPCONV2, 'spconv 2.x (read from 2.3.8)', '[out, *k, in]',
        'general path: K[k] = weight[:, k, :].T; conv1x1 path (kernel volume 1, '
        'submanifold or stride 1): K = weight.view(in, out), the same memory read as [in, out]',
        _spconv2_decode, _spconv2_encode, 2, 'o*i'),
    MMCV: Layout(
        MMCV, "MMCV's SparseConvolution (read from 2.1.0), spconv 1.x (read from 1.2.1)",
        '[*k, in, out]', 'K[k] = weight[k] on every path', _identity, _identity, 1, '*io'),
    # MMDetection3D's override writes version 2 on every spconv 2.x module, these included
    SPCONV2_RSKC: Layout(
        SPCONV2_RSKC, 'spconv 2.0, and spconv 2.1 convs run by its Native algorithm '
        '(read from 2.1.25)', '[*k, out, in]',
        'general path: K[k] = weight[k].T; conv1x1 path (kernel volume 1, submanifold or '
        'stride 1): K = weight.view(in, out), the same memory read as [in, out]',
        _rskc_decode, _rskc_encode, 2, '*oi'),
}
LAYOUT_VERSION = {name: d.version for name, d in LAYOUT_DEFS.items()}


def _pw(shape: Sequence[int], layout: str, pointwise: Optional[bool]) -> bool:
    if pointwise is not None:
        return pointwise
    return volume(LAYOUT_DEFS[layout].geometry(shape).kernel) == 1


def decode(w: torch.Tensor, layout: str, pointwise: Optional[bool] = None) -> torch.Tensor:
    """The function kernel ``[*k, in, out]`` a stored ``layout`` weight computes with.

    Args:
        w (Tensor): The stored weight.
        layout (str): One of :data:`LAYOUTS`.
        pointwise (bool, optional): Whether the module takes spconv 2.x's
            ``conv1x1`` path (:func:`is_pointwise`); None: when the kernel
            volume is 1 (a submanifold or stride-1 conv).
    """
    return LAYOUT_DEFS[layout].decode(w, _pw(w.shape, layout, pointwise))


def encode(kern: torch.Tensor, layout: str, pointwise: Optional[bool] = None) -> torch.Tensor:
    """The stored ``layout`` weight that computes with the function kernel ``kern``."""
    if pointwise is None:
        pointwise = volume(kern.shape[:-2]) == 1
    return LAYOUT_DEFS[layout].encode(kern, pointwise)


def convert(w: torch.Tensor, src: str, dst: str, pointwise: Optional[bool] = None
            ) -> torch.Tensor:
    """A stored ``src`` weight as the ``dst`` weight computing the same function.

    The result is contiguous (it may share memory with ``w`` when no data moves).
    """
    if src == dst:
        return w
    pointwise = _pw(w.shape, src, pointwise)
    return encode(decode(w, src, pointwise), dst, pointwise).contiguous()


def reverse_axes(w: torch.Tensor, layout: str, pointwise: Optional[bool] = None
                 ) -> torch.Tensor:
    """A stored weight with its spatial axes reversed (e.g. z-y-x -> x-y-z).

    The result computes, on a grid whose axes are reversed, what ``w`` computes
    on the original grid.
    """
    pointwise = _pw(w.shape, layout, pointwise)
    kern = decode(w, layout, pointwise)
    n = kern.dim() - 2
    perm = list(reversed(range(n))) + [n, n + 1]
    return encode(kern.permute(*perm).contiguous(), layout, pointwise).contiguous()


def stored_shape(geom: Geometry, layout: str) -> Tuple[int, ...]:
    """The shape of a ``geom`` kernel stored in ``layout``."""
    return LAYOUT_DEFS[layout].shape(geom)


def layout_of_version(version: Optional[int]) -> Optional[Tuple[str, ...]]:
    """The layouts a sparse-conv module's ``_metadata`` version is evidence of, or None.

    Version 2 is written only by MMDetection3D's spconv 2.x override
    (``SparseModule._version = 2``): a spconv 2.x module, which holds
    ``spconv2`` or, under spconv 2.0/2.1's Native algorithm, ``spconv2_rskc``
    (:data:`SPCONV2_LAYOUTS`). Version 1 is the default of every ``nn.Module``
    (a plain spconv 2.x model saves it too), so it is no evidence of any
    layout: None.
    """
    return SPCONV2_LAYOUTS if version is not None and int(version) >= 2 else None


def check_layout_option(value: Any, name: str = 'spconv_layout',
                        auto: bool = True) -> Optional[str]:
    """The problem with a layout option's value (``'auto'`` or one of
    :data:`LAYOUTS`), or None when it is one of them."""
    allowed = (('auto', ) if auto else ()) + LAYOUTS
    if value in allowed:
        return None
    names = ', '.join(repr(a) for a in allowed)
    return f'{name} must be one of {names}, got {value!r}'
