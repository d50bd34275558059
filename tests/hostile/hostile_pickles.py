"""Write checkpoint files byte by byte: a protocol-2 pickle assembler and the
zip / old-format containers ``torch.save`` writes, so a corpus case can say
exactly which opcodes, globals, persistent ids and members a file holds.

Expressions (nested freely): Python literals (dict, list, tuple, str, int, float,
bool, None, bytes), :class:`G` (a global), :class:`Call` (REDUCE), :class:`New`
(NEWOBJ), :class:`Build` (BUILD), :class:`OD` (an OrderedDict with optional
``_metadata``), :class:`T` (a tensor over a storage member), :class:`Put` /
:class:`Get` (memo sharing), :class:`Raw` (bytes as they are).
"""
import io
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class G:
    module: str
    name: str


@dataclass
class Call:
    func: Any
    args: Tuple = ()


@dataclass
class New:
    cls: Any
    args: Tuple = ()


@dataclass
class Build:
    obj: Any
    state: Any


@dataclass
class OD:
    items: Sequence[Tuple[str, Any]] = ()
    metadata: Any = None


@dataclass
class T:
    """A tensor: ``_rebuild_tensor_v2(storage key, offset, size, stride)``."""
    key: str
    kind: str  # 'FloatStorage', 'LongStorage'...
    numel: int
    size: Tuple[int, ...]
    stride: Optional[Tuple[int, ...]] = None
    offset: int = 0
    builder: str = '_rebuild_tensor_v2'


@dataclass
class Put:
    expr: Any
    idx: int


@dataclass
class Get:
    idx: int


@dataclass
class Raw:
    data: bytes


@dataclass
class Persistent:
    """A persistent id tuple as it is (BINPERSID)."""
    items: Tuple


def contiguous(size: Sequence[int]) -> Tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class Assembler:
    """Emit protocol-2 pickle bytes for an expression."""

    def __init__(self):
        self.out = bytearray(b'\x80\x02')

    def emit(self, x: Any) -> None:
        o = self.out
        if x is None:
            o += b'N'
        elif x is True:
            o += b'\x88'
        elif x is False:
            o += b'\x89'
        elif isinstance(x, int):
            if -2**31 <= x < 2**31:
                o += b'J' + struct.pack('<i', x)
            else:
                n = (x.bit_length() + 8) // 8
                o += b'\x8a' + bytes([n]) + x.to_bytes(n, 'little', signed=True)
        elif isinstance(x, float):
            o += b'G' + struct.pack('>d', x)
        elif isinstance(x, str):
            e = x.encode('utf-8', 'surrogatepass')
            o += b'X' + struct.pack('<I', len(e)) + e
        elif isinstance(x, bytes):  # as protocol 2 writes bytes
            self.emit(Call(G('_codecs', 'encode'), (x.decode('latin1'), 'latin1')))
        elif isinstance(x, Raw):
            o += x.data
        elif isinstance(x, G):
            o += b'c' + f'{x.module}\n{x.name}\n'.encode()
        elif isinstance(x, Call):
            self.emit(x.func)
            self.emit(tuple(x.args))
            o += b'R'
        elif isinstance(x, New):
            self.emit(x.cls)
            self.emit(tuple(x.args))
            o += b'\x81'
        elif isinstance(x, Build):
            self.emit(x.obj)
            self.emit(x.state)
            o += b'b'
        elif isinstance(x, tuple):
            if not x:
                o += b')'
            elif len(x) <= 3:
                for v in x:
                    self.emit(v)
                o += b'\x85\x86\x87'[len(x) - 1:len(x)]
            else:
                o += b'('
                for v in x:
                    self.emit(v)
                o += b't'
        elif isinstance(x, list):
            o += b']'
            if x:
                o += b'('
                for v in x:
                    self.emit(v)
                o += b'e'
        elif isinstance(x, OD):
            self.emit(Call(G('collections', 'OrderedDict'), ()))
            self._items(list(x.items))
            if x.metadata is not None:
                self.emit({'_metadata': x.metadata})
                o += b'b'
        elif isinstance(x, dict):
            o += b'}'
            self._items(list(x.items()))
        elif isinstance(x, T):
            stride = x.stride if x.stride is not None else contiguous(x.size)
            self.emit(G('torch._utils', x.builder))
            o += b'('
            self.emit(Persistent(('storage', G('torch', x.kind), x.key, 'cpu', x.numel)))
            self.emit(x.offset)
            self.emit(tuple(x.size))
            self.emit(tuple(stride))
            self.emit(False)
            self.emit(Call(G('collections', 'OrderedDict'), ()))
            o += b'tR'
        elif isinstance(x, Persistent):
            self.emit(tuple(x.items))
            o += b'Q'
        elif isinstance(x, Put):
            self.emit(x.expr)
            o += (b'q' + bytes([x.idx])) if x.idx < 256 else (b'r' + struct.pack('<I', x.idx))
        elif isinstance(x, Get):
            o += (b'h' + bytes([x.idx])) if x.idx < 256 else (b'j' + struct.pack('<I', x.idx))
        else:
            raise TypeError(type(x))

    def _items(self, items: List[Tuple[Any, Any]]) -> None:
        if items:
            self.out += b'('
            for k, v in items:
                self.emit(k)
                self.emit(v)
            self.out += b'u'


def pickle_bytes(x: Any) -> bytes:
    a = Assembler()
    a.emit(x)
    a.out += b'.'
    return bytes(a.out)


_KIND = {torch.float32: 'FloatStorage', torch.float64: 'DoubleStorage',
         torch.float16: 'HalfStorage', torch.int64: 'LongStorage', torch.int32: 'IntStorage',
         torch.uint8: 'ByteStorage', torch.bool: 'BoolStorage'}


@dataclass
class Checkpoint:
    """A checkpoint to write: the object expression and the storages' bytes."""
    obj: Any
    storages: Dict[str, bytes] = field(default_factory=dict)

    def tensor(self, t: torch.Tensor, key: Optional[str] = None) -> T:
        """A :class:`T` for ``t`` (contiguous), its bytes stored under ``key``."""
        key = key or str(len(self.storages))
        t = t.contiguous()
        self.storages[key] = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b''
        return T(key, _KIND[t.dtype], t.numel(), tuple(t.shape))


def write_zip(path: str, pkl: bytes, storages: Dict[str, bytes],
              extra: Optional[Dict[str, bytes]] = None) -> str:
    """A zip checkpoint as ``torch.save`` writes it (members aligned to 64 bytes)."""
    w = torch._C.PyTorchFileWriter(path)
    w.write_record('data.pkl', pkl, len(pkl))
    w.write_record('byteorder', b'little', 6)
    for key, data in storages.items():
        w.write_record(f'data/{key}', data, len(data))
    for name, data in (extra or {}).items():
        w.write_record(name, data, len(data))
    w.write_end_of_file()
    return path


def write_legacy(path: str, pkl: bytes, storages: Dict[str, bytes], elem: Dict[str, int],
                 head: Optional[List[bytes]] = None, keys: Optional[List[str]] = None) -> str:
    """An old-format (pre-zip) checkpoint: magic, protocol, sys info, the object, the
    storage keys, then each storage's element count and bytes."""
    parts = head if head is not None else [
        pickle_bytes(torch.serialization.MAGIC_NUMBER),
        pickle_bytes(torch.serialization.PROTOCOL_VERSION),
        pickle_bytes({'protocol_version': 1001, 'little_endian': True,
                      'type_sizes': {'short': 2, 'int': 4, 'long': 4}})]
    keys = list(storages) if keys is None else keys
    body = io.BytesIO()
    for k in keys:
        data = storages.get(k, b'')
        body.write(struct.pack('<q', len(data) // elem.get(k, 1)))
        body.write(data)
    with open(path, 'wb') as f:
        f.write(b''.join(parts) + pkl + pickle_bytes(keys) + body.getvalue())
    return path


def legacy_tensor(t: torch.Tensor, key: str, size=None, stride=None, offset: int = 0,
                  numel: Optional[int] = None) -> Any:
    """The expression of an old-format tensor (6-item persistent id)."""
    return Call(G('torch._utils', '_rebuild_tensor_v2'), (
        Persistent(('storage', G('torch', _KIND[t.dtype]), key, 'cpu',
                    t.numel() if numel is None else numel, None)),
        offset, tuple(t.shape if size is None else size),
        tuple(contiguous(t.shape) if stride is None else stride), False,
        Call(G('collections', 'OrderedDict'), ())))


def as_od(state: 'OrderedDict[str, torch.Tensor]', ck: Checkpoint,
          metadata: Any = None) -> OD:
    """An :class:`OD` of tensors, their bytes added to ``ck``."""
    return OD([(k, ck.tensor(v)) for k, v in state.items()], metadata)
