"""Webdataset tar members without tarfile's per-member Python overhead.

tarfile spends ~35 µs of pure Python on each member header it parses (`TarInfo.frombuf`, `nti`, `nts`) and
~35-60 µs on each it writes (`copy.copy`, `create_pax_header`, `_create_header`). capfilt's tars are long runs
of small regular files under plain headers, so this module reads and writes exactly those headers itself and
leaves everything else to tarfile's own code:

* `TarMemberWriter` writes the bytes of `tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT)`,
  `addfile()` of `TarInfo(name)` with size, mtime 0 and mode 0644, then `close()`.
* `iter_members` yields the (name, data) of the regular members that iterating `tarfile.open(fileobj=f,
  mode="r|*")` and reading `extractfile(member)` gives, and raises where capfilt's check on that loop raises
  (and, unlike tarfile, at a corrupt header after the first).

The hand-written paths only take input whose meaning is beyond doubt; anything else (a long or non-ASCII name
to write, a header in an unusual form, a global pax header, a sparse file, bz2 or xz) goes to tarfile.
tests/test_tar_io.py compares both with tarfile byte for byte and member for member.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 1 << 20  # bytes per read and per write: few calls on object stores, little memory
_NAME_LENGTH = 100  # the ustar name field
_SIZE_LIMIT = 8**11  # sizes from here on need more than the 11 octal digits of the ustar size field
_ENCODING, _ERRORS = tarfile.ENCODING, "surrogateescape"  # what a TarFile uses when given neither


def _padding(size: int) -> int:
    """Zero bytes after `size` bytes of data, up to the next block."""
    return -size % _BLOCK


# ---------------------------------------------------------------------------------------------------- writing


def _fixed_fields() -> tuple[bytes, bytes, bytes, int]:
    """The header fields that are the same for every member capfilt writes, cut from tarfile's own header of an
    empty member (mode/uid/gid, mtime, typeflag to the end), and their byte sum with the checksum field counted
    as 8 spaces, as ustar checksums count it."""
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode = 0, 0, 0o644
    block = info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)
    ids, mtime, tail = block[100:124], block[136:148], block[156:]
    return ids, mtime, tail, sum(ids) + sum(mtime) + sum(tail) + 8 * ord(" ")


_IDS, _MTIME, _TAIL, _FIXED_SUM = _fixed_fields()


class TarMemberWriter:
    """Writes regular members (mtime 0, mode 0644, no owner) to a binary file object as tarfile's stream mode
    with PAX_FORMAT does, byte for byte, in writes of at least 1 MiB (the last one aside).

    `close()` ends the archive but leaves `fileobj` open, as tarfile does with a file object it was given.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._file = fileobj
        self._out = bytearray()
        self._offset = 0  # bytes of the archive so far, to pad its end to a whole record as tarfile does
        self._closed = False

    def write(self, name: str, data: bytes) -> None:
        if self._closed:
            raise OSError("the tar is closed")
        size = len(data)
        if name.isascii() and len(name) <= _NAME_LENGTH and size < _SIZE_LIMIT:
            # PAX_FORMAT writes this member as one ustar header: it adds a pax header only for a non-ASCII name,
            # a name over 100 characters (it never splits one into prefix and name) or a size over 11 digits.
            raw = name.encode("ascii")
            size_field = b"%011o\0" % size
            checksum = _FIXED_SUM + sum(raw) + sum(size_field)
            header = b"".join(
                (raw, _ZERO_BLOCK[len(raw) : _NAME_LENGTH], _IDS, size_field, _MTIME, b"%06o\0 " % checksum, _TAIL)
            )
        else:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o644
            header = info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)  # what addfile() writes
        out = self._out
        out += header
        out += data  # a copy, even of a large member: memcpy is cheap next to a small write to an object store
        out += _ZERO_BLOCK[: _padding(size)]
        self._offset += len(header) + size + _padding(size)
        if len(out) >= _CHUNK:
            self._flush()

    def close(self) -> None:
        """Write the two zero blocks that end the archive and zeros up to a whole record (tarfile.RECORDSIZE)."""
        if self._closed:
            return
        self._closed = True
        end = 2 * _BLOCK
        self._out += bytes(end + -(self._offset + end) % tarfile.RECORDSIZE)
        self._flush()

    def _flush(self) -> None:
        self._file.write(self._out)
        self._out = bytearray()  # a new buffer: the file object may keep the one it was given


# ---------------------------------------------------------------------------------------------------- reading


class _StrictTarInfo(tarfile.TarInfo):
    """A header tarfile cannot parse (bad checksum, a number field that is not a number, broken pax records) is
    an error here wherever it is. tarfile raises one only as the first header and otherwise ends the archive
    there quietly, so a corrupt header, or from Python 3.13 a tar cut inside pax records, would drop the rest
    of a shard without notice."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.InvalidHeaderError as error:
            raise tarfile.ReadError(str(error)) from None


class _Rest:
    """The unread part of a stream, for tarfile: the bytes already buffered, then the stream's own reads."""

    def __init__(self, buffered: bytes, read: Callable[[int], bytes]) -> None:
        self._buffered, self._pos, self._read = buffered, 0, read

    def read(self, size: int) -> bytes:
        if self._pos >= len(self._buffered):
            return self._read(size)
        chunk = self._buffered[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk


def _tarfile_members(stream: _Rest, mode: str) -> Iterator[tuple[str, bytes]]:
    """Regular members as tarfile reads them, with capfilt's check that the archive was whole."""
    with tarfile.open(fileobj=stream, mode=mode, tarinfo=_StrictTarInfo) as tar:
        for member in tar:
            if member.isfile() and (file := tar.extractfile(member)) is not None:
                yield member.name, file.read()
        # tarfile ends silently at a cut header; a whole tar ends with a zero block it has read.
        if tar.fileobj.tell() < tar.offset + _BLOCK:
            raise tarfile.ReadError("the tar ends without its end-of-archive block (truncated)")


class _Input:
    """A forward-only window on a stream, filled `_CHUNK` bytes at a time through `read`, which may return
    fewer bytes than asked and b"" only at the end."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read, self.data, self.pos = read, b"", 0

    def need(self, count: int) -> bool:
        """Whether `count` bytes from `pos` are in `data`, reading what is missing; False at the end of the stream.
        It makes no read call once it has them, so a stream that fails further on (a cut gzip stream) fails only
        when what it gave is used up."""
        have = len(self.data) - self.pos
        if have >= count:
            return True
        parts = [self.data[self.pos :]]
        while have < count and (chunk := self.read(max(_CHUNK, count - have))):
            parts.append(chunk)
            have += len(chunk)
        self.data, self.pos = b"".join(parts), 0
        return have >= count

    def rest(self) -> _Rest:
        return _Rest(self.data[self.pos :], self.read)


# A header in the forms that tarfile, GNU tar and libarchive write: every number field octal digits ended by a
# NUL or a space (two ends for one digit fewer), device fields empty or octal. tarfile's `nti` reads each of
# these forms as the plain octal number, so its values are what tarfile would see; any other form (base-256,
# leading spaces, ...) goes to tarfile. The name, linkname, magic, owner and prefix fields are free text.
_OCTAL8 = rb"(?:[0-7]{7}[ \0]|[0-7]{6}[ \0]{2})"
_OCTAL12 = rb"(?:[0-7]{11}[ \0]|[0-7]{10}[ \0]{2})"
_HEADER = re.compile(
    rb"""
    .{100}             # name
    O8 O8 O8           # mode, uid, gid
    (O12)              # size
    O12                # mtime
    (O8)               # checksum
    (.) .{172}         # typeflag; linkname, magic, version, uname, gname
    (?: O8 | \0{8}){2}  # devmajor, devminor
    """.replace(b"O12", _OCTAL12).replace(b"O8", _OCTAL8),
    re.DOTALL | re.VERBOSE,
)
_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES but GNU sparse files, which it rebuilds
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: tarfile skips no data
_LONGNAME, _PAX = b"L", b"x"  # the extensions read here (global pax headers, sparse files etc. go to tarfile)


def _octal(field: bytes) -> int:
    return int(field.rstrip(b" \0"), 8)


def _checksum(block: bytes) -> int:
    """tarfile's unsigned header checksum (`calc_chksums(block)[0]`): the sum of the bytes, the checksum field
    counted as 8 spaces. zlib.adler32's low 16 bits are 1 + a byte sum modulo 65521; a 256-byte half sums to
    at most 65280, so each half's sum comes out exact, in C rather than a 512-step Python sum."""
    halves = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    return halves - sum(block[148:156]) + 8 * ord(" ")


def _header(block: bytes) -> tuple[bytes, int] | None:
    """(typeflag, size) of a header in a plain form with the right checksum; None for tarfile to read."""
    match = _HEADER.match(block)
    if match is None:
        return None
    size, checksum, typeflag = match.groups()
    if _octal(checksum) != _checksum(block):  # tarfile then accepts a signed-byte sum (old Sun tars) or rejects it
        return None
    return typeflag, _octal(size)


def _nts(field: bytes) -> str:
    """tarfile's `nts` for a name: up to the first NUL, decoded as a TarFile decodes names."""
    return field.partition(b"\0")[0].decode(_ENCODING, _ERRORS)


def _plain_name(block: bytes, typeflag: bytes) -> str | None:
    """The name tarfile's `frombuf` gives a builtin-type header, or None when it is not a regular file."""
    if typeflag not in _REGULAR:
        return None
    name = _nts(block[:100])
    if typeflag == b"\0" and name.endswith("/"):  # an old-style directory
        return None
    if block[345]:  # a ustar prefix; decoded apart from the name, as tarfile does
        name = _nts(block[345:500]) + "/" + name
    return name


def _pax_records(extension: bytes, size: int) -> dict[bytes, bytes] | None:
    """The records of a pax extended header when they are well formed ("LENGTH KEYWORD=VALUE\\n" each, filling
    `size` exactly, zero padding) and need none of tarfile's special cases (hdrcharset, GNU sparse files).
    Python versions differ on malformed records only, so those go to the running tarfile."""
    if extension.count(0, size) != len(extension) - size:
        return None
    data = extension[:size]
    if b"hdrcharset=" in data or b"GNU.sparse" in data:
        return None
    records, pos = {}, 0
    while pos < size:
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not data[pos:space].isdigit():
            return None
        end = pos + int(data[pos:space])
        if not space < end <= size or data[end - 1] != ord("\n"):
            return None
        keyword, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not keyword or not equals:
            return None
        records[keyword] = value  # a later record wins, as in tarfile's dict
        pos = end
    return records


def _pax_path(value: bytes) -> str:
    """tarfile's decoding of a pax path: UTF-8, else the TarFile's encoding with surrogateescape."""
    try:
        path = value.decode("utf-8")
    except UnicodeDecodeError:
        path = value.decode(_ENCODING, _ERRORS)
    return path.rstrip("/")


def _pax_size(value: bytes) -> int:
    """tarfile's reading of a pax size: int() of the UTF-8 text, 0 when that fails."""
    try:
        return int(value.decode("utf-8", _ERRORS))
    except ValueError:
        return 0


def _member(source: _Input) -> tuple[int, str | None, int] | None:
    """The member whose header starts at `source.pos` when its headers are plain: (bytes of its headers, its
    name or None when it is not a regular file, its data size). None for tarfile to read it, and the rest."""
    block = source.data[source.pos : source.pos + _BLOCK]
    header = _header(block)
    if header is None:
        return None
    typeflag, size = header
    if typeflag in _REGULAR or typeflag in _NO_DATA:
        return _BLOCK, _plain_name(block, typeflag), size
    if typeflag not in (_LONGNAME, _PAX):
        return None
    # An extension's data (a long name, pax records), then the member's own header, which must be plain.
    length = _BLOCK + size + _padding(size)
    if not source.need(length + _BLOCK):
        return None  # tarfile says how it is cut
    extension = source.data[source.pos + _BLOCK : source.pos + length]
    block = source.data[source.pos + length : source.pos + length + _BLOCK]
    header = _header(block)
    if header is None or not (header[0] in _REGULAR or header[0] in _NO_DATA):
        return None
    name, member_size = _plain_name(block, header[0]), header[1]
    if typeflag == _LONGNAME:
        if name is not None:
            name = _nts(extension)  # tarfile reads the padded data, NUL-terminated
        return length + _BLOCK, name, member_size
    records = _pax_records(extension, size)
    if records is None:
        return None
    if name is not None and b"path" in records:
        name = _pax_path(records[b"path"])
    if b"size" in records:
        member_size = _pax_size(records[b"size"])
        if member_size < 0:
            return None
    return length + _BLOCK, name, member_size


# The first bytes by which tarfile's "r|*" tells a compressed stream (_StreamProxy.getcomptype).
_GZIP = b"\x1f\x8b\x08"


def _compressed(head: bytes) -> bool:
    return head.startswith((_GZIP, b"\x5d\x00\x00\x80", b"\xfd7zXZ")) or (
        head[0:3] == b"BZh" and head[4:10] == b"1AY&SY"
    )


def iter_members(fileobj: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member of a tar read front to back (the file object needs only `read`),
    as tarfile's "r|*" names and reads them; other members (directories, links, ...) are skipped.

    A tar cut inside a header, inside data or before its end-of-archive block raises tarfile.ReadError after
    the members it holds whole; so does a header tarfile cannot parse, wherever it is. A gzip stream cut short
    raises EOFError instead, and a corrupt one zlib.error or gzip.BadGzipFile (an OSError), also after its
    whole members. bz2 and xz tars are read by tarfile.
    """
    source = _Input(fileobj.read)
    source.need(_BLOCK)
    if source.data.startswith(_GZIP):
        # GzipFile inflates with the same zlib as tarfile's stream, so the same tar comes out; it also checks
        # the CRC and reads on past the end of a first gzip member. read1 returns what inflated so far, so an
        # EOFError at a cut comes only once the whole members before it are out.
        with gzip.GzipFile(fileobj=source.rest(), mode="rb") as inflated:
            yield from _tar_members(_Input(inflated.read1), "r|")
    elif _compressed(source.data):
        yield from _tarfile_members(source.rest(), "r|*")
    else:
        yield from _tar_members(source, "r|*")


def _tar_members(source: _Input, first_mode: str) -> Iterator[tuple[str, bytes]]:
    """iter_members on an uncompressed stream. `first_mode` is how tarfile opens it when its very first header
    is one for tarfile: "r|*" lets tarfile see a compression it knows and this module does not."""
    mode = first_mode
    while True:
        if not source.need(_BLOCK):
            raise tarfile.ReadError("the tar ends without its end-of-archive block (truncated)")
        if source.data.startswith(_ZERO_BLOCK, source.pos):
            return  # tarfile too stops at the first zero block
        member = _member(source)
        if member is None:
            yield from _tarfile_members(source.rest(), mode)
            return
        mode = "r|"
        length, name, size = member
        source.pos += length
        if name is None:
            continue  # tarfile skips no data after these types
        if not source.need(size):
            raise tarfile.ReadError("unexpected end of data")
        yield name, source.data[source.pos : source.pos + size]
        # tarfile checks the padding only when it goes on to the next header: the member is whole without it
        if not source.need(size + _padding(size)):
            raise tarfile.ReadError("unexpected end of data")
        source.pos += size + _padding(size)
