"""OpenPCDet LiDAR backbones -> MMDetection3D ``SparseEncoder`` / ``SECOND`` / ``SECONDFPN``.

Facts read from OpenPCDet (``pcdet/models/backbones_3d/spconv_backbone.py``,
``pcdet/models/backbones_2d/base_bev_backbone.py``) and MMDetection3D 1.4.0
(``SparseEncoder``, ``SparseBasicBlock``, ``SECOND``, ``SECONDFPN``):

- ``VoxelBackBone8x`` / ``VoxelResBackBone8x``: ``conv_input`` (SubM conv, BN), stages
  ``conv1..convN``, ``conv_out`` (kernel ``(3, 1, 1)``, stride ``(2, 1, 1)``); every stage
  after the first *starts* with a stride-2 ``SparseConv3d`` block. A conv block is
  ``SparseSequential(conv, BN, ReLU)`` (keys ``.0``, ``.1``); a ``SparseBasicBlock`` is
  ``conv1``/``bn1``/``conv2``/``bn2`` whose convs carry a bias. Voxel coordinates are
  ``(batch, z, y, x)``.
- MMDetection3D's ``SparseEncoder``: ``conv_input``, ``encoder_layers.encoder_layer{i}``,
  ``conv_out``, coordinates ``(batch, z, y, x)``. With ``block_type='conv_module'`` a
  stage starts with its down-sampling conv, as in OpenPCDet; with ``'basicblock'`` the
  down-sampling conv *ends* the previous stage, and the blocks' convs have no bias.
- A conv bias followed by BatchNorm is exactly a shift of the BN's running mean:
  ``BN(Wx + b)`` uses ``(Wx + b - mean)``, the same as ``(Wx - (mean - b))`` in eval
  mode, and the bias cancels against the batch mean in train mode. The bias is folded
  into ``running_mean``; a bias without a following BN is an error.
- ``BaseBEVBackbone``: ``blocks.i`` = ``ZeroPad2d(1)``, conv (padding 0), BN, ReLU, then
  ``(conv, BN, ReLU)`` per layer; ``deblocks.i`` = (de)conv, BN, ReLU. ``SECOND``'s
  ``blocks.i`` = conv (padding 1), BN, ReLU, ...: the same function shifted by one
  index; ``SECONDFPN``'s ``deblocks.i`` have OpenPCDet's names. An extra final deblock
  (more upsample strides than levels) has no ``SECONDFPN`` counterpart and is left out.
- Detection heads (``dense_head``, ``roi_head``, ``point_head``) are parameterised
  differently and are not converted; ``vfe``/``map_to_bev_module`` keep their names.

The mapping is derived from the structure of the keys (stage and block indices), so
other depths and channel counts map the same way. Sparse kernels keep the layout the
file has (the spconv-layout repair decides it from each kernel's shape). The preset
also tells the axis-order decision what the file shows (:func:`openpcdet_orders`):
the encoder's order from ``conv_out``'s kernel, and the BEV layers' map orientation;
the axis-order and BEV-order repairs compare them with the live model.
"""
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..sparse.axis_order import kernel_order
from ..errors import FusionLoadError
from ..checkpoint.identify import Fingerprint, having, register_fingerprint
from ..load.presets import KeyPreset, register_preset
from ..sparse.layouts import LAYOUT_DEFS, ZYX

SRC_3D, SRC_2D = 'backbone_3d.', 'backbone_2d.'
DST_3D, DST_2D, DST_NECK = 'pts_middle_encoder.', 'pts_backbone.', 'pts_neck.'
HEADS = ('dense_head.', 'roi_head.', 'point_head.')
BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


@dataclass
class Unit:
    """One structural unit of a sparse backbone: a conv block or a basic block."""
    kind: str  # 'conv' or 'block'
    src: str   # key prefix in the file (without backbone_3d.)


def _conv_bn(state: Mapping[str, torch.Tensor], conv: str, bn: str, dst_conv: str,
             dst_bn: str, out: 'OrderedDict[str, torch.Tensor]', used: set) -> None:
    """A sparse conv and its BatchNorm under new names, the conv's bias folded into the BN.

    ``BN(Wx + b)`` normalises ``Wx + b - mean``: the same as ``Wx - (mean - b)``. The
    target conv has no bias, so ``running_mean - b`` replaces it.
    """
    if conv + '.weight' not in state:
        raise FusionLoadError([f'OpenPCDet: {SRC_3D}{conv}.weight is missing'],
                              'openpcdet structure')
    out[dst_conv + '.weight'] = state[conv + '.weight']
    used.add(conv + '.weight')
    bias = state.get(conv + '.bias')
    for name in BN_KEYS:
        if bn + '.' + name in state:
            out[f'{dst_bn}.{name}'] = state[bn + '.' + name]
            used.add(bn + '.' + name)
    if bias is not None:
        mean = state.get(bn + '.running_mean')
        if mean is None or tuple(mean.shape) != tuple(bias.shape):
            raise FusionLoadError(
                [f'OpenPCDet: {SRC_3D}{conv}.bias {list(bias.shape)} has no following '
                 'BatchNorm running_mean of its size to fold into, and the target conv '
                 'has no bias'], 'openpcdet bias')
        out[dst_bn + '.running_mean'] = mean - bias
        used.add(conv + '.bias')


def _units(state: Mapping[str, torch.Tensor]) -> Tuple[Unit, List[List[Unit]], Unit]:
    """``conv_input``, the stages' units in order, ``conv_out``."""
    stages: Dict[int, Dict[int, Unit]] = {}
    for k in state:
        m = re.match(r'^conv(\d+)\.(\d+)\.(conv1|0)\.weight$', k)
        if m:
            kind = 'block' if m.group(3) == 'conv1' else 'conv'
            stages.setdefault(int(m.group(1)), {})[int(m.group(2))] = Unit(
                kind, f'conv{m.group(1)}.{m.group(2)}')
    if 'conv_input.0.weight' not in state or 'conv_out.0.weight' not in state or not stages:
        raise FusionLoadError(['OpenPCDet: backbone_3d needs conv_input, conv1.. and '
                               'conv_out (VoxelBackBone8x / VoxelResBackBone8x)'],
                              'openpcdet structure')
    numbers = sorted(stages)
    if numbers != list(range(1, len(numbers) + 1)):
        raise FusionLoadError([f'OpenPCDet: backbone_3d stages {numbers} are not conv1..convN'],
                              'openpcdet structure')
    ordered = []
    for n in numbers:
        items = stages[n]
        if sorted(items) != list(range(len(items))):
            raise FusionLoadError([f'OpenPCDet: conv{n} items {sorted(items)} are not '
                                   f'0..{len(items) - 1}'], 'openpcdet structure')
        ordered.append([items[j] for j in range(len(items))])
    return Unit('conv', 'conv_input'), ordered, Unit('conv', 'conv_out')


def convert_backbone_3d(state: Mapping[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """OpenPCDet ``backbone_3d`` keys (without the prefix) -> ``SparseEncoder`` keys.

    Plain conv stages map onto ``block_type='conv_module'`` (same stage partition);
    stages with ``SparseBasicBlock``s onto ``block_type='basicblock'``, where each
    stage's leading down-sampling conv moves to the end of the previous stage.
    """
    first, stages, last = _units(state)
    basic = any(u.kind == 'block' for s in stages for u in s)
    if basic:
        for i, s in enumerate(stages[1:], start=2):
            if s[0].kind != 'conv':
                raise FusionLoadError([f'OpenPCDet: conv{i} does not start with a '
                                       'down-sampling conv; no basicblock SparseEncoder has '
                                       'this structure'], 'openpcdet structure')
        target: List[List[Unit]] = []
        for i, s in enumerate(stages):
            own = s[1:] if i > 0 else list(s)
            nxt = [stages[i + 1][0]] if i + 1 < len(stages) else []
            target.append(own + nxt)
    else:
        target = stages
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    used: set = set()

    def put(unit: Unit, dst: str) -> None:
        if unit.kind == 'conv':
            _conv_bn(state, unit.src + '.0', unit.src + '.1', dst + '.0', dst + '.1', out, used)
        else:
            for conv, bn in (('conv1', 'bn1'), ('conv2', 'bn2')):
                _conv_bn(state, f'{unit.src}.{conv}', f'{unit.src}.{bn}', f'{dst}.{conv}',
                         f'{dst}.{bn}', out, used)

    put(first, 'conv_input')
    for i, units in enumerate(target, start=1):
        for j, unit in enumerate(units):
            put(unit, f'encoder_layers.encoder_layer{i}.{j}')
    put(last, 'conv_out')
    leftover = [k for k in state if k not in used]
    if leftover:
        raise FusionLoadError([f'OpenPCDet: {SRC_3D} tensors with no place in a '
                               f'SparseEncoder: {", ".join(leftover[:8])}'],
                              'openpcdet structure')
    return out


State = 'OrderedDict[str, torch.Tensor]'


def convert_backbone_2d(state: Mapping[str, torch.Tensor]) -> Tuple[State, State, List[str]]:
    """``BaseBEVBackbone`` keys -> (``SECOND`` keys, ``SECONDFPN`` keys, left-out keys)."""
    blocks: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    neck: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    levels = {int(m.group(1)) for k in state for m in [re.match(r'^blocks\.(\d+)\.', k)] if m}
    left = []
    for k, v in state.items():
        m = re.match(r'^blocks\.(\d+)\.(\d+)\.(.+)$', k)
        if m:
            idx = int(m.group(2))
            if idx == 0:
                raise FusionLoadError([f'OpenPCDet: backbone_2d.{k}: index 0 of a block is '
                                       "BaseBEVBackbone's ZeroPad2d, which holds no tensor"],
                                      'openpcdet structure')
            blocks[f'blocks.{m.group(1)}.{idx - 1}.{m.group(3)}'] = v
            continue
        m = re.match(r'^deblocks\.(\d+)\.(.+)$', k)
        if m and int(m.group(1)) in levels:
            neck[k] = v
        else:
            left.append(k)
    return blocks, neck, left


def openpcdet_to_mmdet3d(state: Mapping[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """An OpenPCDet detector's backbones under MMDetection3D's names.

    ``backbone_3d.*`` -> ``pts_middle_encoder.*``, ``backbone_2d.blocks`` ->
    ``pts_backbone.blocks``, ``backbone_2d.deblocks`` -> ``pts_neck.deblocks``; heads and
    every other key keep their OpenPCDet names (nothing in a MMDetection3D model has
    them, so they are not loaded).
    """
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    b3 = OrderedDict((k[len(SRC_3D):], v) for k, v in state.items() if k.startswith(SRC_3D))
    b2 = OrderedDict((k[len(SRC_2D):], v) for k, v in state.items() if k.startswith(SRC_2D))
    if b3:
        for k, v in convert_backbone_3d(b3).items():
            out[DST_3D + k] = v
    if b2:
        blocks, neck, left = convert_backbone_2d(b2)
        out.update((DST_2D + k, v) for k, v in blocks.items())
        out.update((DST_NECK + k, v) for k, v in neck.items())
        out.update((SRC_2D + k, b2[k]) for k in left)
    for k, v in state.items():
        if not (k.startswith(SRC_3D) or k.startswith(SRC_2D)):
            out[k] = v
    return out


def not_converted(keys) -> List[str]:
    """Groups of an OpenPCDet file the preset does not convert (heads...)."""
    groups = OrderedDict()
    for k in keys:
        if k.startswith(SRC_3D) or re.match(r'^backbone_2d\.(blocks|deblocks)\.', k):
            continue
        g = k.split('.', 1)[0]
        groups[g] = groups.get(g, 0) + 1
    return [f'{g}. ({n})' for g, n in groups.items()]


# OpenPCDet v0.6.0: ``VoxelBackBone8x`` uses ``sparse_shape = grid_size[::-1] + [1, 0, 0]``
# and voxel coordinates ``(batch, z, y, x)``; both ``map_to_bev`` modules give the BEV
# layers a ``(y, x)`` map: ``HeightCompression`` views ``(N, C, D, H, W)`` as
# ``(N, C * D, H, W)``, ``PointPillarScatter`` writes pillars to ``y * nx + x`` of a
# ``(C, ny, nx)`` canvas.
OPENPCDET_BEV = ("OpenPCDet's map_to_bev (HeightCompression, PointPillarScatter) lays the "
                 'BEV map out (y, x), the map of a z-y-x encoder')


def _kernel_order(shape: Tuple[int, ...], out: Optional[int]) -> Optional[str]:
    """The order a 3-D sparse kernel's shape shows: z is the odd extent. Read in
    every layout (spconv 2.x ``[out, *k, in]``, spconv 1.x/MMCV ``[*k, in, out]``,
    spconv 2.0/2.1 Native ``[*k, out, in]``) whose output channels agree with the
    following BatchNorm's (``out``); None unless exactly one order comes out."""
    if len(shape) != 5:
        return None
    readings = [(g.cout, g.kernel)
                for g in (d.geometry(shape) for d in LAYOUT_DEFS.values())]
    found = {kernel_order(k) for c, k in readings if out is None or c == out} - {None}
    return found.pop() if len(found) == 1 else None


def openpcdet_orders(shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tuple[str, str]]:
    """The axis order of an OpenPCDet file's backbones, under the converted prefixes.

    ``backbone_3d``: from its ``conv_out`` kernel (``(3, 1, 1)``: z first), the
    file's own evidence; nothing when the kernel does not show it. ``backbone_2d``:
    the order of that encoder, or, without one in the file, OpenPCDet's BEV map
    layout ``(y, x)``.
    """
    out: Dict[str, Tuple[str, str]] = {}
    key = SRC_3D + 'conv_out.0.weight'
    bn = shapes.get(SRC_3D + 'conv_out.1.weight')
    order = (_kernel_order(tuple(shapes[key]), int(bn[0]) if bn is not None and len(bn) == 1
                           else None) if key in shapes else None)
    if order is not None:
        out[DST_3D] = (order, f'{key} {list(shapes[key])}')
    if any(k.startswith(SRC_2D) for k in shapes):
        bev = out.get(DST_3D) or (ZYX, OPENPCDET_BEV)
        out[DST_2D] = out[DST_NECK] = bev
    return out


# ---------------------------------------------------------------- export (the reverse)

def _mm_units(state: Mapping[str, torch.Tensor]) -> List[List[Unit]]:
    """A ``SparseEncoder``'s ``encoder_layers`` units, stage by stage."""
    stages: Dict[int, Dict[int, Unit]] = {}
    for k in state:
        m = re.match(r'^encoder_layers\.encoder_layer(\d+)\.(\d+)\.(conv1|0)\.weight$', k)
        if m:
            kind = 'block' if m.group(3) == 'conv1' else 'conv'
            stages.setdefault(int(m.group(1)), {})[int(m.group(2))] = Unit(
                kind, f'encoder_layers.encoder_layer{m.group(1)}.{m.group(2)}')
    if 'conv_input.0.weight' not in state or 'conv_out.0.weight' not in state or not stages:
        raise FusionLoadError([f'{DST_3D} needs conv_input, encoder_layers and conv_out (an '
                               "MMDetection3D SparseEncoder) to become OpenPCDet's backbone_3d"],
                              'openpcdet export')
    numbers = sorted(stages)
    if numbers != list(range(1, len(numbers) + 1)):
        raise FusionLoadError([f'{DST_3D}encoder_layers stages {numbers} are not '
                               'encoder_layer1..N'], 'openpcdet export')
    out = []
    for n in numbers:
        items = stages[n]
        if sorted(items) != list(range(len(items))):
            raise FusionLoadError([f'{DST_3D}encoder_layers.encoder_layer{n} items '
                                   f'{sorted(items)} are not 0..{len(items) - 1}'],
                                  'openpcdet export')
        out.append([items[j] for j in range(len(items))])
    return out


def _put_back(state: Mapping[str, torch.Tensor], unit: Unit, dst: str,
              out: 'OrderedDict[str, torch.Tensor]', used: set) -> None:
    """One unit under OpenPCDet's names: a conv block ``.0``/``.1``, or a basic block
    whose convs get the zero bias OpenPCDet's ``SparseBasicBlock`` has (``bias=True``
    beside a BatchNorm): ``BN(Wx + 0)`` is ``BN(Wx)``, the BatchNorm unchanged."""
    pairs = ((('0', '1'), ) if unit.kind == 'conv' else (('conv1', 'bn1'), ('conv2', 'bn2')))
    for conv, bn in pairs:
        key = f'{unit.src}.{conv}.weight'
        if key not in state:
            raise FusionLoadError([f'{DST_3D}{key} is missing'], 'openpcdet export')
        out[f'{dst}.{conv}.weight'] = state[key]
        used.add(key)
        for name in BN_KEYS:
            if f'{unit.src}.{bn}.{name}' in state:
                out[f'{dst}.{bn}.{name}'] = state[f'{unit.src}.{bn}.{name}']
                used.add(f'{unit.src}.{bn}.{name}')
        if unit.kind == 'block':
            if f'{unit.src}.{conv}.bias' in state:
                out[f'{dst}.{conv}.bias'] = state[f'{unit.src}.{conv}.bias']
                used.add(f'{unit.src}.{conv}.bias')
            else:
                mean = state.get(f'{unit.src}.{bn}.running_mean')
                if mean is None:
                    raise FusionLoadError([f'{DST_3D}{unit.src}.{bn}.running_mean is missing'],
                                          'openpcdet export')
                out[f'{dst}.{conv}.bias'] = torch.zeros_like(mean)


def export_backbone_3d(state: Mapping[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """``SparseEncoder`` keys (without the prefix) -> OpenPCDet ``backbone_3d`` keys.

    The reverse of :func:`convert_backbone_3d`: ``conv_module`` stages keep their
    partition; with ``basicblock`` the down-sampling conv that ends each stage but the
    last starts the next OpenPCDet stage (``conv{i+1}.0``).
    """
    stages = _mm_units(state)
    if any(u.kind == 'block' for s in stages for u in s):
        for i, s in enumerate(stages[:-1], start=1):
            if s[-1].kind != 'conv':
                raise FusionLoadError([f'{DST_3D}encoder_layers.encoder_layer{i} does not end '
                                       "with a down-sampling conv; OpenPCDet's "
                                       'VoxelResBackBone8x has no place for it'],
                                      'openpcdet export')
        target = []
        for i, s in enumerate(stages):
            lead = [stages[i - 1][-1]] if i > 0 else []
            target.append(lead + (s[:-1] if i + 1 < len(stages) else list(s)))
    else:
        target = stages
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    used: set = set()
    _put_back(state, Unit('conv', 'conv_input'), 'conv_input', out, used)
    for i, units in enumerate(target, start=1):
        for j, unit in enumerate(units):
            _put_back(state, unit, f'conv{i}.{j}', out, used)
    _put_back(state, Unit('conv', 'conv_out'), 'conv_out', out, used)
    leftover = [k for k in state if k not in used]
    if leftover:
        raise FusionLoadError([f'{DST_3D} tensors with no place in OpenPCDet\'s backbone_3d: '
                               f'{", ".join(leftover[:8])}'], 'openpcdet export')
    return out


def mmdet3d_to_openpcdet(state: Mapping[str, torch.Tensor]
                         ) -> Tuple['OrderedDict[str, torch.Tensor]', List[str]]:
    """MMDetection3D ``pts_middle_encoder`` / ``pts_backbone`` / ``pts_neck`` ->
    OpenPCDet ``backbone_3d`` / ``backbone_2d``; returns the tensors and the keys left
    out (everything else: OpenPCDet's heads are parameterised differently).

    ``SECOND``'s ``blocks.i.j`` (conv with padding 1 first) is ``BaseBEVBackbone``'s
    ``blocks.i.(j+1)`` (``ZeroPad2d(1)`` then a conv with padding 0: the same function);
    ``SECONDFPN``'s ``deblocks`` keep their names.
    """
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    enc = OrderedDict((k[len(DST_3D):], v) for k, v in state.items() if k.startswith(DST_3D))
    if enc:
        out.update((SRC_3D + k, v) for k, v in export_backbone_3d(enc).items())
    left = []
    for k, v in state.items():
        if k.startswith(DST_3D):
            continue
        m = re.match(r'^pts_backbone\.blocks\.(\d+)\.(\d+)\.(.+)$', k)
        if m:
            out[f'{SRC_2D}blocks.{m.group(1)}.{int(m.group(2)) + 1}.{m.group(3)}'] = v
            continue
        m = re.match(r'^pts_neck\.(deblocks\.\d+\..+)$', k)
        if m:
            out[SRC_2D + m.group(1)] = v
            continue
        left.append(k)
    return out, left


# OpenPCDet's save_checkpoint writes ``version='pcdet+' + pcdet.__version__``; the
# structure exported is v0.6.0's (module docstring).
OPENPCDET = register_preset('openpcdet', KeyPreset(
    convert=openpcdet_to_mmdet3d, orders=openpcdet_orders, reverse=mmdet3d_to_openpcdet,
    container=('model_state', {'version': 'pcdet+0.6.0'}), order=ZYX,
    export_layout='spconv2'))


def not_converted_note(keys) -> List[str]:
    """What ``identify`` says of an OpenPCDet file the preset leaves partly unconverted."""
    left = not_converted(keys)
    return [f'{", ".join(left)}: not converted by the openpcdet preset (detection heads are '
            'parameterised differently); only backbone_3d and backbone_2d load'] if left else []


OPENPCDET_FINGERPRINT = register_fingerprint(
    Fingerprint('OpenPCDet', 'openpcdet', 'lidar',
                having(r'^backbone_3d\.(conv_input|conv\d|conv_out)\.',
                       r'^(vfe|map_to_bev_module|backbone_2d|dense_head)\.', least=1),
                notes=not_converted_note))
