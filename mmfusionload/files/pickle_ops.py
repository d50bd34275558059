"""The opcode loop that turns a checkpoint's pickle into objects.

It accepts exactly the opcodes torch 2.13.0's weights-only unpickler accepts
(``torch._weights_only_unpickler.Unpickler.load``): the protocol-2 subset
``torch.save`` writes plus ``EMPTY_SET``; any other opcode is an error naming
it. Per opcode it does what that loop does, except where noted as stricter:

* ``GLOBAL`` pushes the value the caller's table gives for the name (Python 2
  names mapped to Python 3 ones first); a name outside it raises
  :class:`UnsafeGlobalError`. Nothing is imported.
* ``REDUCE`` calls, and ``NEWOBJ`` creates (``cls.__new__``), only what is a
  value of the table, by identity (no ``==`` of an object from the file ever
  runs); the arguments must be a tuple (stricter).
* ``BUILD`` sets the attributes of an ``OrderedDict`` (its ``_metadata``) from
  a dict (stricter: torch takes any mapping), or calls ``__setstate__`` of an
  instance of a class in the table. Stricter: tensors and parameters are never
  built (torch calls ``Tensor.set_`` with the file's state, which would bypass
  the storage checks; ``torch.save`` does not write it).
* ``APPEND``/``APPENDS`` only on a ``list``; ``SETITEM``/``SETITEMS`` only on a
  ``dict`` or ``OrderedDict`` (stricter: an odd ``SETITEMS`` is refused whole).
* ``BINPERSID`` only with an int or a tuple whose first item is ``'storage'``
  (or ``b'storage'``); the caller's ``persistent_load`` resolves it.
* The memo is a dict: an index from the file never sizes anything.

Bounds: a pickle runs at most ``limit`` opcodes (each pushes at most one small
object, or one list for ``MARK``), so the depth of ``MARK`` nesting, the stack
and the memo are bounded by it as well; lengths are checked against the bytes
there are before anything is read.
"""
import _compat_pickle
import pickle
import pickletools
import struct
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ['OPCODES', 'OpcodeBudget', 'load', 'load_file', 'UnsafeGlobalError',
           'CheckpointValueError', 'CorruptFileError']


class UnsafeGlobalError(Exception):
    """A pickle asked for a global outside the table."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f'unsupported global {name!r}')


class CheckpointValueError(Exception):
    """A value in the file breaks a rule (bounds, types); the message says which."""


class CorruptFileError(CheckpointValueError):
    """The file's structure is broken (truncated, a directory pointing nowhere)."""


# opcodes (pickle protocol 2, plus EMPTY_SET of protocol 4)
MARK, STOP, EMPTY_TUPLE, BINFLOAT = 0x28, 0x2E, 0x29, 0x47
BININT, BININT1, BININT2, NONE = 0x4A, 0x4B, 0x4D, 0x4E
BINPERSID, REDUCE, SHORT_BINSTRING, BINUNICODE = 0x51, 0x52, 0x55, 0x58
EMPTY_LIST, APPEND, BUILD, GLOBAL, APPENDS = 0x5D, 0x61, 0x62, 0x63, 0x65
BINGET, LONG_BINGET, BINPUT, LONG_BINPUT = 0x68, 0x6A, 0x71, 0x72
SETITEM, TUPLE, SETITEMS, EMPTY_DICT = 0x73, 0x74, 0x75, 0x7D
PROTO, NEWOBJ, TUPLE1, TUPLE2, TUPLE3 = 0x80, 0x81, 0x85, 0x86, 0x87
NEWTRUE, NEWFALSE, LONG1, EMPTY_SET = 0x88, 0x89, 0x8A, 0x8F

#: How an opcode's argument is laid out in the bytes.
NO_ARG, LINES, LEN1, LEN4 = 0, -1, -2, -3

#: The opcodes torch 2.13.0's weights-only unpickler accepts -> their argument:
#: a fixed number of bytes, two ``\n``-ended lines, or a 1-/4-byte length and
#: that many bytes.
OPCODES: Dict[int, int] = {
    MARK: NO_ARG, STOP: NO_ARG, EMPTY_TUPLE: NO_ARG, BINFLOAT: 8, BININT: 4, BININT1: 1,
    BININT2: 2, NONE: NO_ARG, BINPERSID: NO_ARG, REDUCE: NO_ARG, SHORT_BINSTRING: LEN1,
    BINUNICODE: LEN4, EMPTY_LIST: NO_ARG, APPEND: NO_ARG, BUILD: NO_ARG, GLOBAL: LINES,
    APPENDS: NO_ARG, BINGET: 1, LONG_BINGET: 4, BINPUT: 1, LONG_BINPUT: 4, SETITEM: NO_ARG,
    TUPLE: NO_ARG, SETITEMS: NO_ARG, EMPTY_DICT: NO_ARG, PROTO: 1, NEWOBJ: NO_ARG,
    TUPLE1: NO_ARG, TUPLE2: NO_ARG, TUPLE3: NO_ARG, NEWTRUE: NO_ARG, NEWFALSE: NO_ARG,
    LONG1: LEN1, EMPTY_SET: NO_ARG,
}
#: Opcode -> its name, for every opcode of every protocol.
NAMES: Dict[int, str] = {op.code.encode('latin1')[0]: op.name for op in pickletools.opcodes}

_U32 = struct.Struct('<I').unpack_from
_I32 = struct.Struct('<i').unpack_from
_U16 = struct.Struct('<H').unpack_from
_F64 = struct.Struct('>d').unpack_from


def opcode_name(op: int) -> str:
    """``'FRAME (0x95)'``: an opcode byte as a name."""
    return f'{NAMES.get(op, "an unknown opcode")} (0x{op:02x})'


def global_name(module: str, name: str) -> str:
    """A global as Python 3 names it (protocol 2 may write Python 2 names)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f'{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}'


class OpcodeBudget:
    """The work the pickles of one file may still do, shared by all of them.

    Work is counted in steps: an opcode, an item an admitted call makes or copies
    (a ``set`` of a 250k-item list is 250k steps, each time), an item of a tuple used
    as a dict key (hashing it). Bytes an admitted call makes (``_codecs.encode``,
    numpy arrays) are counted on their own, against :data:`BYTES_PER_STEP` bytes per
    step of the limit.

    Args:
        limit (int): The most steps in all.
    """
    __slots__ = ('limit', 'left', 'bytes_limit', 'bytes_left')

    def __init__(self, limit: int):
        self.limit = self.left = limit
        self.bytes_limit = self.bytes_left = limit * BYTES_PER_STEP

    def spend(self, n: int = 1) -> None:
        """Count ``n`` steps, raising once more than ``limit`` were taken."""
        self.left -= n
        if self.left < 0:
            raise CheckpointValueError(f'the pickles run more than {self.limit} steps '
                                       '(opcodes and items their calls make)')

    def spend_bytes(self, n: int) -> None:
        """Count ``n`` bytes made, raising past :attr:`bytes_limit`."""
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise CheckpointValueError(f'the pickles make more than {self.bytes_limit} bytes '
                                       '(strings encoded, arrays rebuilt)')


#: Bytes admitted calls may make per step of a budget (a 1 MB file: about 68 MB).
BYTES_PER_STEP = 128
#: Ints a dict key or set item may be: ``hash(n) == n`` for ``0 <= n < 2**61 - 1``
#: (CPython 3.11 ``_PyHASH_MODULUS``), so distinct keys never hash alike.
KEY_INT_LIMIT = 1 << 60
#: Most items of a tuple used as a dict key or set item.
KEY_TUPLE_ITEMS = 64


def _key_refused(key: Any, why: str) -> CheckpointValueError:
    return CheckpointValueError(f'a dict key or set item that is {why} (keys are strings, '
                                f'ints below 2**60 or flat tuples of them)')


def check_key(key: Any, budget: Optional['OpcodeBudget']) -> None:
    """Refuse a dict key or set item whose hash could cost more than its bytes.

    Strings and bytes (hashed once, with a random key), ``None``, bools, ints of
    magnitude below :data:`KEY_INT_LIMIT` (no two hash alike) and tuples of at
    most :data:`KEY_TUPLE_ITEMS` of those (each use charged to ``budget``) pass;
    nothing is hashed, compared or printed here.
    """
    kind = type(key)
    if kind is str or kind is bytes or kind is bool or key is None:
        return
    if kind is int:
        if -KEY_INT_LIMIT < key < KEY_INT_LIMIT:
            return
        raise _key_refused(key, f'an int of {key.bit_length()} bits')
    if kind is tuple:
        if len(key) > KEY_TUPLE_ITEMS:
            raise _key_refused(key, f'a tuple of {len(key)} items')
        for item in key:
            t = type(item)
            if t is int:
                if not -KEY_INT_LIMIT < item < KEY_INT_LIMIT:
                    raise _key_refused(key, 'a tuple holding a large int')
            elif not (t is str or t is bytes or t is bool or item is None):
                raise _key_refused(key, f'a tuple holding a {t.__name__}')
        if budget is not None:
            budget.spend(1 + len(key))
        return
    raise _key_refused(key, f'a {kind.__name__}')


def load(data: bytes, table: Dict[str, Any], persistent_load: Callable[[Any], Any],
         limit: int, pos: int = 0, work: Optional[OpcodeBudget] = None) -> Tuple[Any, int]:
    """Run the pickle in ``data`` from ``pos`` to its ``STOP``.

    Args:
        data (bytes): The pickle (bytes after its ``STOP`` are not read).
        table (dict): Global name -> the object ``GLOBAL`` pushes; its values
            are what ``REDUCE`` may call and ``NEWOBJ``/``BUILD`` may use.
        persistent_load (callable): Resolves a ``BINPERSID`` id.
        limit (int): The most opcodes the pickle may run.
        pos (int): Where the pickle starts.
        work (OpcodeBudget, optional): Charged for the tuples used as dict keys
            (:func:`check_key`).

    Returns:
        tuple: The object and the position after ``STOP``.

    Raises:
        UnsafeGlobalError: A global outside the table.
        CheckpointValueError: More than ``limit`` opcodes.
        pickle.UnpicklingError: Any other malformed or refused pickle (an
            opcode outside :data:`OPCODES`, a truncated argument, a call of
            something not admitted...), naming the opcode and its position.
    """
    admitted = frozenset(map(id, table.values()))
    classes = frozenset(id(v) for v in table.values() if isinstance(v, type))
    size = len(data)
    memo: Dict[int, Any] = {}
    stack: List[Any] = []
    metastack: List[List[Any]] = []
    push = stack.append
    left = limit
    op = at = pos
    try:
        while True:
            at = pos
            op = data[pos]
            pos += 1
            left -= 1
            if left < 0:
                raise CheckpointValueError(f'the pickle runs more than {limit} opcodes')
            # ordered by how often torch.save writes them
            if op == LONG_BINPUT:
                memo[_U32(data, pos)[0]] = stack[-1]
                pos += 4
            elif op == BINGET:
                push(memo[data[pos]])
                pos += 1
            elif op == BININT1:
                push(data[pos])
                pos += 1
            elif op == BINUNICODE:
                end = pos + 4 + _U32(data, pos)[0]
                if end > size:
                    raise _past_end(op, at)
                push(data[pos + 4:end].decode('utf-8', 'surrogatepass'))
                pos = end
            elif op == MARK:
                metastack.append(stack)
                stack = []
                push = stack.append
            elif op == TUPLE:
                items = stack
                stack = metastack.pop()
                push = stack.append
                push(tuple(items))
            elif op == REDUCE:
                args = stack.pop()
                func = stack[-1]
                if id(func) not in admitted or type(args) is not tuple:
                    raise _refused(op, 'reduce (a call) of', func, args, at)
                stack[-1] = func(*args)
            elif op == TUPLE1:
                stack[-1] = (stack[-1], )
            elif op == EMPTY_TUPLE:
                push(())
            elif op == EMPTY_DICT:
                push({})
            elif op == SETITEM:
                value = stack.pop()
                key = stack.pop()
                target = stack[-1]
                if type(target) is not dict and type(target) is not OrderedDict:
                    raise _wrong_target(op, target, at)
                if type(key) is not str:
                    check_key(key, work)
                target[key] = value
            elif op == LONG_BINGET:
                push(memo[_U32(data, pos)[0]])
                pos += 4
            elif op == BININT2:
                push(_U16(data, pos)[0])
                pos += 2
            elif op == BINPERSID:
                pid = stack.pop()
                push(persistent_load(_storage_id(pid, at)))
            elif op == NEWFALSE:
                push(False)
            elif op == BINPUT:
                memo[data[pos]] = stack[-1]
                pos += 1
            elif op == TUPLE2:
                second = stack.pop()
                stack[-1] = (stack[-1], second)
            elif op == NONE:
                push(None)
            elif op == BININT:
                push(_I32(data, pos)[0])
                pos += 4
            elif op == TUPLE3:
                third = stack.pop()
                second = stack.pop()
                stack[-1] = (stack[-1], second, third)
            elif op == NEWTRUE:
                push(True)
            elif op == EMPTY_LIST:
                push([])
            elif op == APPEND:
                item = stack.pop()
                target = stack[-1]
                if type(target) is not list:
                    raise _wrong_target(op, target, at)
                target.append(item)
            elif op == APPENDS:
                items = stack
                stack = metastack.pop()
                push = stack.append
                target = stack[-1]
                if type(target) is not list:
                    raise _wrong_target(op, target, at)
                target.extend(items)
            elif op == SETITEMS:
                items = stack
                stack = metastack.pop()
                push = stack.append
                target = stack[-1]
                if type(target) is not dict and type(target) is not OrderedDict:
                    raise _wrong_target(op, target, at)
                if len(items) % 2:
                    raise pickle.UnpicklingError(f'SETITEMS at byte {at}: an odd number of '
                                                 'keys and values')
                for i in range(0, len(items), 2):
                    key = items[i]
                    if type(key) is not str:
                        check_key(key, work)
                    target[key] = items[i + 1]
            elif op == BINFLOAT:
                push(_F64(data, pos)[0])
                pos += 8
            elif op == LONG1:
                end = pos + 1 + data[pos]
                if end > size:
                    raise _past_end(op, at)
                push(int.from_bytes(data[pos + 1:end], 'little', signed=True))
                pos = end
            elif op == SHORT_BINSTRING:
                end = pos + 1 + data[pos]
                if end > size:
                    raise _past_end(op, at)
                push(data[pos + 1:end].decode('utf-8', 'strict'))
                pos = end
            elif op == EMPTY_SET:
                push(set())
            elif op == GLOBAL:
                eol = data.find(b'\n', pos)
                eol2 = data.find(b'\n', eol + 1) if eol >= 0 else -1
                if eol2 < 0:
                    raise _past_end(op, at)
                name = global_name(data[pos:eol].decode('utf-8'),
                                   data[eol + 1:eol2].decode('utf-8'))
                if name not in table:
                    raise UnsafeGlobalError(name)
                push(table[name])
                pos = eol2 + 1
            elif op == NEWOBJ:
                args = stack.pop()
                cls = stack.pop()
                if id(cls) not in classes or type(args) is not tuple:
                    raise _refused(op, 'new object of', cls, args, at)
                push(cls.__new__(cls, *args))
            elif op == BUILD:
                state = stack.pop()
                inst = stack[-1]
                if type(inst) is OrderedDict and type(state) is dict:
                    inst.__dict__.update(state)
                elif id(type(inst)) in classes and hasattr(inst, '__setstate__'):
                    inst.__setstate__(state)
                else:
                    raise pickle.UnpicklingError(
                        f'BUILD at byte {at}: cannot build a {type(inst).__name__} (only an '
                        'OrderedDict from a dict, or an instance of an admitted class)')
            elif op == PROTO:
                if pos >= size:  # any protocol number: opcodes outside the set fail anyway
                    raise _past_end(op, at)
                pos += 1
            elif op == STOP:
                return stack.pop(), pos
            else:
                raise pickle.UnpicklingError(f'unsupported opcode {opcode_name(op)} at byte {at}')
    except (IndexError, KeyError, struct.error) as e:
        if at >= size:
            raise pickle.UnpicklingError('the pickle ends before its STOP opcode') from None
        what = 'a memo entry never set' if isinstance(e, KeyError) and op in (
            BINGET, LONG_BINGET) else f'{type(e).__name__}: {e}'
        raise pickle.UnpicklingError(f'{opcode_name(op)} at byte {at}: {what}') from None


def load_file(f: Any, table: Dict[str, Any], persistent_load: Callable[[Any], Any],
              budget: OpcodeBudget) -> Any:
    """Run the pickle that starts at ``f``'s position, leaving ``f`` right after its ``STOP``.

    Args:
        f (file): A binary file with ``read`` and ``readline``.
        table, persistent_load: As for :func:`load`.
        budget (OpcodeBudget): Opcodes left for this file's pickles.

    Returns:
        Any: The object.
    """
    data = read_pickle(f, budget)
    return load(data, table, persistent_load, len(data), work=budget)[0]


def read_pickle(f: Any, budget: OpcodeBudget) -> bytes:
    """The bytes of the pickle at ``f``'s position, through its ``STOP`` (only the
    opcodes of :data:`OPCODES`, each counted against ``budget``)."""
    read, out = f.read, bytearray()
    while True:
        key = read(1)
        if not key:
            raise pickle.UnpicklingError('the file ends before the pickle\'s STOP opcode')
        budget.spend()
        op = key[0]
        arg = OPCODES.get(op)
        if arg is None:
            raise pickle.UnpicklingError(f'unsupported opcode {opcode_name(op)} at byte '
                                         f'{len(out)} of a pickle')
        out += key
        if arg == LINES:
            for _ in range(2):
                line = f.readline()
                if not line.endswith(b'\n'):
                    raise _past_end(op, len(out))
                out += line
        elif arg in (LEN1, LEN4):
            head = _read_exact(read, 1 if arg == LEN1 else 4, op, len(out))
            out += head
            out += _read_exact(read, int.from_bytes(head, 'little'), op, len(out))
        elif arg:
            out += _read_exact(read, arg, op, len(out))
        if op == STOP:
            return bytes(out)


def _read_exact(read: Callable[[int], bytes], n: int, op: int, at: int) -> bytes:
    data = read(n)
    if len(data) != n:
        raise _past_end(op, at)
    return data


def _past_end(op: int, at: int) -> Exception:
    return pickle.UnpicklingError(f'{opcode_name(op)} at byte {at}: its argument runs past '
                                  'the end of the pickle')


def _refused(op: int, what: str, obj: Any, args: Any, at: int) -> Exception:
    name = getattr(obj, '__name__', None) if isinstance(obj, type) else None
    head = f'{NAMES[op]} at byte {at}: {what} {name or type(obj).__name__}'
    if type(args) is not tuple:
        return pickle.UnpicklingError(f'{head} with arguments that are a '
                                      f'{type(args).__name__}, not a tuple')
    return pickle.UnpicklingError(f'{head}, which is not admitted')


def _wrong_target(op: int, target: Any, at: int) -> Exception:
    kind = 'list' if op in (APPEND, APPENDS) else 'dict or OrderedDict'
    return pickle.UnpicklingError(f'{NAMES[op]} at byte {at} on a {type(target).__name__} '
                                  f'(only on a {kind})')


def _storage_id(pid: Any, at: int) -> Any:
    if type(pid) is int:
        return pid
    if type(pid) is tuple:
        first = pid[0] if pid else 'storage'
        if (type(first) is str and first == 'storage') or (type(first) is bytes
                                                            and first == b'storage'):
            return pid
        what = repr(first)[:40] if type(first) in (str, bytes) else type(first).__name__
        raise pickle.UnpicklingError(f'persistent_load of {what} at byte {at} (only storages)')
    raise pickle.UnpicklingError(f'persistent_load id at byte {at} is a {type(pid).__name__}, '
                                 'not a tuple or int')
