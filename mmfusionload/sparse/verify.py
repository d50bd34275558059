"""``verify``: prove a converted sparse-conv kernel by what the module computes.

Before anything is written into the model, every sparse-conv module whose
kernel a repair changed in more than its dtype (layout, axis order, any other
registered repair: a step is exempt only when the values after it equal the
checkpoint's cast, checked, whatever it is called) is run on a small random
probe with the converted weight — a functional call, the live module itself is
not modified — and its output is compared with a reference computed here from the
**checkpoint's** weight under the source's semantics: the function kernel
:func:`~mmfusionload.sparse.layouts.decode` reads from the source layout,
applied on the source's axis order by an explicit sum over kernel offsets
(the definition of a sparse convolution, no library code). A mismatch is a
problem naming the module, the layouts and the error; the load then fails with
the model untouched.

The probe is a full block of active sites as large as one receptive field in
every dim (27 sites for a 3x3x3 kernel), so every kernel offset and every
channel takes part; features are random (a fixed seed). The reference is
computed at a few output sites that together use every offset (a complete
check for random inputs). spconv modules of one class, config and input width
run once with their converted weights stacked along the output channels, with
one CPU thread (spconv's CPU kernels race with several). The probe runs without
the module's bias (not converted; spconv 2.3.8 refuses it on CPU in eval mode).

MMCV's sparse conv does not run on CPU, and a check through the layout
definitions would share any error of the conversion. An MMCV target is checked
without them: its converted weight computes what MMCV 2.1.0 computes with it
(:func:`mmcv_forward`, dense ``torch.nn.functional``), compared with the
checkpoint weight run by spconv itself in a module of the same kind and
configuration (a spconv 2.x source), or read as MMCV reads it (an MMCV source).
Only where no such reference exists (spconv absent, 4-D) is it checked by the
layout's definition.
"""
import copy
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import module_geometry, module_layout, module_pointwise
from .layouts import MMCV, SPCONV2, decode, volume

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
TOLERANCE_LOW = 2e-2  # float16 / bfloat16 targets


def _tuple(v, n: int) -> Tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v), ) * n


def _kind(module: nn.Module) -> str:
    vol1 = volume(module_geometry(module).kernel) == 1
    if (module_pointwise(module) if module_layout(module) == SPCONV2 else vol1):
        return 'pointwise'
    if getattr(module, 'subm', False):
        return 'subm'
    if getattr(module, 'inverse', False):
        return 'inverse'
    if getattr(module, 'transposed', False):
        return 'transposed'
    return 'conv'


def is_plain_cast(entry) -> bool:
    """Whether ``entry``'s planned steps only change its dtype: the values after
    them equal the checkpoint's values cast to the resulting dtype, element by
    element and in the same shape (checked, whatever the steps are called)."""
    if tuple(entry.shape) != tuple(entry.source.shape):
        return False
    after = entry.materialize().detach()
    before = entry.source.detach().to(after.device).to(after.dtype)
    return after.shape == before.shape and torch.equal(after, before)


#: The attribute that marks a step changing the function on purpose, planned in the
#: checkpoint's layout (the point features adapted by name, set by the planner on its own
#: step objects, never read from a step's name): the reference computes the kernel after it.
CHANGES_FUNCTION = 'changes_function_on_purpose'


def wants_verify(entry, mode) -> bool:
    """Whether ``entry`` (a planned tensor) is checked under ``verify=mode``:
    ``True``: every sparse kernel; ``'auto'``: those whose planned steps do more
    than cast the dtype (:func:`is_plain_cast`)."""
    if mode is False or entry.skip is not None:
        return False
    if module_layout(entry.module) is None or entry.param_name != 'weight':
        return False
    return mode is True or (bool(entry.steps) and not is_plain_cast(entry))


class _Probe:
    """Sites and features of one probe, in the live module's axis order."""

    def __init__(self, module: nn.Module, seed: int = 0):
        g = module_geometry(module)
        self.n = g.ndim
        self.kernel = g.kernel
        self.stride = _tuple(getattr(module, 'stride', 1), self.n)
        self.padding = _tuple(getattr(module, 'padding', 0), self.n)
        self.dilation = _tuple(getattr(module, 'dilation', 1), self.n)
        self.out_padding = _tuple(getattr(module, 'output_padding', 0), self.n)
        self.kind = _kind(module)
        if self.kind == 'inverse':  # paired with a strided conv of the same kernel
            self.pair_stride = tuple(2 if k > 1 else 1 for k in self.kernel)
            self.pair_padding = tuple(k // 2 for k in self.kernel)
            step = self.pair_stride
        else:
            step = self.stride if self.kind in ('conv', 'transposed') else (1, ) * self.n
        self.shape = tuple(max((k - 1) * d + 1, 2) + s - 1
                           for k, d, s in zip(self.kernel, self.dilation, step))
        self.coords = torch.tensor(list(itertools.product(*[range(e) for e in self.shape])),
                                   dtype=torch.long).reshape(-1, self.n)
        gen = torch.Generator().manual_seed(seed)
        self.feats = torch.randn(len(self.coords), g.cin, generator=gen, dtype=torch.float32)
        self.gen = gen


def _index(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    idx = torch.zeros(len(coords), dtype=torch.long)
    for j, e in enumerate(shape):
        idx = idx * int(e) + coords[:, j]
    return idx


def _lookup(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense grid -> row of ``coords`` (-1 where no site)."""
    size = 1
    for e in shape:
        size *= int(e)
    table = torch.full((size, ), -1, dtype=torch.long)
    table[_index(coords, shape)] = torch.arange(len(coords))
    return table


def _rows(table: torch.Tensor, coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    inside = torch.ones(len(coords), dtype=torch.bool)
    for j, e in enumerate(shape):
        inside &= (coords[:, j] >= 0) & (coords[:, j] < int(e))
    rows = torch.full((len(coords), ), -1, dtype=torch.long)
    rows[inside] = table[_index(coords[inside], shape)]
    return rows


def reference(kind: str, kern: torch.Tensor, coords: torch.Tensor, feats: torch.Tensor,
              shape: Sequence[int], out_coords: torch.Tensor, out_shape: Sequence[int],
              stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A sparse convolution by its definition, at ``out_coords``.

    ``y[o] = sum_k x[i] @ kern[k]`` over the pairs ``(i, o, k)`` of the kind:
    ``conv``: ``i = o * stride - padding + k * dilation``; ``subm``: the same
    with stride 1 and the kernel centred (``padding = k // 2 * dilation``);
    ``transposed`` / ``inverse``: ``o = i * stride - padding + k * dilation``
    (the inverse of a strided conv with that stride and padding);
    ``pointwise`` (volume 1): ``y[i] = x[i] @ kern``.

    Args:
        kind (str): ``'conv'``, ``'subm'``, ``'transposed'``, ``'inverse'`` or
            ``'pointwise'``.
        kern (Tensor): Function kernel ``[*k, in, out]``.
        coords (Tensor): Input sites ``[N, ndim]``; ``feats`` ``[N, in]``.
        shape (Sequence[int]): Input grid.
        out_coords (Tensor): Output sites ``[M, ndim]`` in ``out_shape``.
        rows (Tensor, optional): :func:`pairs` of these sites, when known.

    Returns:
        Tensor: ``[M, out]``.
    """
    cin, cout = kern.shape[-2], kern.shape[-1]
    if rows is None:
        rows = pairs(kind, tuple(kern.shape[:coords.shape[1]]), coords, shape, out_coords,
                     stride, padding, dilation)
    padded = torch.cat([feats, feats.new_zeros(1, cin)])  # row -1: no input site
    gathered = padded[rows]                                 # [M, V, in]
    return gathered.reshape(len(out_coords), -1) @ kern.reshape(-1, cout).to(feats.dtype)


def covering(rows: torch.Tensor) -> torch.Tensor:
    """Few output sites that together use every kernel offset any site uses.

    Comparing outputs there is a complete check: a kernel that differs at some
    offset changes (for random inputs) the output of a site using that offset.
    """
    valid = rows >= 0
    need = valid.any(0)
    covered = torch.zeros_like(need)
    chosen = []
    while bool((need & ~covered).any()):
        j = int((valid & ~covered).sum(1).argmax())
        chosen.append(j)
        covered |= valid[j]
    return torch.tensor(chosen, dtype=torch.long)


_PAIRS: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def pairs(kind: str, kernel: Sequence[int], coords: torch.Tensor, shape: Sequence[int],
          out_coords: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
          dilation: Sequence[int]) -> torch.Tensor:
    """``[M, V]``: the input row each output site takes at each kernel offset (-1: none).

    Cached per geometry and sites (modules of one config share their probe).
    """
    n = coords.shape[1]
    key = (kind, tuple(kernel), tuple(shape), tuple(stride), tuple(padding), tuple(dilation),
           len(coords), len(out_coords))
    hit = _PAIRS.get(key)
    if hit is not None and torch.equal(hit[0], coords) and torch.equal(hit[1], out_coords):
        return hit[2]
    offs = torch.tensor(list(itertools.product(*[range(k) for k in kernel])),
                        dtype=torch.long).reshape(-1, n)
    if kind == 'pointwise':
        offs, stride, padding = offs * 0, (1, ) * n, (0, ) * n
    elif kind == 'subm':
        stride = (1, ) * n
        padding = tuple(k // 2 * d for k, d in zip(kernel, dilation))
    st = torch.tensor(stride, dtype=torch.long)
    pd = torch.tensor(padding, dtype=torch.long)
    dl = torch.tensor(dilation, dtype=torch.long)
    o = out_coords[:, None, :]
    if kind in ('transposed', 'inverse'):  # o = i * stride - padding + k * dilation
        num = o + pd - offs[None] * dl
        ok = (torch.remainder(num, st) == 0).all(-1)
        src = torch.div(num, st, rounding_mode='floor')
    else:                                  # i = o * stride - padding + k * dilation
        src = o * st - pd + offs[None] * dl
        ok = torch.ones(src.shape[:2], dtype=torch.bool)
    rows = _rows(_lookup(coords, shape), src.reshape(-1, n), shape).reshape(src.shape[:2])
    rows[~ok] = -1
    if len(_PAIRS) > 64:
        _PAIRS.clear()
    _PAIRS[key] = (coords.clone(), out_coords.clone(), rows)
    return rows


def _spconv_run(module: nn.Module, weight: torch.Tensor, probe: _Probe
                ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, ...], torch.Tensor,
                           torch.Tensor, Tuple[int, ...]]:
    """Run the module on the probe with ``weight``: (out coords, out feats, out shape,
    input coords, input feats, input shape) — for an inverse conv the input is the
    paired conv's output."""
    import spconv.pytorch as spconv
    from torch.func import functional_call
    dev = weight.device
    idx = torch.cat([torch.zeros(len(probe.coords), 1, dtype=torch.long), probe.coords], 1)
    x = spconv.SparseConvTensor(probe.feats.float().to(dev), idx.int().to(dev),
                                list(probe.shape), 1)
    coords, feats, shape = probe.coords, probe.feats, probe.shape
    if probe.kind == 'inverse':
        pair_cls = {2: spconv.SparseConv2d, 3: spconv.SparseConv3d}.get(probe.n)
        if pair_cls is None:
            raise NotImplementedError(f'no {probe.n}-D spconv conv to pair the inverse with')
        pair = pair_cls(probe.feats.shape[1], probe.feats.shape[1], list(probe.kernel),
                        stride=list(probe.pair_stride), padding=list(probe.pair_padding),
                        bias=False, indice_key=module.indice_key).to(dev)
        with torch.no_grad():
            y = pair(x)
        coords = y.indices[:, 1:].long().cpu()
        shape = tuple(int(s) for s in y.spatial_shape)
        feats = torch.randn(len(coords), probe.feats.shape[1], generator=probe.gen)
        x = y.replace_feature(feats.to(dev))
    # without its bias: the bias is not converted, and spconv 2.3.8 refuses a bias
    # on CPU in eval mode ("cpu don't support act and bias", ``bias_for_infer``)
    params = {'weight': weight.float()}
    if getattr(module, 'bias', None) is not None:
        params['bias'] = None
    with torch.no_grad():
        out = functional_call(module, params, (x, ))
    return (out.indices[:, 1:].long().cpu(), out.features.float().cpu(),
            tuple(int(s) for s in out.spatial_shape), coords, feats, shape)


def _out_sites(kind: str, coords: torch.Tensor, shape: Sequence[int], kernel: Sequence[int],
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
               out_padding: Sequence[int]) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Output sites by definition (for a module that is not run): every site that
    receives at least one input."""
    n = coords.shape[1]
    if kind in ('pointwise', 'subm'):
        return coords, tuple(shape)
    if kind == 'conv':
        oshape = tuple((e + 2 * p - d * (k - 1) - 1) // s + 1 for e, p, d, k, s in zip(
            shape, padding, dilation, kernel, stride))
    else:
        oshape = tuple((e - 1) * s - 2 * p + d * (k - 1) + op + 1 for e, p, d, k, s, op in zip(
            shape, padding, dilation, kernel, stride, out_padding))
    allc = torch.tensor(list(itertools.product(*[range(e) for e in oshape])),
                        dtype=torch.long).reshape(-1, n)
    rows = pairs(kind, kernel, coords, shape, allc, stride, padding, dilation)
    return allc[(rows >= 0).any(1)], oshape


def _by_definition(probe: _Probe, kern: torch.Tensor):
    """Run a module's function through its layout's definition: (out coords, out feats,
    out shape, input coords, input feats, input shape)."""
    kind = probe.kind
    ic, ifeats, ishape = probe.coords, probe.feats, probe.shape
    stride, padding = probe.stride, probe.padding
    if kind == 'inverse':  # the paired strided conv's output is the input
        stride, padding = probe.pair_stride, probe.pair_padding
        ic, ishape = _out_sites('conv', probe.coords, probe.shape, probe.kernel, stride,
                                padding, probe.dilation, probe.out_padding)
        ifeats = torch.randn(len(ic), probe.feats.shape[1], generator=probe.gen)
        oc, oshape = probe.coords, probe.shape
    else:
        oc, oshape = _out_sites(kind, ic, ishape, probe.kernel, stride, padding,
                                probe.dilation, probe.out_padding)
    live = reference(kind, kern, ic, ifeats, ishape, oc, oshape, stride, padding,
                     probe.dilation)
    return oc, live, oshape, ic, ifeats, ishape


def _source_error(entry, probe: _Probe, oc, live, oshape, ic, ifeats, ishape) -> float:
    """Largest relative error of ``live`` against the checkpoint weight's function."""
    src = entry.facts.get('spconv_layout', (module_layout(entry.module), ) * 2)[0]
    rev = bool(entry.facts.get('axis_order', (False, None))[0])
    weight = entry.source.detach().cpu().float()
    for _, fn in entry.steps:  # a planned change of function: the reference includes it
        if getattr(fn, CHANGES_FUNCTION, False) is True:
            weight = fn(weight)
    kern = decode(weight, src, module_pointwise(entry.module))
    flip = (lambda c: c.flip(1)) if rev else (lambda c: c)
    rv = (lambda t: tuple(reversed(t))) if rev else (lambda t: tuple(t))
    if probe.kind == 'inverse':
        stride, padding = probe.pair_stride, probe.pair_padding
    else:
        stride, padding = probe.stride, probe.padding
    args = (flip(ic), rv(ishape), flip(oc), rv(stride), rv(padding), rv(probe.dilation))
    rows = pairs(probe.kind, tuple(kern.shape[:probe.n]), *args)
    sel = covering(rows)
    ref = reference(probe.kind, kern, flip(ic), ifeats, rv(ishape), flip(oc)[sel], rv(oshape),
                    rv(stride), rv(padding), rv(probe.dilation), rows=rows[sel])
    if not ref.numel():
        return 0.0
    scale = max(float(ref.abs().max()), 1.0)
    return float((live[sel] - ref).abs().max()) / scale


def _conf(module: nn.Module, probe: _Probe, rev: bool) -> dict:
    """A sparse conv's configuration, its spatial axes reversed when ``rev``."""
    rv = (lambda t: tuple(reversed(t))) if rev else tuple
    return dict(n=probe.n, kernel=rv(probe.kernel), stride=rv(probe.stride),
                padding=rv(probe.padding), dilation=rv(probe.dilation),
                out_padding=rv(probe.out_padding),
                pair_stride=rv(getattr(probe, 'pair_stride', (1, ) * probe.n)),
                pair_padding=rv(getattr(probe, 'pair_padding', (0, ) * probe.n)),
                subm=bool(getattr(module, 'subm', False)),
                transposed=bool(getattr(module, 'transposed', False)),
                inverse=bool(getattr(module, 'inverse', False)),
                cin=int(module.in_channels), cout=int(module.out_channels),
                indice_key=getattr(module, 'indice_key', None))


def mmcv_forward(conf: dict, weight: torch.Tensor, coords: torch.Tensor, feats: torch.Tensor,
                 shape: Sequence[int], out_coords: torch.Tensor) -> torch.Tensor:
    """What MMCV's ``SparseConvolution`` computes at ``out_coords`` with its weight,
    written from MMCV 2.1.0 (``mmcv/ops/sparse_conv.py``, ``sparse_ops.py``) and
    computed densely with ``torch.nn.functional``, without this package's layouts.

    MMCV holds ``weight`` as ``[*k, in, out]``. Kernel volume 1 (``conv1x1``,
    whatever the stride and kind): ``mm(features, weight.view(in, out))`` at the
    input's own sites. Otherwise ``indice_conv`` views the weight as ``[kv, in, out]``
    and adds ``x[i] @ weight[k]`` over the pairs of offset ``k`` (C order):
    ``i = o * stride - padding + k * dilation`` (submanifold: stride 1, padding
    ``k // 2 * dilation``), transposed and inverse convs the other way round
    (an inverse conv with the paired conv's stride and padding): a correlation,
    ``F.conv{n}d`` with the weight as ``[out, in, *k]`` (``F.conv_transpose{n}d``
    with ``[in, out, *k]``). 1-, 2- and 3-D.

    Returns:
        Tensor: ``[M, out]`` in float64.
    """
    n = conf['n']
    w = weight.detach().cpu().double()
    x64 = feats.detach().cpu().double()
    if w.shape[:n].numel() == 1:  # conv1x1: the input's sites, stride ignored
        rows = _rows(_lookup(coords, shape), out_coords, shape)
        padded = torch.cat([x64, x64.new_zeros(1, x64.shape[1])])
        return padded[rows] @ w.reshape(conf['cin'], conf['cout'])
    if n not in (1, 2, 3):
        raise NotImplementedError(f'no dense {n}-D conv in torch.nn.functional')
    grow = 1 if conf['inverse'] or conf['transposed'] else 0  # outputs up to the last k
    dense = x64.new_zeros(1, x64.shape[1], *[int(e) + grow for e in shape])
    dense[(0, slice(None), *coords.t())] = x64.t()
    tw = w.permute(n + 1, n, *range(n))  # [out, in, *k]
    conv = getattr(F, f'conv{n}d')
    if conf['subm']:
        pad = tuple(k // 2 * d for k, d in zip(conf['kernel'], conf['dilation']))
        y = conv(dense, tw, padding=pad, dilation=conf['dilation'])
    elif conf['inverse'] or conf['transposed']:
        stride, padding = ((conf['pair_stride'], conf['pair_padding']) if conf['inverse'] else
                           (conf['stride'], conf['padding']))
        y = getattr(F, f'conv_transpose{n}d')(dense, tw.transpose(0, 1), stride=stride,
                                              padding=padding, dilation=conf['dilation'])
    else:
        y = conv(dense, tw, stride=conf['stride'], padding=conf['padding'],
                 dilation=conf['dilation'])
    ext = [max(int(y.shape[2 + j]), int(out_coords[:, j].max()) + 1 if len(out_coords) else 0)
           for j in range(n)]
    full = y.new_zeros(*y.shape[:2], *ext)
    full[(slice(None), slice(None), *[slice(0, e) for e in y.shape[2:]])] = y
    return full[(0, slice(None), *out_coords.t())].t()


def _spconv_twin(conf: dict) -> nn.Module:
    """The spconv 2.x module of ``conf``'s kind and configuration (no bias)."""
    import spconv.pytorch as spconv
    n, k = conf['n'], list(conf['kernel'])
    common = dict(bias=False, indice_key=conf['indice_key'])
    if conf['subm']:
        return getattr(spconv, f'SubMConv{n}d')(conf['cin'], conf['cout'], k,
                                                dilation=list(conf['dilation']), **common)
    if conf['inverse']:
        return getattr(spconv, f'SparseInverseConv{n}d')(conf['cin'], conf['cout'], k,
                                                         **common)
    geo = dict(stride=list(conf['stride']), padding=list(conf['padding']),
               dilation=list(conf['dilation']))
    if conf['transposed']:
        return getattr(spconv, f'SparseConvTranspose{n}d')(conf['cin'], conf['cout'], k,
                                                           **geo, **common)
    return getattr(spconv, f'SparseConv{n}d')(conf['cin'], conf['cout'], k, **geo, **common)


def _reversed_probe(probe: _Probe) -> _Probe:
    """The probe on the reversed spatial axes (sites flipped, geometry reversed)."""
    out = copy.copy(probe)
    out.coords = probe.coords.flip(1)
    for name in ('shape', 'kernel', 'stride', 'padding', 'dilation', 'out_padding',
                 'pair_stride', 'pair_padding'):
        if hasattr(probe, name):
            setattr(out, name, tuple(reversed(getattr(probe, name))))
    return out


def _mmcv_sites(probe: _Probe):
    """Input sites and features, and output sites, of an MMCV module's probe."""
    if probe.kind == 'inverse':
        ic, ishape = _out_sites('conv', probe.coords, probe.shape, probe.kernel,
                                probe.pair_stride, probe.pair_padding, probe.dilation,
                                probe.out_padding)
        feats = torch.randn(len(ic), probe.feats.shape[1], generator=probe.gen)
        return ic, feats, ishape, probe.coords
    oc, _ = _out_sites(probe.kind, probe.coords, probe.shape, probe.kernel, probe.stride,
                       probe.padding, probe.dilation, probe.out_padding)
    return probe.coords, probe.feats, probe.shape, oc


def _mmcv_target_error(entry, probe: _Probe) -> Optional[Tuple[float, str]]:
    """An MMCV target checked without this package's layout definitions: the converted
    weight's function by MMCV's reading (:func:`mmcv_forward`) against the checkpoint
    weight's function, run by spconv itself for a spconv 2.x source (a module of the
    same kind and configuration, on the source's axis order), by MMCV's reading for an
    MMCV one. None when no such reference exists here (spconv absent, 4-D)."""
    src = entry.facts.get('spconv_layout', (MMCV, ) * 2)[0]
    rev = bool(entry.facts.get('axis_order', (False, None))[0])
    live_conf = _conf(entry.module, probe, False)
    src_conf = _conf(entry.module, probe, rev)
    flip = (lambda c: c.flip(1)) if rev else (lambda c: c)
    try:
        if src == SPCONV2:
            from .compat import spconv_available
            if not spconv_available():
                return None
            sp = _reversed_probe(probe) if rev else probe
            oc, ref, _, ic, ifeats, ishape = _run_one_thread(
                _spconv_twin(src_conf), entry.source.detach().cpu().float(), sp)
            oc, ic = flip(oc), flip(ic)
            ishape = tuple(reversed(ishape)) if rev else tuple(ishape)
            if volume(probe.kernel) == 1 and not live_conf['subm']:
                # MMCV keeps the input's sites; spconv's strided path maps o <- o*s - p
                st = torch.tensor(live_conf['stride'])
                pd = torch.tensor(live_conf['padding'])
                oc = (torch.div(oc + pd, st, rounding_mode='floor')
                      if live_conf['transposed'] else oc * st - pd)
            how = 'spconv ran the source; MMCV\'s reading, dense'
        else:
            ic, ifeats, ishape, oc = _mmcv_sites(probe)
            ref = mmcv_forward(src_conf, entry.source, flip(ic), ifeats,
                               tuple(reversed(ishape)) if rev else ishape, flip(oc))
            how = 'MMCV\'s reading, dense'
        live = mmcv_forward(live_conf, entry.materialize(), ic, ifeats, ishape, oc)
    except NotImplementedError:
        return None
    ref = ref.double()
    if live.shape != ref.shape or not ref.numel():  # no output to compare: not proven
        return float('inf'), how
    scale = max(float(ref.abs().max()), 1.0)
    return float((live - ref).abs().max()) / scale, how


def _run_one_thread(module, weight, probe):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _spconv_run(module, weight, probe)
    finally:
        torch.set_num_threads(threads)


def verify_group(entries: Sequence) -> List[Tuple[float, str]]:
    """Check entries whose modules share class, config and input channels.

    spconv modules of one group run once, their converted weights stacked along
    the output channels (spconv's general path reads the output count from the
    weight; output channels are independent), each module's outputs then
    compared with its own reference. Others are checked one by one.

    Returns:
        list: ``(error, how)`` per entry: ``how`` is ``'run'`` (the module ran)
        or ``'definition'`` (compared through its layout's definition).
    """
    module = entries[0].module
    probe = _Probe(module)
    out: List[Tuple[float, str]] = []
    if module_layout(module) == SPCONV2:
        rows = [tuple(e.target.shape) for e in entries]
        stacked = entries[0].target.new_empty((sum(r[0] for r in rows), *rows[0][1:]),
                                              dtype=torch.float32)
        start = 0
        for e, r in zip(entries, rows):  # one converted weight alive at a time
            stacked[start:start + r[0]].copy_(e.materialize().detach())
            start += r[0]
        oc, live, oshape, ic, ifeats, ishape = _run_one_thread(module, stacked, probe)
        del stacked
        start = 0
        for e, r in zip(entries, rows):
            part = live[:, start:start + r[0]]
            start += r[0]
            out.append((_source_error(e, probe, oc, part, oshape, ic, ifeats, ishape), 'run'))
        return out
    for e in entries:
        found = _mmcv_target_error(e, probe) if module_layout(e.module) == MMCV else None
        if found is None:  # no independent reference here: the layout's definition
            kern_live = decode(e.materialize().detach().cpu().float(),
                               module_layout(e.module), module_pointwise(e.module))
            oc, live, oshape, ic, ifeats, ishape = _by_definition(probe, kern_live)
            found = (_source_error(e, probe, oc, live, oshape, ic, ifeats, ishape),
                     'definition')
        out.append(found)
    return out


def verify_entry(entry) -> Tuple[float, str]:
    """:func:`verify_group` of one entry."""
    return verify_group([entry])[0]


def _group_key(e) -> tuple:
    m = e.module
    if module_layout(m) != SPCONV2 or _kind(m) == 'pointwise':  # conv1x1 reads out_channels
        return ('alone', id(e))
    return (type(m), _kind(m), tuple(module_geometry(m).kernel), m.in_channels,
            tuple(getattr(m, 'stride', ())), tuple(getattr(m, 'padding', ())),
            tuple(getattr(m, 'dilation', ())), tuple(getattr(m, 'output_padding', ())),
            getattr(m, 'indice_key', None), e.target.device)


def verify_entries(entries: Sequence, mode, report) -> Dict[str, str]:
    """Check the planned sparse kernels ``verify=mode`` selects.

    Adds to ``report.verified`` and ``report.verify_error``.

    Returns:
        dict: Model key -> problem, for each kernel that computes another function
        than the checkpoint's (or whose probe could not run).
    """
    problems: Dict[str, str] = {}
    groups: Dict[tuple, list] = {}
    for e in entries:
        if wants_verify(e, mode):
            groups.setdefault(_group_key(e), []).append(e)
    for group in groups.values():
        try:
            results = verify_group(group)
        except Exception as exc:  # a probe that cannot run is a failed check
            for e in group:
                src, dst = e.facts.get('spconv_layout', (module_layout(e.module), ) * 2)
                problems[e.key] = (f'{e.filename}: verify {e.module_name} '
                                   f'({type(e.module).__name__}, {src} -> {dst}): the probe '
                                   f'failed: {type(exc).__name__}: {exc}')
            continue
        for e, (err, how) in zip(group, results):
            src, dst = e.facts.get('spconv_layout', (module_layout(e.module), ) * 2)
            rev = bool(e.facts.get('axis_order', (False, None))[0])
            report.verified += 1
            report.verify_error = max(report.verify_error, err)
            low = e.target.dtype in (torch.float16, torch.bfloat16)
            tol = TOLERANCE_LOW if low else TOLERANCE.get(e.target.dtype, 1e-4)
            if err > tol:
                steps = ', '.join(n for n, _ in e.steps) or 'none'
                problems[e.key] = (
                    f'{e.filename}: {e.file_key} -> {e.module_name} ({type(e.module).__name__}'
                    f', kernel {list(module_geometry(e.module).kernel)}): the converted kernel '
                    f'computes another function than the checkpoint\'s (layout {src} -> {dst}'
                    f'{", axes reversed" if rev else ""}; repairs: {steps}): largest relative '
                    f'error {err:.3g} on a probe ({how}), tolerance {tol:g}')
    return problems
