"""Fault injection: bad samples and bad shards among good ones, through the real pipeline.

A bad sample never stops a run: every input sample ends written, dropped or rejected with its reason, checked
key by key. A bad shard fails alone: the run finishes, the other shards are complete, the summary names it,
and the command exits non-zero with its summary and no traceback. Unusual but valid images are written with
their bytes unchanged. `test_coverage` prints how many kinds of bad input the suite covers.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageFile
from typer.testing import CliRunner

from capfilt.api import build_config
from capfilt.cli import app
from capfilt.config import Command, FilterMode, RunConfig
from capfilt.decode import DEFAULT_MAX_PIXELS
from capfilt.formats import FORMATS
from capfilt.models.blip import BlipFilter
from capfilt.pipeline import run
from capfilt.sample import Sample
from capfilt.stats import RunSummary
from tests.datasets import encode_image, make_image

pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow's, on a valid image
WRITTEN = "written"
FS = LocalFileSystem()


def config(command: Command, input: Path | str, output: Path, models: tuple[str, str], **options) -> RunConfig:
    """A run that keeps every caption (itm>=0, itc>=-1, annotate), so nothing is dropped unless a test means it:
    what `capfilt.run` runs with these options (the CLI's names) on the CPU; `options` override."""
    settings: dict = {"device": "cpu", "dtype": "float32", "batch_size": 16}
    if command in (Command.caption, Command.bootstrap):  # greedy decoding of short captions
        settings.update(captioner=models[0], num_beams=1, max_length=8, min_length=2)
    if command in (Command.filter, Command.bootstrap):
        settings.update(filter=[models[1]], keep=["itm>=0", "itc>=-1"], mode=FilterMode.annotate)
    return build_config(command, str(input), str(output), **{**settings, **options})


# --- inputs -------------------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels but that holds one row: a decompression bomb
    as far as any decoder that trusts the header is concerned."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view, as phones write it
    return encode_image(make_image(48, 32, (20, 160, 60)), "JPEG", exif=exif.tobytes())


def animation(fmt: str) -> bytes:
    frames = [make_image(32, 32, (220, 20, 20)), make_image(32, 32, (20, 20, 220))]
    return encode_image(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def rgba_png() -> bytes:
    image = Image.new("RGBA", (32, 32), (200, 0, 0, 0))
    image.paste((0, 0, 200, 255), (8, 8, 24, 24))
    return encode_image(image, "PNG")


GOOD = [encode_image(make_image(32, 24, ((37 * n) % 256, (91 * n) % 256, 90))) for n in range(4)]
MEGA_CAPTION = "a red circle " * 80_000  # 1 MB of text
MEGA_PREFIX = MEGA_CAPTION[:400]  # the same first 35 tokens, all the filter reads

# Valid images a web crawl brings, which must be written with their bytes unchanged.
UNUSUAL_IMAGES: dict[str, tuple[str, bytes]] = {
    "cmyk-jpeg": ("jpg", encode_image(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")),
    "grayscale-jpeg": ("jpg", encode_image(Image.new("L", (40, 40), 90), "JPEG")),
    "progressive-jpeg": ("jpg", encode_image(make_image(40, 40), "JPEG", progressive=True)),
    "exif-rotated-jpeg": ("jpg", exif_rotated_jpeg()),
    "alpha-png": ("png", rgba_png()),
    "palette-png": ("png", encode_image(make_image(40, 40, (10, 200, 10)).convert("P"), "PNG")),
    "16-bit-png": ("png", encode_image(Image.new("I;16", (40, 40), 30000), "PNG")),
    "webp": ("webp", encode_image(make_image(40, 40), "WEBP")),
    "animated-webp": ("webp", animation("WEBP")),
    "animated-gif": ("gif", animation("GIF")),
    "bmp": ("bmp", encode_image(make_image(40, 40), "BMP")),
    "tiff": ("tiff", encode_image(make_image(40, 40), "TIFF")),
    "1x1-pixel": ("png", encode_image(make_image(1, 1), "PNG")),
    "256x1-sliver": ("jpg", encode_image(make_image(256, 1), "JPEG")),
    "jpeg-named-png": ("png", GOOD[0]),
    "corrupt-exif-jpeg": ("jpg", GOOD[0][:2] + b"\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff\xff\x7f" + GOOD[0][2:]),
}


@dataclass(frozen=True)
class Case:
    """One input sample of a fault shard: its key, its members (extension -> bytes, in order), what must become
    of it in a bootstrap and in a filter run (WRITTEN or a reject reason), the formats it can be stored in, the
    key it is stored under when that differs from the one it is reported under, and its kind of fault when the
    key does not say it."""

    key: str
    members: dict[str, bytes]
    bootstrap: str
    filter: str = ""
    formats: tuple[str, ...] = ("webdataset", "files")
    stored_key: str = ""
    kind: str = ""

    def outcome(self, command: Command) -> str:
        return self.bootstrap if command is Command.bootstrap else self.filter or self.bootstrap


def image_case(key: str, image: bytes, reason: str, ext: str = "jpg") -> Case:
    return Case(key, {ext: image, "txt": f"caption of {key}".encode()}, reason)


# Bad samples of webdataset and files shards, between good ones; each key names the kind of fault.
BAD_SAMPLES = [
    image_case("truncated-jpeg", GOOD[1][: len(GOOD[1]) // 2], "undecodable_image"),
    image_case("zero-byte-image", b"", "empty_image"),
    image_case("not-an-image", b"<html><body>404 Not Found</body></html>", "undecodable_image"),
    image_case("bomb-60000px", png_declaring(60000, 60000), "image_too_large", "png"),
    image_case("bomb-9000px", png_declaring(9000, 9000), "image_too_large", "png"),  # under Pillow's own limit
    Case("no-caption", {"jpg": GOOD[1]}, WRITTEN, "missing_caption"),
    Case("non-utf8-caption", {"jpg": GOOD[1], "txt": "café".encode("latin-1")}, "bad_caption"),
    Case("empty-caption", {"jpg": GOOD[1], "txt": b""}, WRITTEN, "missing_caption"),
    Case("blank-caption", {"jpg": GOOD[1], "txt": b" \n\t "}, WRITTEN, "missing_caption"),
    Case("caption-of-control-characters", {"jpg": GOOD[1], "txt": "\x00\x01\x1b[31m\x7f\u200b".encode()}, WRITTEN),
    Case("caption-of-special-tokens", {"jpg": GOOD[1], "txt": b"[SEP] [PAD] [CLS] [MASK] [DEC] [UNK]"}, WRITTEN),
    Case("unparsable-json", {"jpg": GOOD[1], "txt": b"ok", "json": b'{"url": "http://x'}, "bad_json"),
    Case("json-not-an-object", {"jpg": GOOD[1], "txt": b"ok", "json": b'["url", 1]'}, "bad_json"),
    Case("json-nested-too-deep", {"jpg": GOOD[1], "json": b"[" * 100_000 + b"]" * 100_000}, "bad_json"),
    Case("json-lone-surrogate", {"jpg": GOOD[1], "txt": b"ok", "json": b'{"url": "\\udc80"}'}, "bad_json"),
    Case("json-caption-not-text", {"jpg": GOOD[1], "json": b'{"web_caption": 5}'}, "bad_json"),
    Case("caption-without-image", {"txt": b"an orphan caption"}, "missing_image"),
    Case("json-without-image", {"json": b'{"url": "http://x/y.jpg"}'}, "missing_image"),
    Case("k" * 220, {"jpg": GOOD[1], "txt": b"too long for a file name"}, "bad_name", kind="key-too-long"),
    # A name that is not UTF-8 (b"caf\xe9" from a Latin-1 system) is reported with the byte escaped.
    Case("caf\\udce9", {"jpg": GOOD[1], "txt": b"ok"}, "bad_name", stored_key="caf" + os.fsdecode(b"\xe9"),
         kind="non-utf8-name"),
    Case("../escape", {"jpg": GOOD[1], "txt": b"ok"}, "bad_name", formats=("webdataset",)),
    Case("dup", {"jpg": GOOD[1], "txt": b"first"}, WRITTEN, formats=("webdataset",)),
    Case("dup", {"jpg": GOOD[2], "txt": b"second, at once"}, "duplicate_key", formats=("webdataset",),
         kind="key-repeated-at-once"),
    Case("unreadable", {"jpg": GOOD[1], "txt": b"ok"}, "unreadable_file", formats=("files",),
         kind="unreadable-file"),
]
UNUSUAL = [image_case(name, data, WRITTEN, ext) for name, (ext, data) in UNUSUAL_IMAGES.items()]


def fault_cases(fmt: str) -> list[Case]:
    """Good samples with every bad and unusual one of `fmt` between them, and a key repeated at the end."""
    cases = [Case(f"good-{n}", {"jpg": GOOD[n], "txt": f"good picture {n}".encode()}, WRITTEN) for n in range(3)]
    cases[1:1] = [c for c in BAD_SAMPLES + UNUSUAL if fmt in c.formats]
    if fmt == "webdataset":
        cases.append(Case("good-0", {"jpg": GOOD[3], "txt": b"later"}, "duplicate_key", formats=("webdataset",)))
    return cases


def write_tar(path: Path, cases: list[Case]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for case in cases:
            for ext, data in case.members.items():
                info = tarfile.TarInfo(f"{case.stored_key or case.key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_folder(path: Path, cases: list[Case]) -> None:
    path.mkdir()
    for case in cases:
        for ext, data in case.members.items():
            (path / f"{case.stored_key or case.key}.{ext}").write_bytes(data)


# --- reading back what a run did ----------------------------------------------------------------------------


def read_written(out: Path, fmt: str) -> list[Sample]:
    """Every written sample, read back with capfilt's own reader."""
    reader = FORMATS[fmt]
    return [s for shard in reader.list_shards(FS, str(out)) for s in reader.read_shard(FS, shard, None)
            if isinstance(s, Sample)]


def jsonl(out: Path, suffix: str) -> list[dict]:
    lines = [line for path in sorted(out.glob(f"*_{suffix}.jsonl")) for line in path.read_text().splitlines()]
    return [json.loads(line) for line in lines]


def outcomes(out: Path, fmt: str) -> Counter[tuple[str, str]]:
    """(key, what became of it) for every sample the run accounted for: written, dropped or its reject reason."""
    found = [(s.key, WRITTEN) for s in read_written(out, fmt)]
    found += [(r["key"], "dropped") for r in jsonl(out, "dropped")]
    found += [(r["key"], r["reason"]) for r in jsonl(out, "rejects")]
    return Counter(found)


def check_counts(out: Path, summary: RunSummary) -> None:
    """The summary, the saved summary and the shards' stats agree, and read = written + dropped + rejected."""
    assert summary.read == summary.written + summary.dropped + summary.rejected
    saved = json.loads((out / "capfilt_summary.json").read_text())
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    for name in ("read", "written", "dropped", "rejected"):
        assert saved[name] == getattr(summary, name) == sum(s[name] for s in stats), name
    assert sum(summary.reject_reasons.values()) == summary.rejected == len(jsonl(out, "rejects"))
    assert summary.dropped == len(jsonl(out, "dropped"))


# --- bad samples ----------------------------------------------------------------------------------------------


@dataclass
class PillowSpy:
    """Records the size of every image whose pixels Pillow decodes, to show a bomb is refused before."""

    sizes: list[tuple[int, int]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        load = ImageFile.ImageFile.load

        def recording_load(image: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
            self.sizes.append(image.size)
            return load(image)

        monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)


def unreadable(monkeypatch: pytest.MonkeyPatch, locked: Path) -> None:
    """Make the file `locked` unreadable, as chmod 000 does for a user who is not root (tests run as root)."""
    original = LocalFileSystem._open

    def refusing_open(self: LocalFileSystem, path: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path == str(locked):
            raise PermissionError(13, "Permission denied", path)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", refusing_open)


@pytest.mark.parametrize(
    "fmt, command", [("webdataset", Command.bootstrap), ("webdataset", Command.filter), ("files", Command.filter)]
)
def test_every_bad_sample_is_accounted_for_by_key(tiny_models, tmp_path, monkeypatch, fmt: str,
                                                  command: Command) -> None:
    cases = fault_cases(fmt)
    (tmp_path / "in").mkdir()
    if fmt == "webdataset":
        write_tar(tmp_path / "in" / "00000.tar", cases)
    else:
        write_folder(tmp_path / "in" / "00000", cases)
    unreadable(monkeypatch, tmp_path / "in" / "00000" / "unreadable.jpg")
    spy = PillowSpy()
    spy.install(monkeypatch)
    out = tmp_path / "out"

    summary = run(config(command, tmp_path / "in", out, tiny_models))

    expected = Counter((c.key, c.outcome(command)) for c in cases)
    assert outcomes(out, fmt) == expected
    check_counts(out, summary)
    assert summary.reject_reasons == dict(sorted(Counter(o for _, o in expected.elements() if o != WRITTEN).items()))
    assert summary.failed_shards == {} and summary.dropped == 0
    assert max(w * h for w, h in spy.sizes) <= DEFAULT_MAX_PIXELS  # no bomb got as far as decoding pixels

    written = {s.key: s for s in read_written(out, fmt)}
    sources = {c.key: c for c in cases if c.outcome(command) == WRITTEN}
    for key, sample in written.items():  # every image exactly as it came, whatever its encoding
        image_ext = next(ext for ext in sources[key].members if ext != "txt")
        assert (sample.image_ext, sample.image_bytes) == (image_ext, sources[key].members[image_ext]), key
        assert all({"itm", "itc"} <= set(c.scores) for c in sample.captions())
    if command is Command.bootstrap:  # a caption-less image gets a synthetic caption instead
        assert written["no-caption"].web_caption is None and written["no-caption"].synthetic_captions
    assert written["good-0"].image_bytes == GOOD[0]  # of a repeated key, the first sample is the one written
    if fmt == "webdataset":
        assert written["dup"].image_bytes == GOOD[1]


@pytest.fixture(scope="module")
def mega_caption_run(tiny_models, tmp_path_factory) -> tuple[Path, list[str]]:
    """A filter run over a shard holding a 1 MB caption, and every text the filter tokenised."""
    directory = tmp_path_factory.mktemp("mega")
    (directory / "in").mkdir()
    cases = [Case("mega-caption", {"jpg": GOOD[2], "txt": MEGA_CAPTION.encode()}, WRITTEN),
             Case("mega-caption-prefix", {"jpg": GOOD[2], "txt": MEGA_PREFIX.encode()}, WRITTEN),
             Case("good-0", {"jpg": GOOD[0], "txt": b"a good picture"}, WRITTEN)]
    write_tar(directory / "in" / "00000.tar", cases)
    tokenised: list[str] = []
    tokenize = BlipFilter.tokenize
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlipFilter, "tokenize", lambda self, texts: tokenised.extend(texts) or tokenize(self, texts))
        run(config(Command.filter, directory / "in", directory / "out", tiny_models))
    return directory / "out", tokenised


def test_a_megabyte_caption_is_written_whole_and_scored_on_its_first_tokens(mega_caption_run) -> None:
    out, _ = mega_caption_run
    assert outcomes(out, "webdataset") == Counter({(k, WRITTEN): 1 for k in ("mega-caption", "mega-caption-prefix",
                                                                             "good-0")})
    written = {s.key: s for s in read_written(out, "webdataset")}
    mega, prefix = written["mega-caption"], written["mega-caption-prefix"]
    assert mega.web_caption == MEGA_CAPTION
    assert mega.web_scores["itm"] == pytest.approx(prefix.web_scores["itm"], abs=1e-5)
    assert mega.web_scores["itc"] == pytest.approx(prefix.web_scores["itc"], abs=1e-5)


def test_a_megabyte_caption_is_tokenised_once(mega_caption_run) -> None:
    _, tokenised = mega_caption_run
    assert sum(map(len, tokenised)) < 2 * len(MEGA_CAPTION)


# Bad rows of a Parquet shard in img2dataset's layout (key, caption, jpg), between good ones.
PARQUET_ROWS: list[tuple[str, bytes | None, str | None, str, str]] = [
    # key, image, caption, bootstrap outcome, filter outcome
    ("good-0", GOOD[0], "good picture 0", WRITTEN, WRITTEN),
    ("failed-download", None, "a picture that never came", "missing_image", "missing_image"),
    ("zero-byte-image", b"", "empty", "empty_image", "empty_image"),
    ("not-an-image", b"<html>404</html>", "html", "undecodable_image", "undecodable_image"),
    ("truncated-jpeg", GOOD[1][:200], "cut", "undecodable_image", "undecodable_image"),
    ("bomb-60000px", png_declaring(60000, 60000), "bomb", "image_too_large", "image_too_large"),
    ("no-caption", GOOD[1], None, WRITTEN, "missing_caption"),
    ("empty-caption", GOOD[1], "", WRITTEN, "missing_caption"),
    ("", GOOD[1], "an empty key", "bad_name", "bad_name"),
    ("../escape", GOOD[1], "a key that climbs out", "bad_name", "bad_name"),
    ("good-1", GOOD[2], "good picture 1", WRITTEN, WRITTEN),
    ("good-0", GOOD[3], "the same key again", "duplicate_key", "duplicate_key"),
    *[(name, data, f"a {name}", WRITTEN, WRITTEN) for name, (_, data) in UNUSUAL_IMAGES.items()],
]


def write_parquet(path: Path, rows: list[tuple], row_group_size: int = 4) -> None:
    """img2dataset's columns that matter here: key, caption, jpg."""
    table = pa.table({"key": pa.array([r[0] for r in rows], pa.string()),
                      "caption": pa.array([r[2] for r in rows], pa.string()),
                      "jpg": pa.array([r[1] for r in rows], pa.binary())})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.mark.parametrize("command", [Command.bootstrap, Command.filter])
def test_every_bad_parquet_row_is_accounted_for_by_key(tiny_models, tmp_path, command: Command) -> None:
    (tmp_path / "in").mkdir()
    write_parquet(tmp_path / "in" / "00000.parquet", PARQUET_ROWS)
    # A caption column of binary type holds UTF-8 text; a cell that is not UTF-8 is a bad caption.
    captions = pa.array(["café".encode(), "café".encode("latin-1")], pa.binary())
    table = pa.table({"key": ["utf8-bytes", "latin1-bytes"], "caption": captions, "jpg": [GOOD[0], GOOD[1]]})
    pq.write_table(table, tmp_path / "in" / "00001.parquet")
    out = tmp_path / "out"
    summary = run(config(command, tmp_path / "in", out, tiny_models))

    expected = Counter((r[0], r[3] if command is Command.bootstrap else r[4]) for r in PARQUET_ROWS)
    expected.update([("utf8-bytes", WRITTEN), ("latin1-bytes", "bad_caption")])
    assert outcomes(out, "parquet") == expected
    check_counts(out, summary)
    assert summary.reject_reasons == dict(sorted(Counter(o for _, o in expected.elements() if o != WRITTEN).items()))
    written = {s.key: s for s in read_written(out, "parquet")}
    assert written["utf8-bytes"].web_caption == "café" and written["good-0"].image_bytes == GOOD[0]
    for name, (_, data) in UNUSUAL_IMAGES.items():
        assert written[name].image_bytes == data, name


# --- bad shards -----------------------------------------------------------------------------------------------


class ShardCase(NamedTuple):
    """A shard of a bad-shard dataset: what it is, how to build it at a path, whether the run must name it
    failed, and the (key, outcome) pairs of a shard that must come through complete."""

    kind: str
    build: Callable[[Path], None]
    fails: bool = True
    expected: tuple[tuple[str, str], ...] = ()


def good_tar(path: Path, keys: list[str]) -> None:
    write_tar(path, [Case(k, {"jpg": GOOD[n % 4], "txt": f"picture {k}".encode()}, WRITTEN)
                     for n, k in enumerate(keys)])


def truncated_tar(path: Path) -> None:
    good_tar(path, ["cut-0", "cut-1", "cut-2", "cut-3"])
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"picture cut-2") + 4])  # inside cut-2's caption


def cut_gzip_tar(path: Path) -> None:
    good_tar(path, ["gz-0", "gz-1"])
    data = gzip.compress(path.read_bytes())
    path.unlink()
    path.with_suffix(".tar.gz").write_bytes(data[: len(data) * 2 // 3])


def good_parquet(path: Path, keys: list[str]) -> None:
    write_parquet(path, [(k, GOOD[n % 4], f"picture {k}", WRITTEN, WRITTEN) for n, k in enumerate(keys)])


def truncated_parquet(path: Path) -> None:
    good_parquet(path, ["half-0", "half-1"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def parquet_with_corrupt_last_row_group(path: Path) -> None:
    """Three row groups of two rows; the third's first page header is garbage."""
    rows = [(f"rg-{n}", GOOD[n % 4], f"picture {n}", WRITTEN, WRITTEN) for n in range(6)]
    write_parquet(path, rows, row_group_size=2)
    data = bytearray(path.read_bytes())
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    offset = column.dictionary_page_offset or column.data_page_offset
    data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def written(*keys: str) -> tuple[tuple[str, str], ...]:
    return tuple((key, WRITTEN) for key in keys)


# Shard NAME is built at NAME.tar (NAME.parquet): a folder of each format with its good and bad shards.
BAD_TARS = {
    "00000": ShardCase("good", lambda p: good_tar(p, ["a-0", "a-1", "a-2"]), False, written("a-0", "a-1", "a-2")),
    "00001": ShardCase("truncated tar", truncated_tar),  # its readable samples: see test_a_broken_shard_keeps...
    "00002": ShardCase("text file named .tar", lambda p: p.write_bytes(b"not a tar, named like one\n" * 40)),
    "00003": ShardCase("unreadable file", lambda p: good_tar(p, ["locked-0"])),  # see `unreadable`
    "00004": ShardCase("empty tar", lambda p: tarfile.open(p, "w").close(), False),  # an empty output shard
    "00005": ShardCase("zero-byte .tar", lambda p: p.write_bytes(b"")),  # a tar cut before its end block
    "00006": ShardCase("gzip stream cut short", cut_gzip_tar),  # written as 00006.tar.gz
    "00007": ShardCase("folder named like a shard", lambda p: p.mkdir()),
    "00008": ShardCase("good", lambda p: good_tar(p, ["z-0", "z-1"]), False, written("z-0", "z-1")),
}
BAD_PARQUETS = {
    "00000": ShardCase("good", lambda p: good_parquet(p, ["a-0", "a-1"]), False, written("a-0", "a-1")),
    "00001": ShardCase("no image column", lambda p: pq.write_table(pa.table({"url": ["x"], "caption": ["c"]}), p)),
    "00002": ShardCase("not Parquet", lambda p: p.write_bytes(b"PAR1 and then not Parquet at all" * 10)),
    "00003": ShardCase("no rows, right schema", lambda p: good_parquet(p, []), False),  # an empty output shard
    "00004": ShardCase("image column of text", lambda p: pq.write_table(pa.table({"jpg": ["a"], "caption": ["c"]}), p)),
    "00005": ShardCase("truncated Parquet", truncated_parquet),
    "00006": ShardCase("unreadable file", lambda p: good_parquet(p, ["locked-0"])),  # see `unreadable`
    "00007": ShardCase("corrupt row group", parquet_with_corrupt_last_row_group),  # see test_a_broken_shard_keeps...
    "00008": ShardCase("folder named like a shard", lambda p: p.mkdir()),
    "00009": ShardCase("good", lambda p: good_parquet(p, ["z-0"]), False, written("z-0")),
}


def build_shards(directory: Path, shards: dict[str, ShardCase], suffix: str) -> None:
    directory.mkdir()
    for name, shard in shards.items():
        shard.build(directory / f"{name}{suffix}")


def check_bad_shards(out: Path, summary: RunSummary, fmt: str, shards: dict[str, ShardCase]) -> None:
    """The failed shards are named with a reason that names the file, the others are complete, and every
    sample read is accounted for."""
    assert sorted(summary.failed_shards) == sorted(name for name, shard in shards.items() if shard.fails)
    for name, reason in summary.failed_shards.items():
        assert f"/{name}." in reason, reason
    found = outcomes(out, fmt)
    for name, shard in shards.items():
        if not shard.fails:
            assert Counter(shard.expected) <= found, name
            stats = json.loads((out / f"{name}_stats.json").read_text())
            assert stats["error"] is None and stats["read"] == stats["written"] == len(shard.expected), name
            assert Path(FORMATS[fmt].output_paths(str(out), name)[0]).exists(), name
    check_counts(out, summary)


def test_bad_tars_fail_alone(tiny_models, tmp_path, monkeypatch) -> None:
    build_shards(tmp_path / "in", BAD_TARS, ".tar")
    unreadable(monkeypatch, tmp_path / "in" / "00003.tar")
    out = tmp_path / "out"
    summary = run(config(Command.filter, tmp_path / "in", out, tiny_models))
    check_bad_shards(out, summary, "webdataset", BAD_TARS)
    empty = FORMATS["webdataset"].shard_from_path(str(out / "00004.tar"))
    assert list(FORMATS["webdataset"].read_shard(FS, empty, None)) == []
    assert "Permission denied" in summary.failed_shards["00003"]
    assert "Is a directory" in summary.failed_shards["00007"]


def test_bad_parquet_files_fail_alone(tiny_models, tmp_path, monkeypatch) -> None:
    build_shards(tmp_path / "in", BAD_PARQUETS, ".parquet")
    unreadable(monkeypatch, tmp_path / "in" / "00006.parquet")
    out = tmp_path / "out"
    summary = run(config(Command.filter, tmp_path / "in", out, tiny_models))
    check_bad_shards(out, summary, "parquet", BAD_PARQUETS)
    assert pq.read_table(out / "00003.parquet").num_rows == 0
    assert "no image column" in summary.failed_shards["00001"]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_broken_shard_keeps_its_readable_samples(tiny_models, tmp_path, fmt: str) -> None:
    (tmp_path / "in").mkdir()
    if fmt == "webdataset":
        truncated_tar(tmp_path / "in" / "00000.tar")
        expected = [("cut-0", WRITTEN), ("cut-1", WRITTEN), ("cut-2", "truncated_shard")]
    else:
        parquet_with_corrupt_last_row_group(tmp_path / "in" / "00000.parquet")
        expected = [(f"rg-{n}", WRITTEN) for n in range(4)]
    summary = run(config(Command.filter, tmp_path / "in", tmp_path / "out", tiny_models))
    assert list(summary.failed_shards) == ["00000"]
    assert outcomes(tmp_path / "out", fmt) == Counter(expected)


def test_a_folder_named_like_a_shard_fails_alone_in_a_pattern(tiny_models, tmp_path) -> None:
    (tmp_path / "in").mkdir()
    good_tar(tmp_path / "in" / "00000.tar", ["a-0"])
    (tmp_path / "in" / "00001.tar").mkdir()
    summary = run(config(Command.filter, f"{tmp_path}/in/{{00000..00001}}.tar", tmp_path / "out", tiny_models))
    assert list(summary.failed_shards) == ["00001"] and summary.written == 1


def test_cli_exits_non_zero_after_the_run_with_its_summary(tiny_models, tmp_path, monkeypatch) -> None:
    build_shards(tmp_path / "in", BAD_TARS, ".tar")
    unreadable(monkeypatch, tmp_path / "in" / "00003.tar")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["filter", str(tmp_path / "in"), str(out), "--filter", tiny_models[1],
                                      "--threshold", "0", "--mode", "annotate", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # typer's exit, not an escaped exception
    assert "Traceback" not in result.output and "capfilt summary" in result.output
    failed = sorted(name for name, shard in BAD_TARS.items() if shard.fails)
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("capfilt: error:") and ", ".join(failed) in last
    assert sorted(json.loads((out / "capfilt_summary.json").read_text())["failed_shards"]) == failed
    assert (out / "00000.tar").exists() and (out / "00008.tar").exists()


# --- coverage -------------------------------------------------------------------------------------------------


def test_coverage() -> None:
    """Counts the kinds of bad input this suite runs through the pipeline (printed with `pytest -s`)."""
    samples = {c.kind or c.key for c in BAD_SAMPLES} - {"dup"}  # the first of two samples keyed "dup" is good
    samples |= {"key-repeated-later", "megabyte-caption", "non-utf8-caption"}
    samples |= {r[0] or "empty-key" for r in PARQUET_ROWS if {r[3], r[4]} != {WRITTEN} and r[0] != "good-0"}
    shards = {f"{fmt}: {shard.kind}" for fmt, shards in (("tar", BAD_TARS), ("parquet", BAD_PARQUETS))
              for shard in shards.values() if shard.kind != "good"} | {"folder named like a shard, in a pattern"}
    print(f"\nfault suite: {len(samples)} kinds of bad sample: {', '.join(sorted(samples))}")
    print(f"{len(UNUSUAL_IMAGES)} kinds of unusual valid image: {', '.join(UNUSUAL_IMAGES)}")
    print(f"{len(shards)} kinds of bad shard: {', '.join(sorted(shards))}")
    assert len(samples) >= 25 and len(UNUSUAL_IMAGES) >= 9 and len(shards) >= 15
