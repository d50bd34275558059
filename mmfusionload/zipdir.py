"""Read a zip archive's central directory in one pass, as Python's ``zipfile`` reads it.

:func:`read_directory` finds the end record (and the zip64 one) and parses every
central directory entry with the rules, limits and error texts of CPython 3.11.7's
``zipfile._EndRecData``, ``_EndRecData64``, ``ZipFile._RealGetContents`` and
``ZipInfo._decodeExtra`` (read from that version), so a file ``zipfile`` refuses
is refused here with the same reason; it builds no ``ZipInfo`` objects and reads
the file's tail and the directory once each. Checking what the entries say (names, methods,
local headers, bounds) is the caller's job.
"""
import struct
from typing import Any, List, NamedTuple, Tuple

#: The end-of-central-directory record (``zipfile.structEndArchive``).
_END = struct.Struct('<4s4H2LH')
#: The zip64 end-of-central-directory locator and record.
_END64_LOCATOR = struct.Struct('<4sLQL')
_END64 = struct.Struct('<4sQ2H2L4Q')
#: A central directory entry, only the fields a checkpoint reader needs:
#: signature, version needed, flags, method, compressed size, size, name,
#: extra and comment lengths, local header offset.
_ENTRY = struct.Struct('<4s2xBxHH8xLLHHH8xL')
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
        sig, version, flags, method, csize, fsize, n, m, k, offset = unpack(data, pos)
        if sig != _ENTRY_SIG:
            raise ZipDirectoryError('Bad magic number for central directory')
        at = pos + head
        raw = data[at:at + n]
        name = raw.decode('utf-8' if flags & 0x800 else 'cp437')
        if version > MAX_EXTRACT_VERSION:
            raise NotImplementedError('zip file version %.1f' % (version / 10))
        if m:
            fsize, csize, offset = _zip64(data[at + n:at + n + m], fsize, csize, offset)
        entries.append(Entry(raw, name, flags, method, csize, fsize, offset + shift))
        pos = min(at + n + m + k, have)
        total += head + n + m + k
    return Directory(entries, start, shift)
