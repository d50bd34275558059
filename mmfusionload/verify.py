"""``verify``: prove a converted sparse-conv kernel by what the module computes.

Before anything is written into the model, every sparse-conv module whose
kernel a function-changing repair touched (layout, axis order, or any other
registered repair except a dtype cast) is run on a small random probe with the
converted weight — a functional call, the live module itself is not modified —
and its output is compared with a reference computed here from the
**checkpoint's** weight under the source's semantics: the function kernel
:func:`~mmfusionload.sparse_layouts.decode` reads from the source layout,
applied on the source's axis order by an explicit sum over kernel offsets
(the definition of a sparse convolution, no library code). A mismatch is a
problem naming the module, the layouts and the error; the load then fails with
the model untouched.

The probe is a full block of active sites as large as one receptive field in
every dim (27 sites for a 3x3x3 kernel), so every kernel offset and every
channel takes part; features are random (a fixed seed). spconv runs with one
CPU thread here (its CPU kernels race with several). A module that cannot run
where it lives (MMCV's sparse conv on CPU) is checked by its layout's
definition instead.
"""
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .repairs.spconv_layout import module_geometry, module_layout, module_pointwise
from .sparse_layouts import SPCONV2, decode, volume

# Steps that keep the function a kernel computes (up to rounding).
PLAIN_STEPS = ('cast', )
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


def wants_verify(entry, mode) -> bool:
    """Whether ``entry`` (a planned tensor) is checked under ``verify=mode``."""
    if mode is False or entry.skip is not None:
        return False
    if module_layout(entry.module) is None or entry.param_name != 'weight':
        return False
    return mode is True or any(name not in PLAIN_STEPS for name, _ in entry.steps)


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
        self.feats = torch.randn(len(self.coords), g.cin, generator=gen, dtype=torch.float64)
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
              dilation: Sequence[int]) -> torch.Tensor:
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

    Returns:
        Tensor: ``[M, out]``.
    """
    n = coords.shape[1]
    cin, cout = kern.shape[-2], kern.shape[-1]
    flat = kern.reshape(-1, cin, cout)
    out = torch.zeros(len(out_coords), cout, dtype=feats.dtype)
    if kind == 'pointwise':
        rows = _rows(_lookup(coords, shape), out_coords, shape)
        return feats[rows] @ flat[0]
    offsets = list(itertools.product(*[range(k) for k in kern.shape[:n]]))
    if kind == 'subm':
        stride = (1, ) * n
        padding = tuple(k // 2 * d for k, d in zip(kern.shape[:n], dilation))
    st = torch.tensor(stride, dtype=torch.long)
    pd = torch.tensor(padding, dtype=torch.long)
    dl = torch.tensor(dilation, dtype=torch.long)
    if kind in ('conv', 'subm'):
        table = _lookup(coords, shape)
        for j, off in enumerate(offsets):
            src = out_coords * st - pd + torch.tensor(off) * dl
            rows = _rows(table, src, shape)
            ok = rows >= 0
            if ok.any():
                out[ok] += feats[rows[ok]] @ flat[j]
        return out
    table = _lookup(out_coords, out_shape)
    for j, off in enumerate(offsets):
        dst = coords * st - pd + torch.tensor(off) * dl
        rows = _rows(table, dst, out_shape)
        ok = rows >= 0
        if ok.any():
            out.index_add_(0, rows[ok], feats[ok] @ flat[j])
    return out


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
        feats = torch.randn(len(coords), probe.feats.shape[1], generator=probe.gen,
                            dtype=torch.float64)
        x = y.replace_feature(feats.float().to(dev))
    params = {'weight': weight.float()}
    if getattr(module, 'bias', None) is not None:
        params['bias'] = torch.zeros_like(module.bias, dtype=torch.float32)
    with torch.no_grad():
        out = functional_call(module, params, (x, ))
    return (out.indices[:, 1:].long().cpu(), out.features.double().cpu(),
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
    ones = torch.ones(len(coords), 1, dtype=torch.float64)
    hit = reference(kind, torch.ones(*kernel, 1, 1, dtype=torch.float64), coords, ones, shape,
                    allc, oshape, stride, padding, dilation)
    return allc[hit[:, 0] > 0], oshape


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
        ifeats = torch.randn(len(ic), probe.feats.shape[1], generator=probe.gen,
                             dtype=torch.float64)
        oc, oshape = probe.coords, probe.shape
    else:
        oc, oshape = _out_sites(kind, ic, ishape, probe.kernel, stride, padding,
                                probe.dilation, probe.out_padding)
    live = reference(kind, kern, ic, ifeats, ishape, oc, oshape, stride, padding,
                     probe.dilation)
    return oc, live, oshape, ic, ifeats, ishape


def verify_entry(entry) -> Tuple[float, str]:
    """Largest relative error of the converted module against the source's function.

    Returns:
        tuple: ``(error, how)``: ``how`` is ``'run'`` (the module ran) or
        ``'definition'`` (compared through its layout's definition).
    """
    module = entry.module
    dst = module_layout(module)
    src, dst = entry.facts.get('spconv_layout', (dst, dst))
    rev = bool(entry.facts.get('axis_order', (False, None))[0])
    probe = _Probe(module)
    weight = entry.materialize()
    kind = probe.kind
    if dst == SPCONV2:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            oc, live, oshape, ic, ifeats, ishape = _spconv_run(module, weight.detach(), probe)
        finally:
            torch.set_num_threads(threads)
        how = 'run'
    else:
        kern_live = decode(weight.detach().cpu().double(), dst, module_pointwise(module))
        oc, live, oshape, ic, ifeats, ishape = _by_definition(probe, kern_live)
        how = 'definition'
    # the source's function, on the source's axis order
    kern = decode(entry.source.detach().cpu().double(), src, module_pointwise(module))
    flip = (lambda c: c.flip(1)) if rev else (lambda c: c)
    rv = (lambda t: tuple(reversed(t))) if rev else (lambda t: tuple(t))
    if kind == 'inverse':
        stride, padding = probe.pair_stride, probe.pair_padding
    else:
        stride, padding = probe.stride, probe.padding
    ref = reference(kind, kern, flip(ic), ifeats, rv(ishape), flip(oc), rv(oshape), rv(stride),
                    rv(padding), rv(probe.dilation))
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1.0)
    err = float((live - ref).abs().max()) / scale if ref.numel() else 0.0
    return err, how


def verify_entries(entries: Sequence, mode, report) -> Dict[str, str]:
    """Check the planned sparse kernels ``verify=mode`` selects.

    Adds to ``report.verified`` and ``report.verify_error``.

    Returns:
        dict: Model key -> problem, for each kernel that computes another function
        than the checkpoint's (or whose probe could not run).
    """
    problems: Dict[str, str] = {}
    for e in entries:
        if not wants_verify(e, mode):
            continue
        src, dst = e.facts.get('spconv_layout', (module_layout(e.module), ) * 2)
        rev = bool(e.facts.get('axis_order', (False, None))[0])
        try:
            err, how = verify_entry(e)
        except Exception as exc:  # a probe that cannot run is a failed check
            problems[e.key] = (f'{e.filename}: verify {e.module_name} '
                               f'({type(e.module).__name__}, {src} -> {dst}): the probe '
                               f'failed: {type(exc).__name__}: {exc}')
            continue
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


def verify_plans(plans: Sequence) -> List[str]:
    """Check every planned sparse kernel its source's ``verify`` option selects.

    Fills each plan's report (``verified``, ``verify_error``) and returns the
    problems: one per module whose converted kernel computes another function.
    """
    problems: List[str] = []
    for plan in plans:
        found = verify_entries(plan.to_load, getattr(plan.spec, 'verify', 'auto'), plan.report)
        problems += list(found.values())
    return problems
