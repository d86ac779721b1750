"""capfilt.formats.tar_io against tarfile: the writer's bytes, the reader's members and its errors."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capfilt.formats import tar_io
from capfilt.formats.tar_io import TarMemberWriter, iter_members

BLOCK = tarfile.BLOCKSIZE
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)

Members = list[tuple[str, bytes]]


class ReadOnly:
    """A stream with `read` only (no seek, tell, peek), as fsspec gives for remote stores; at most `step` bytes
    a call."""

    def __init__(self, data: bytes, step: int | None = None) -> None:
        self._file, self._step = io.BytesIO(data), step

    def read(self, size: int = -1) -> bytes:
        if self._step is not None and (size < 0 or size > self._step):
            size = self._step
        return self._file.read(size)


class Recorder(io.BytesIO):
    """A file that remembers the size of each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[int] = []

    def write(self, data) -> int:
        self.writes.append(len(data))
        return super().write(data)


def tarfile_write(members: Members) -> bytes:
    """What capfilt's TarShardWriter writes with tarfile."""
    file = io.BytesIO()
    with tarfile.open(fileobj=file, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return file.getvalue()


def fast_write(members: Members) -> bytes:
    file = io.BytesIO()
    writer = TarMemberWriter(file)
    for name, data in members:
        writer.write(name, data)
    writer.close()
    return file.getvalue()


def tarfile_read(data: bytes, tarinfo: type[tarfile.TarInfo] = tarfile.TarInfo) -> tuple[Members, BaseException | None]:
    """The regular members capfilt's tarfile loop reads, and the error that ends it (None at a whole end)."""
    members: Members = []
    try:
        with tarfile.open(fileobj=ReadOnly(data), mode="r|*", tarinfo=tarinfo) as tar:
            for member in tar:
                if member.isfile() and (file := tar.extractfile(member)) is not None:
                    members.append((member.name, file.read()))
            if tar.fileobj.tell() < tar.offset + BLOCK:
                raise tarfile.ReadError("the tar ends without its end-of-archive block (truncated)")
    except READ_ERRORS as error:
        return members, error
    return members, None


def fast_read(data: bytes, step: int | None = None) -> tuple[Members, BaseException | None]:
    members: Members = []
    try:
        for member in iter_members(ReadOnly(data, step)):
            members.append(member)
    except READ_ERRORS as error:
        return members, error
    return members, None


def assert_like_tarfile(data: bytes) -> None:
    """iter_members reads the members tarfile reads from an uncompressed `data`, and raises exactly where
    capfilt's tarfile loop raises or where tarfile ends quietly at a header it cannot parse (after the first)."""
    got, error = fast_read(data)
    assert got == tarfile_read(data)[0]
    strict, strict_error = tarfile_read(data, tar_io._StrictTarInfo)
    assert (got, error is None) == (strict, strict_error is None)
    assert error is None or isinstance(error, tarfile.TarError)  # StreamError for a negative size, say


def assert_same(data: bytes) -> Members:
    """iter_members reads `data` as tarfile does, whole; returns the members."""
    expected, error = tarfile_read(data)
    assert error is None, error
    assert fast_read(data) == (expected, None)
    return expected


@pytest.fixture
def fast_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if iter_members hands any part of the tar to tarfile."""

    def refuse(stream: object, mode: str) -> Iterator[tuple[str, bytes]]:
        raise AssertionError("handed to tarfile")
        yield  # pragma: no cover

    monkeypatch.setattr(tar_io, "_tarfile_members", refuse)


def header_with(block: bytes, chksum_form: bytes = b"%06o\0 ", **fields: bytes) -> bytes:
    """A header block with fields replaced (name, size, prefix, mode, chksum, typeflag, ...) and, unless
    chksum is given, its checksum set again in `chksum_form`."""
    spans = {"name": (0, 100), "mode": (100, 108), "uid": (108, 116), "size": (124, 136), "mtime": (136, 148),
             "chksum": (148, 156), "typeflag": (156, 157), "magic": (257, 265), "devmajor": (329, 337),
             "prefix": (345, 500)}  # fmt: skip
    header = bytearray(block)
    for field, value in fields.items():
        start, end = spans[field]
        assert len(value) <= end - start
        header[start:end] = value.ljust(end - start, b"\0")
    if "chksum" not in fields:
        header[148:156] = chksum_form % tarfile.calc_chksums(bytes(header))[0]
    return bytes(header)


# ---------------------------------------------------------------------------------------------------- writer

NAMES = [
    "000000001.jpg", "shard/part/000000001.json", "", "a\0b.txt", "x" * 99, "x" * 100, "x" * 101, "d/" * 49 + "x.jpg",
    "x" * 150, "dir/" * 40 + "x.jpg", "x" * 255, "x" * 300, "café/ü.jpg", "日本語.txt", "x" * 98 + "é",
    "bad\udcff.jpg",  # surrogate-escaped bytes: tarfile writes them raw under hdrcharset=BINARY
]  # fmt: skip
SIZES = [0, 1, 100, 511, 512, 513, 1023, 1024, 1025, 9 * 1024, 10 * 1024 - 1024, 10 * 1024 - 1023, 10 * 1024]


@pytest.mark.parametrize("name", NAMES)
def test_writer_matches_tarfile_for_names(name: str) -> None:
    members = [(name, b"data"), ("next.txt", os.urandom(700)), (name, b"")]
    assert fast_write(members) == tarfile_write(members)


@pytest.mark.parametrize("size", SIZES)
def test_writer_matches_tarfile_for_sizes(size: int) -> None:
    for count in range(1, 4):  # so that the archive ends at different points of a record
        members = [(f"{index:09d}.jpg", os.urandom(size)) for index in range(count)]
        assert fast_write(members) == tarfile_write(members)


def test_writer_with_no_members_writes_tarfiles_empty_archive() -> None:
    assert fast_write([]) == tarfile_write([]) == bytes(tarfile.RECORDSIZE)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=130), st.binary(max_size=1500)), max_size=8))
def test_writer_matches_tarfile_on_any_members(members: Members) -> None:
    assert fast_write(members) == tarfile_write(members)


def test_writer_writes_in_chunks_of_a_mebibyte() -> None:
    members = [(f"{index:09d}.jpg", os.urandom(3000)) for index in range(1000)]
    members.insert(500, ("big.bin", os.urandom(3 << 20)))
    file = Recorder()
    writer = TarMemberWriter(file)
    for name, data in members:
        writer.write(name, data)
    writer.close()
    assert file.getvalue() == tarfile_write(members)
    assert all(size >= 1 << 20 for size in file.writes[:-1]) and len(file.writes) > 2


def test_writer_close_is_idempotent_and_ends_writing() -> None:
    file = io.BytesIO()
    writer = TarMemberWriter(file)
    writer.write("a.txt", b"a")
    writer.close()
    writer.close()
    assert file.getvalue() == tarfile_write([("a.txt", b"a")])
    with pytest.raises(OSError):
        writer.write("b.txt", b"b")


def test_written_tars_read_back(fast_path_only: None) -> None:
    members = [(name, os.urandom(size)) for name, size in zip(NAMES, SIZES, strict=False) if "\0" not in name]
    assert fast_read(fast_write(members)) == (members, None)


# ---------------------------------------------------------------------------------------------------- reader


def build_tar(format: int, long_names: bool = True, exotic: bool = True, **open_options: object) -> bytes:
    """A tar with every kind of member tarfile writes in `format`; `exotic` adds those that take tarfile's
    own code (base-256 ids, GNU long links)."""
    file = io.BytesIO()
    with tarfile.open(fileobj=file, mode="w", format=format, **open_options) as tar:

        def add(name: str, data: bytes = b"", **attributes: object) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for attribute, value in attributes.items():
                setattr(info, attribute, value)
            tar.addfile(info, io.BytesIO(data))

        add("dir", type=tarfile.DIRTYPE)
        add("dir/000000001.jpg", os.urandom(3000), mtime=1700000000.5, uname="someone", gname="group")
        add("dir/000000001.txt", b"a caption")
        add("dir/000000001.json", b"{}" * 300)
        add("old-style-dir/", type=tarfile.AREGTYPE)
        add("empty.txt")
        add("link", type=tarfile.SYMTYPE, linkname="dir/000000001.txt")
        add("hard", type=tarfile.LNKTYPE, linkname="dir/000000001.txt")
        add("fifo", type=tarfile.FIFOTYPE)
        add("device", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("contiguous.bin", os.urandom(600), type=tarfile.CONTTYPE)
        add("block.bin", os.urandom(512))
        if exotic and format != tarfile.USTAR_FORMAT:
            add("big-ids.bin", b"x", uid=8**7 + 5, gid=8**7 + 6)
        if long_names:
            add("p/" * 60 + "prefixed.jpg", b"split into prefix and name in ustar")
            add("long/" + "y" * 200 + ".jpg", os.urandom(100))
            add("z" * 300 + ".txt", b"too long for ustar's prefix")
            if exotic:
                add("long-link", type=tarfile.SYMTYPE, linkname="t" * 300)
        if format != tarfile.USTAR_FORMAT:
            add("café/ü.jpg", b"non-ASCII")
        add("last.txt", b"end")
    return file.getvalue()


FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


@pytest.mark.parametrize("format", FORMATS)
def test_reader_matches_tarfile(format: str) -> None:
    data = build_tar(FORMATS[format], long_names=format != "ustar")
    members = assert_same(data)
    assert "dir/000000001.jpg" in dict(members) and "last.txt" in dict(members)
    assert "dir" not in dict(members) and "old-style-dir" not in dict(members) and "link" not in dict(members)


def test_ustar_long_names_use_the_prefix() -> None:
    file = io.BytesIO()
    with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ["p/" * 60 + "prefixed.jpg", "a" * 150 + "/b.txt"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    assert [name for name, _ in assert_same(file.getvalue())] == ["p/" * 60 + "prefixed.jpg", "a" * 150 + "/b.txt"]


@pytest.mark.parametrize("format", ["pax", "gnu", "ustar"])
def test_plain_tars_take_the_fast_path(format: str, fast_path_only: None) -> None:
    # capfilt's own shards, webdataset's (pax mtime records), GNU long names: none reaches tarfile
    data = build_tar(FORMATS[format], long_names=format != "ustar", exotic=False)
    assert fast_read(data) == tarfile_read(data)


def test_pax_records_take_the_fast_path(fast_path_only: None) -> None:
    file = io.BytesIO()
    with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for pax_headers in [
            {"path": "renamed/by/pax.txt"},
            {"path": "trailing/slash/"},
            {"comment": "a = b\nc", "mtime": "1.5"},
            {"path": "ü/" + "é" * 90},
            {"size": "3"},  # a size record that agrees with the header
        ]:
            info = tarfile.TarInfo("original.txt")
            info.size, info.pax_headers = 3, pax_headers
            tar.addfile(info, io.BytesIO(b"abc"))
    members = assert_same(file.getvalue())
    assert [name for name, _ in members] == [
        "renamed/by/pax.txt", "trailing/slash", "original.txt", "ü/" + "é" * 90, "original.txt",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "pax_headers",
    [
        {"size": "abc"},  # tarfile reads size 0, then the data as a header
        {"size": "7"},  # more than the header says
        {"path": "x", "hdrcharset": "BINARY"},
        {"GNU.sparse.name": "sparse.txt"},
        {"path": "a\udcffb"},  # hdrcharset=BINARY written by tarfile
    ],
)
def test_unusual_pax_records_read_as_tarfile_reads_them(pax_headers: dict[str, str]) -> None:
    file = io.BytesIO()
    with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ["a.txt", "b.txt"]:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = 3, pax_headers
            tar.addfile(info, io.BytesIO(b"abc"))
    assert_like_tarfile(file.getvalue())


def test_global_pax_header_goes_to_tarfile() -> None:
    data = build_tar(tarfile.PAX_FORMAT, pax_headers={"comment": "global", "path": "everything.txt"})
    members = assert_same(data)
    assert "everything.txt" in {name for name, _ in members}  # all but those with a pax path of their own


@pytest.mark.parametrize(
    "fields",
    [
        {"mode": b"000644 \0", "size": b"00000000003 ", "chksum_form": b"%06o \0"},  # libarchive's forms
        {"mode": b"0000644 ", "chksum_form": b"%07o\0"},
        {"mode": b"   644 \0"},  # leading spaces: tarfile's nti strips them
        {"size": b"\x80" + (3).to_bytes(11, "big")},  # GNU base-256
        {"mode": b"0o644\0"},  # int(..., 8) takes a prefix
        {"name": b"\xa9.txt", "prefix": b"caf\xc3"},  # a UTF-8 character cut between prefix and name
        {"typeflag": b"L"},  # a GNU long name for the next member
        {"magic": b"garbage!"},
        {"typeflag": b"V"},  # an unknown type: tarfile skips its data
    ],
)
def test_headers_in_other_forms_read_as_tarfile_reads_them(fields: dict[str, bytes]) -> None:
    data = bytearray(fast_write([("a.txt", b"abc"), ("b.txt", b"def")]))
    data[:BLOCK] = header_with(data[:BLOCK], **fields)
    expected = tarfile_read(bytes(data))
    assert expected[1] is None
    assert fast_read(bytes(data)) == expected


def test_signed_checksum_is_accepted_like_tarfile() -> None:
    data = bytearray(fast_write([("\xa9.txt", b"abc")]))  # pax header, then ustar name "?.txt"
    header = header_with(data[1024:1536], name=b"\xff\xfe.txt")
    data[1024:1536] = header_with(header, chksum=b"%06o\0 " % tarfile.calc_chksums(header)[1])
    assert fast_read(bytes(data)) == tarfile_read(bytes(data))
    assert fast_read(bytes(data))[0] == [("\xa9.txt", b"abc")]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_tars(compress) -> None:
    data = compress(build_tar(tarfile.PAX_FORMAT))
    assert len(assert_same(data)) > 5


def test_gzip_of_several_members_reads_whole() -> None:
    # bgzip and parallel writers emit gzip members back to back; GzipFile reads on, tarfile stops after the first
    members = [(f"{index:09d}.jpg", os.urandom(2000)) for index in range(20)]
    data = fast_write(members)
    assert fast_read(gzip.compress(data[:20000]) + gzip.compress(data[20000:])) == (members, None)


def test_empty_and_zero_inputs() -> None:
    assert fast_read(b"")[0] == [] and isinstance(fast_read(b"")[1], tarfile.ReadError)
    assert tarfile_read(b"")[0] == [] and isinstance(tarfile_read(b"")[1], tarfile.ReadError)
    assert fast_read(bytes(BLOCK)) == tarfile_read(bytes(BLOCK)) == ([], None)
    assert fast_read(b"not a tar at all" * 40)[1] is not None


@pytest.mark.parametrize("step", [1, 100, 511, 513, 4096])
def test_reader_on_streams_with_short_reads(step: int) -> None:
    data = build_tar(tarfile.GNU_FORMAT)
    assert fast_read(data, step) == (tarfile_read(data)[0], None)
    assert fast_read(gzip.compress(data), step) == (tarfile_read(data)[0], None)


def test_reader_on_a_stream_that_only_reads() -> None:
    data = fast_write([("a.jpg", b"x" * 5000), ("b.txt", b"y")])
    assert list(iter_members(ReadOnly(data))) == [("a.jpg", b"x" * 5000), ("b.txt", b"y")]


# ---------------------------------------------------------------------------------------------------- errors


def cut_points(data: bytes) -> list[int]:
    """Offsets around and inside every block up to the end-of-archive block."""
    end = len(data.rstrip(b"\0"))
    return sorted({cut for block in range(0, end + 2 * BLOCK, BLOCK) for cut in (block - 1, block, block + 1,
                   block + 100, block + 148, block + 157, block + 345) if 0 < cut < len(data)})  # fmt: skip


@pytest.mark.parametrize("format", ["pax", "gnu", "global"])
def test_truncated_tars_raise_after_their_whole_members(format: str) -> None:
    data = (
        build_tar(tarfile.PAX_FORMAT, pax_headers={"comment": "global"})
        if format == "global"
        else build_tar(FORMATS[format])
    )
    whole, _ = tarfile_read(data)
    end = data.rindex(b"end") // BLOCK * BLOCK + 2 * BLOCK  # a tar is whole once its first zero block is
    for cut in cut_points(data):
        members, error = fast_read(data[:cut])
        assert (members, error is None) == (tarfile_read(data[:cut])[0], cut >= end), cut
        assert error is None or isinstance(error, tarfile.ReadError), (cut, error)
        assert members == whole[: len(members)]


def test_truncated_gzip_raises_after_the_same_members_as_tarfile() -> None:
    data = gzip.compress(build_tar(tarfile.PAX_FORMAT), compresslevel=1)
    for cut in range(10, len(data) - 8, 97):
        members, error = fast_read(data[:cut])
        assert members == tarfile_read(data[:cut])[0], cut
        assert isinstance(error, READ_ERRORS), cut


def test_tar_ending_after_a_members_padding_is_truncated() -> None:
    data = fast_write([("a.txt", b"abc"), ("b.txt", b"def")])
    members, error = fast_read(data[: 4 * BLOCK])
    assert members == [("a.txt", b"abc"), ("b.txt", b"def")]
    assert isinstance(error, tarfile.ReadError) and "end-of-archive" in str(error)
    assert isinstance(tarfile_read(data[: 4 * BLOCK])[1], tarfile.ReadError)


@pytest.mark.parametrize("offset", [0, 50, 130, 150, 157, 300, 511])
@pytest.mark.parametrize("member", [0, 1, 3])
def test_corrupt_headers_raise(member: int, offset: int) -> None:
    members = [(f"{index:09d}.jpg", b"x" * 600) for index in range(5)]
    data = bytearray(fast_write(members))
    data[member * 3 * BLOCK + offset] ^= 0x5A
    got, error = fast_read(bytes(data))
    assert got == members[:member]
    assert isinstance(error, tarfile.ReadError) and str(error) in ("bad checksum", "invalid header")
    # tarfile raises at the first header only; at a later one it ends quietly, after the same members
    expected, expected_error = tarfile_read(bytes(data))
    assert expected == members[:member] and (expected_error is None) == (member > 0)


def test_corrupt_header_after_a_global_header_raises_too() -> None:
    data = bytearray(build_tar(tarfile.PAX_FORMAT, pax_headers={"comment": "global"}))
    whole, _ = tarfile_read(bytes(data))
    last = bytes(data).rindex(b"last.txt")
    data[last] ^= 0x01
    got, error = fast_read(bytes(data))
    assert got == whole[:-1] and isinstance(error, tarfile.ReadError)


TAR_SAMPLES = [
    fast_write([(f"{index:09d}.{ext}", os.urandom(size)) for index in range(3) for ext, size in [("jpg", 700), ("txt", 20)]]),
    fast_write([("é" * 60 + ".jpg", b"x" * 600), ("a" * 120 + ".txt", b"caption"), ("last.json", b"{}")]),
    build_tar(tarfile.PAX_FORMAT, long_names=True),
    build_tar(tarfile.GNU_FORMAT, long_names=True),
    build_tar(tarfile.USTAR_FORMAT, long_names=False),
]  # fmt: skip


def header_spans(data: bytes) -> tuple[list[int], list[int]]:
    """The starts of a tar's header blocks (its end block included), and the offsets of every byte of its
    headers and extension data (GNU long names, pax records)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members, end = tar.getmembers(), tar.offset
    starts = sorted({member.offset for member in members} | {member.offset_data - BLOCK for member in members} | {end})
    offsets = [offset for member in members for offset in range(member.offset, member.offset_data)]
    return starts, offsets + list(range(end, end + BLOCK))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(range(len(TAR_SAMPLES))),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_damaged_tars_read_as_tarfile_reads_them(sample: int, flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(TAR_SAMPLES[sample])
    end = len(data.rstrip(b"\0")) + BLOCK
    for position, mask in flips:
        data[position % end] ^= mask
    assert_like_tarfile(bytes(data[: cut % len(data)] if cut is not None else data))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(range(len(TAR_SAMPLES))),
    flips=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(b"\0 /0179Lgx\x80\xff=\n") | st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    fix_checksums=st.booleans(),
)
def test_altered_headers_read_as_tarfile_reads_them(
    sample: int, flips: list[tuple[int, int]], fix_checksums: bool
) -> None:
    """Header fields, GNU long names and pax records set to other bytes, mostly with checksums set right: the
    fast path must read what tarfile reads from each header it takes, or leave the header to tarfile."""
    data = bytearray(TAR_SAMPLES[sample])
    starts, offsets = header_spans(bytes(data))
    for position, value in flips:
        data[offsets[position % len(offsets)]] = value
    if fix_checksums:
        for start in starts:
            if data[start : start + BLOCK] != bytes(BLOCK):
                data[start : start + BLOCK] = header_with(data[start : start + BLOCK])
    assert_like_tarfile(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=BLOCK, max_size=BLOCK))
def test_checksum_is_tarfiles(block: bytes) -> None:
    assert tar_io._checksum(block) == tarfile.calc_chksums(block)[0]


# ---------------------------------------------------------------------------------------------------- GNU tar


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
@pytest.mark.parametrize("format", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_tars_written_by_the_tar_command(tmp_path, format: str, fast_path_only: None) -> None:
    root = tmp_path / "root"
    (root / "dir" / "sub").mkdir(parents=True)
    short = format in ("ustar", "v7")
    names = ["dir/000000001.jpg", "dir/000000001.txt", "dir/sub/empty", "block.bin"]
    names += [] if short else ["dir/" + "l" * 150 + ".jpg", "café.txt"]
    for index, name in enumerate(names):
        (root / name).write_bytes(os.urandom(index * 300) if name != "block.bin" else b"b" * 512)
    (root / "dir" / "link").symlink_to("000000001.txt")
    os.link(root / "dir" / "000000001.txt", root / "hardlink.txt")
    result = subprocess.run(
        ["tar", f"--format={format}", "--sort=name", "-cf", "-", "-C", str(root), "."], capture_output=True, check=False
    )
    if result.returncode != 0:  # an old GNU tar, or another tar (--sort is GNU tar's)
        pytest.skip(f"tar --format={format}: {result.stderr.decode(errors='replace')}")
    members = assert_same(result.stdout)
    assert {name.removeprefix("./") for name, _ in members} >= set(names)
