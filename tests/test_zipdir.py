"""The zip central directory reader against Python's ``zipfile`` on the same bytes."""
import io
import random
import struct
import zipfile

import pytest
import torch

from mmfusionload.files.zipdir import ZipDirectoryError, read_directory


def _zipfile_view(data: bytes):
    """What ``zipfile`` reads from ``data``: entries and directory start, or the error."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        return ('error', str(e))
    except (UnicodeDecodeError, NotImplementedError) as e:
        return ('error', f'{type(e).__name__}: {e}')
    return ([(i.orig_filename, i.flag_bits, i.compress_type, i.compress_size, i.file_size,
              i.header_offset, i.CRC) for i in zf.infolist()], zf.start_dir)


def _our_view(data: bytes):
    try:
        d = read_directory(io.BytesIO(data))
    except ZipDirectoryError as e:
        return ('error', str(e))
    except (UnicodeDecodeError, NotImplementedError) as e:
        return ('error', f'{type(e).__name__}: {e}')
    for e in d.entries:  # the raw name is what the name was decoded from
        assert e.name == e.raw_name.decode('utf-8' if e.flag_bits & 0x800 else 'cp437')
    return ([tuple(e[1:]) for e in d.entries], d.start)


def _with_zip64_directory(data: bytes) -> bytes:
    """``data`` with a central directory whose sizes and offsets all sit in zip64
    extra fields (what a writer does for members past 4 GiB)."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    cd = b''
    for i in zf.infolist():
        name = i.filename.encode('utf-8' if i.flag_bits & 0x800 else 'cp437')
        extra = struct.pack('<HHQQQ', 1, 24, i.file_size, i.compress_size, i.header_offset)
        cd += struct.pack('<4s4B4HL2L5H2L', b'PK\x01\x02', 45, 3, 45, 0, i.flag_bits,
                          i.compress_type, 0, 0x21, i.CRC, 0xFFFFFFFF, 0xFFFFFFFF, len(name),
                          len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + name + extra
    n = len(zf.infolist())
    return data[:zf.start_dir] + cd + struct.pack('<4s4H2LH', b'PK\x05\x06', 0, 0, n, n,
                                                  len(cd), zf.start_dir, 0)


def _archives():
    buf = io.BytesIO()
    torch.save({'a': torch.arange(10.), 'b': torch.zeros(3, 4, dtype=torch.int64)}, buf)
    yield 'torch', buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        z.writestr('a/data.pkl', b'x' * 100)
        z.writestr('a/Ä名', b'y' * 7)  # a UTF-8 name
        z.writestr(zipfile.ZipInfo('a/cp437-\x81'), b'z')
        z.comment = b'a comment PK'
    yield 'comment', buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', allowZip64=True) as z:
        for i in range(3):
            with z.open(f'a/{i}', 'w', force_zip64=True) as w:  # zip64 extra fields
                w.write(bytes(range(i + 1)))
    yield 'zip64-extra', buf.getvalue()
    yield 'zip64-directory', _with_zip64_directory(buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        for i in range(70000):  # more entries than the classic end record counts
            z.writestr(zipfile.ZipInfo(f'{i}'), b'')
    yield 'zip64-end-record', buf.getvalue()


ARCHIVES = dict(_archives())


@pytest.mark.parametrize('name', sorted(ARCHIVES))
def test_reads_what_zipfile_reads(name):
    data = ARCHIVES[name]
    ours = _our_view(data)
    assert ours == _zipfile_view(data) and ours[0] != 'error'
    # bytes before the archive: zipfile shifts every offset, the shift is reported
    shifted = read_directory(io.BytesIO(b'\0' * 100 + data))
    assert shifted.shift == 100
    assert _our_view(b'\0' * 100 + data) == _zipfile_view(b'\0' * 100 + data)
    # any truncation is refused or read as zipfile reads it, for the same reason
    for cut in sorted({len(data) * k // 37 for k in range(37)} | {len(data) - 1, 21, 22, 23}):
        assert _our_view(data[:cut]) == _zipfile_view(data[:cut]), cut


@pytest.mark.parametrize('name', ['torch', 'comment', 'zip64-directory'])
def test_corrupt_directories_match_zipfile(name):
    """Flipped bytes in the directory and end records: the same entries or the same
    error as zipfile (random offsets, seeded)."""
    data = ARCHIVES[name]
    start = data.find(b'PK\x01\x02')
    rng = random.Random(0)
    for _ in range(400):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(start, len(b))] = rng.randrange(256)
        b = bytes(b)
        assert _our_view(b) == _zipfile_view(b)


def test_directory_errors_name_zipfiles_reason():
    data = ARCHIVES['torch']
    assert _our_view(b'') == ('error', 'File is not a zip file')
    assert _our_view(b'PK\x03\x04' + b'\0' * 200) == ('error', 'File is not a zip file')
    at = data.find(b'PK\x01\x02')
    bad_version = data[:at + 6] + bytes([64]) + data[at + 7:]
    assert _our_view(bad_version) == _zipfile_view(bad_version) == (
        'error', 'NotImplementedError: zip file version 6.4')
    bad_utf8 = data[:at + 46] + b'\xff' + data[at + 47:]
    assert _our_view(bad_utf8)[0] == 'error' and _our_view(bad_utf8) == _zipfile_view(bad_utf8)
    loc = data.rfind(b'PK\x06\x07')
    if loc >= 0:  # torch writes zip64 end records
        multi = data[:loc + 4] + struct.pack('<L', 1) + data[loc + 8:]
        assert _our_view(multi) == _zipfile_view(multi) == (
            'error', 'zipfiles that span multiple disks are not supported')


@pytest.mark.parametrize('name', ['torch', 'zip64-directory'])
def test_zip_members_finds_each_members_bytes(tmp_path, name):
    """The checked members' offsets and sizes give exactly the bytes zipfile reads."""
    from mmfusionload.files.zipdir import zip_members
    path = tmp_path / 'a.zip'
    path.write_bytes(ARCHIVES[name])
    zf = zipfile.ZipFile(path)
    with open(path, 'rb') as f:
        members = zip_members(f, path.stat().st_size)
    data = ARCHIVES[name]
    assert sorted(members) == sorted(zf.namelist())
    for n, m in members.items():
        assert m.name == n and data[m.offset:m.offset + m.size] == zf.read(n)


def test_zip_members_refuses_corrupt_directories_by_name(tmp_path):
    """Flipped directory bytes and a zip64 header offset past any file: a checkpoint
    error (or zipfile's own refusal of a zip version), and for the offset, no local
    header there."""
    from mmfusionload.files.pickle_ops import CheckpointValueError, CorruptFileError
    from mmfusionload.files.zipdir import zip_members
    data = ARCHIVES['torch']
    start = data.find(b'PK\x01\x02')
    rng = random.Random(1)
    path = tmp_path / 'a.zip'
    outcomes = set()
    for _ in range(150):
        b = bytearray(data)
        b[rng.randrange(start, len(b))] = rng.randrange(256)
        path.write_bytes(bytes(b))
        with open(path, 'rb') as f:
            try:
                zip_members(f, len(b))
                outcomes.add('read')
            except (CheckpointValueError, CorruptFileError) as e:
                outcomes.add(type(e).__name__)
            except NotImplementedError as e:  # zipfile's "zip file version": reported as
                assert 'zip file version' in str(e)  # unreadable by read_checkpoint
    assert outcomes == {'read', 'CheckpointValueError', 'CorruptFileError'}
    far = ARCHIVES['zip64-directory']
    at = far.find(b'PK\x01\x02') + 46 + len('a/0') + 4 + 16  # the first entry's offset
    path.write_bytes(far[:at] + struct.pack('<Q', (1 << 64) - 1) + far[at + 8:])
    with open(path, 'rb') as f, pytest.raises(CorruptFileError, match='no local header at '
                                              f'{(1 << 64) - 1}'):
        zip_members(f, path.stat().st_size)
