"""Read a zip archive's central directory in one pass, as Python's ``zipfile`` reads it.

:func:`read_directory` finds the end record (and the zip64 one) and parses every
central directory entry with the rules, limits and error texts of CPython 3.11.7's
``zipfile._EndRecData``, ``_EndRecData64``, ``ZipFile._RealGetContents`` and
``ZipInfo._decodeExtra`` (read from that version), so a file ``zipfile`` refuses
is refused here with the same reason; it builds no ``ZipInfo`` objects and reads
the file's tail and the directory once each. :func:`zip_members` then checks what the
entries say (names, methods, local headers, bounds) for a checkpoint reader.
"""
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from .pickle_ops import CheckpointValueError, CorruptFileError

#: The end-of-central-directory record (``zipfile.structEndArchive``).
_END = struct.Struct('<4s4H2LH')
#: The zip64 end-of-central-directory locator and record.
_END64_LOCATOR = struct.Struct('<4sLQL')
_END64 = struct.Struct('<4sQ2H2L4Q')
#: A central directory entry, only the fields a checkpoint reader needs:
#: signature, version needed, flags, method, compressed size, size, name,
#: extra and comment lengths, local header offset.
_ENTRY = struct.Struct('<4s2xBxHH4xLLLHHH8xL')
#: A local file header's signature: the first bytes of every zip checkpoint.
LOCAL_SIG = b'PK\x03\x04'
_END_SIG = b'PK\x05\x06'
_END64_SIG = b'PK\x06\x06'
_END64_LOCATOR_SIG = b'PK\x06\x07'
_ENTRY_SIG = b'PK\x01\x02'
_MAX_COMMENT = 1 << 16
#: Highest "version needed to extract" zipfile reads (``zipfile.MAX_EXTRACT_VERSION``).
MAX_EXTRACT_VERSION = 63


class ZipDirectoryError(ValueError):
    """The archive has no readable central directory (``zipfile.BadZipFile``'s reasons)."""


class Entry(NamedTuple):
    """One central directory entry as stored (``zipfile.ZipInfo``'s fields of the same
    meaning, zip64 sizes and offset applied)."""
    raw_name: bytes
    name: str  # decoded as zipfile decodes it (``orig_filename``)
    flag_bits: int
    compress_type: int
    compress_size: int
    file_size: int
    header_offset: int
    CRC: int = 0  # the CRC-32 of the member's bytes (``ZipInfo.CRC``)


class Directory(NamedTuple):
    """An archive's central directory."""
    entries: List[Entry]
    start: int  # where the directory starts (``ZipFile.start_dir``)
    shift: int  # bytes between where the end record puts the directory and where it is


def _at(f: Any, tail: bytes, tail_start: int, pos: int, n: int) -> bytes:
    """``n`` bytes of ``f`` at ``pos`` (``pos >= 0``), from ``tail`` when it holds them."""
    if pos >= tail_start:
        return tail[pos - tail_start:pos - tail_start + n]
    f.seek(pos)
    return f.read(n)


def _end_record(f: Any) -> Tuple[int, int, int, bool]:
    """The end record as ``zipfile._EndRecData`` finds it.

    Returns:
        tuple: The directory's size and offset (the zip64 record's when there
        is one), where the end record starts, and whether it is zip64.
    """
    filesize = f.seek(0, 2)
    if filesize < _END.size:
        raise ZipDirectoryError('File is not a zip file')
    tail_start = max(filesize - _MAX_COMMENT - _END.size, 0)
    f.seek(tail_start)
    tail = f.read()
    last = tail[-_END.size:]
    if last[:4] == _END_SIG and last[-2:] == b'\x00\x00':
        rec, at = _END.unpack(last), filesize - _END.size
    else:
        start = tail.rfind(_END_SIG)
        if start < 0 or len(tail) - start < _END.size:
            raise ZipDirectoryError('File is not a zip file')
        rec, at = _END.unpack_from(tail, start), tail_start + start
    plain = rec[5], rec[6], at, False
    # the zip64 records, right before the end record (zipfile assumes no extensible data)
    loc_at = at - _END64_LOCATOR.size
    if loc_at < 0:
        return plain
    loc = _at(f, tail, tail_start, loc_at, _END64_LOCATOR.size)
    if len(loc) != _END64_LOCATOR.size:
        return plain
    sig, disk, _, disks = _END64_LOCATOR.unpack(loc)
    if sig != _END64_LOCATOR_SIG:
        return plain
    if disk != 0 or disks > 1:
        raise ZipDirectoryError('zipfiles that span multiple disks are not supported')
    rec64_at = loc_at - _END64.size
    if rec64_at < 0:  # zipfile's seek fails: "not a zip file"
        raise ZipDirectoryError('File is not a zip file')
    raw = _at(f, tail, tail_start, rec64_at, _END64.size)
    if len(raw) != _END64.size:
        return plain
    sig, _, _, _, _, _, _, _, dir_size, dir_offset = _END64.unpack(raw)
    if sig != _END64_SIG:
        return plain
    return dir_size, dir_offset, at, True


def _zip64(extra: bytes, file_size: int, compress_size: int,
           header_offset: int) -> Tuple[int, int, int]:
    """Sizes and offset from a zip64 extra field (``ZipInfo._decodeExtra``)."""
    while len(extra) >= 4:
        tp, ln = struct.unpack_from('<HH', extra)
        if ln + 4 > len(extra):
            raise ZipDirectoryError('Corrupt extra field %04x (size=%d)' % (tp, ln))
        if tp == 0x0001:
            data = extra[4:ln + 4]
            for field, value in (('File size', file_size), ('Compress size', compress_size),
                                 ('Header offset', header_offset)):
                wide = value == 0xFFFF_FFFF or (field == 'File size'
                                                and value == 0xFFFF_FFFF_FFFF_FFFF)
                if not wide:
                    continue
                if len(data) < 8:
                    raise ZipDirectoryError(f'Corrupt zip64 extra field. {field} not found.')
                new, = struct.unpack_from('<Q', data)
                data = data[8:]
                if field == 'File size':
                    file_size = new
                elif field == 'Compress size':
                    compress_size = new
                else:
                    header_offset = new
        extra = extra[ln + 4:]
    return file_size, compress_size, header_offset


def read_directory(f: Any) -> Directory:
    """Read the central directory of the zip archive ``f`` (a binary file).

    Args:
        f: The archive, opened for reading; its position is left anywhere.

    Returns:
        Directory: Its entries in directory order, where it starts and how far
        it is from where the end record puts it (0 for an archive not
        prefixed by other bytes).

    Raises:
        ZipDirectoryError: No end record, or a directory ``zipfile`` refuses.
        UnicodeDecodeError: A name flagged UTF-8 that is not.
        NotImplementedError: An entry needing a zip version above 6.3.
    """
    try:
        dir_size, dir_offset, location, is64 = _end_record(f)
    except OSError as e:
        raise ZipDirectoryError('File is not a zip file') from e
    shift = location - dir_size - dir_offset
    if is64:
        shift -= _END64.size + _END64_LOCATOR.size
    start = dir_offset + shift
    if start < 0:
        raise ZipDirectoryError('Bad offset for central directory')
    f.seek(start)
    data = f.read(dir_size)
    have = len(data)
    entries: List[Entry] = []
    unpack, head = _ENTRY.unpack_from, _ENTRY.size
    pos = total = 0
    while total < dir_size:
        if have - pos < head:
            raise ZipDirectoryError('Truncated central directory')
        sig, version, flags, method, crc, csize, fsize, n, m, k, offset = unpack(data, pos)
        if sig != _ENTRY_SIG:
            raise ZipDirectoryError('Bad magic number for central directory')
        at = pos + head
        raw = data[at:at + n]
        name = raw.decode('utf-8' if flags & 0x800 else 'cp437')
        if version > MAX_EXTRACT_VERSION:
            raise NotImplementedError('zip file version %.1f' % (version / 10))
        if m:
            fsize, csize, offset = _zip64(data[at + n:at + n + m], fsize, csize, offset)
        entries.append(Entry(raw, name, flags, method, csize, fsize, offset + shift, crc))
        pos = min(at + n + m + k, have)
        total += head + n + m + k
    return Directory(entries, start, shift)


@dataclass
class Member:
    """One stored member of a zip checkpoint: where its bytes are, and their CRC-32."""
    name: str
    offset: int
    size: int
    crc: Optional[int] = None

    def check_crc(self, data: Any) -> None:
        """Raise :class:`CorruptFileError` unless ``data`` (the member's whole bytes) has
        the directory's CRC-32: a member torn by a writer still at work, or damaged.

        ``torch.save`` writes every member's CRC-32; one pass over the bytes (about
        20 ms for BEVFusion's 137 MiB with zlib's hardware CRC).
        """
        if self.crc is not None and zlib.crc32(data) != self.crc:
            raise CorruptFileError(f'zip member {self.name!r}: its bytes do not match the '
                                   "directory's CRC-32 (a file still being written, or "
                                   'damaged)')


def zip_members(f: Any, size: int) -> Dict[str, Member]:
    """Check a zip checkpoint's directory and return its members by name.

    Every member must be stored uncompressed and unencrypted, named once, with
    a relative name without ``..``, its local header agreeing with the central
    directory, and its bytes inside the file and apart from every other member.
    The directory is read by :func:`read_directory` (what
    ``zipfile`` refuses is refused with its reason).

    Raises:
        CheckpointValueError: Naming the member and what is wrong.
    """
    try:
        directory = read_directory(f)
    except (ZipDirectoryError, UnicodeDecodeError, OSError, EOFError) as e:
        raise CorruptFileError(f'corrupt zip directory ({e})') from e
    # the directory must sit where the end record says (zipfile would accept bytes
    # before the archive and shift every offset)
    if directory.shift:
        raise CorruptFileError(f'the zip directory is not where the end record puts it '
                               f'({directory.shift} bytes off)')
    members: Dict[str, Member] = {}
    spans: List[Tuple[int, int, str]] = []
    _check_members(directory.entries, f.fileno(), min(size, directory.start), members, spans)
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise CheckpointValueError(f'zip members {a!r} and {b!r} overlap')
    return members


_LOCAL = struct.Struct('<4s4xH16xHH')  # a local header: signature, method, name and extra lengths


def _read_at(fd: int, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes of the file ``fd`` at ``offset`` (none past its end)."""
    return os.pread(fd, n, offset) if offset < _MAX_OFFSET else b''


_MAX_OFFSET = 1 << 62  # os.pread takes a signed 64-bit offset


def _check_members(entries: List[Entry], fd: int, end: int, members: Dict[str, Member],
                   spans: List[Tuple[int, int, str]]) -> None:
    """Check every directory entry (``fd``: the file) into ``members``/``spans``; a local
    header is read with one ``pread`` (no mapping whose pages would fault in)."""
    local, stored = _LOCAL.unpack_from, zipfile.ZIP_STORED
    for raw_name, name, flags, method, csize, fsize, offset, crc in entries:
        if not name or name in members or '\\' in name or '\x00' in name or name[0] == '/' or (
                ('/.' in name or name[0] == '.')  # a '.' or '..' part is one of these
                and any(p in ('..', '.') for p in name.split('/'))):
            raise CheckpointValueError(f'zip member {name!r}: a name that is repeated or '
                                       'leaves the archive')
        if method != stored:
            raise CheckpointValueError(f'zip member {name!r} is compressed (method '
                                       f'{method}); checkpoints store members '
                                       'uncompressed')
        if flags & 0x1 or fsize != csize:
            raise CheckpointValueError(f'zip member {name!r}: encrypted or sizes disagree')
        n = len(raw_name)
        head = _read_at(fd, offset, 30 + n)
        if len(head) < 30 or head[:4] != LOCAL_SIG:
            raise CorruptFileError(f'zip member {name!r}: no local header at {offset}')
        _, local_method, ln, lm = local(head)
        at = offset + 30
        same = head[30:] == raw_name if ln == n else _read_at(fd, at, ln) == raw_name
        if local_method != stored or not same:
            raise CheckpointValueError(f'zip member {name!r}: local header disagrees with the '
                                       'directory')
        start = at + ln + lm
        if start + fsize > end:
            raise CorruptFileError(f'zip member {name!r}: {fsize} bytes at '
                                   f'{start} run past the data ({end} bytes)')
        members[name] = Member(name, start, fsize, crc)
        spans.append((offset, start + fsize, name))


def read_member(f: Any, m: Member) -> bytes:
    f.seek(m.offset)
    data = f.read(m.size)
    if len(data) != m.size:
        raise CorruptFileError(f'zip member {m.name!r} is truncated')
    m.check_crc(data)
    return data
