"""resolve_input / resolve_output: folders, globs, brace patterns and URLs to a format and its shards."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from capfilt.errors import InputError, OutputError
from capfilt.paths import resolve_input, resolve_output
from tests.datasets import (
    encode_image,
    make_image,
    make_items,
    write_files_dataset,
    write_hf_parquet,
    write_parquet_shards,
    write_webdataset_shards,
)


def names(spec: str, format_name: str | None = None) -> tuple[str, list[str]]:
    _, fmt, shards = resolve_input(spec, format_name)
    return fmt.name, [shard.name for shard in shards]


def test_webdataset_folder_is_detected_despite_metadata_parquet_beside(tmp_path: Path) -> None:
    write_webdataset_shards(tmp_path, make_items(4), samples_per_shard=2)
    assert (tmp_path / "00000.parquet").exists()
    assert names(str(tmp_path)) == ("webdataset", ["00000", "00001"])


def test_parquet_folder_is_detected(tmp_path: Path) -> None:
    write_parquet_shards(tmp_path, make_items(4), samples_per_shard=2)
    assert names(str(tmp_path)) == ("parquet", ["00000", "00001"])


def test_hugging_face_parquet_folder_is_detected(tmp_path: Path) -> None:
    write_hf_parquet(tmp_path, make_items(2))
    assert names(str(tmp_path)) == ("parquet", ["train-00000-of-00001"])


def test_files_layout_is_detected_despite_metadata_parquet_beside(tmp_path: Path) -> None:
    write_files_dataset(tmp_path, make_items(4), samples_per_shard=2)
    assert (tmp_path / "00000.parquet").exists()
    assert names(str(tmp_path)) == ("files", ["00000", "00001"])


def test_plain_image_folder_is_one_shard_named_after_it(tmp_path: Path) -> None:
    folder = tmp_path / "cats"
    folder.mkdir()
    (folder / "tabby.jpg").write_bytes(encode_image(make_image()))
    (folder / "kitten.png").write_bytes(encode_image(make_image(), "PNG"))
    _, fmt, shards = resolve_input(str(folder))
    assert fmt.name == "files" and [(s.name, s.path) for s in shards] == [("cats", str(folder))]


def test_class_folders_are_one_shard_each(tmp_path: Path) -> None:
    for label in ("dog", "cat"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "1.jpg").write_bytes(encode_image(make_image()))
    (tmp_path / "empty").mkdir()
    assert names(str(tmp_path)) == ("files", ["cat", "dog"])


def test_glob_selects_shards_in_sorted_order(tmp_path: Path) -> None:
    write_webdataset_shards(tmp_path, make_items(6), samples_per_shard=2)
    assert names(f"{tmp_path}/*.tar") == ("webdataset", ["00000", "00001", "00002"])
    assert names(f"{tmp_path}/0000[12].tar") == ("webdataset", ["00001", "00002"])


def test_brace_pattern_keeps_its_order(tmp_path: Path) -> None:
    write_parquet_shards(tmp_path, make_items(6), samples_per_shard=2)
    assert names(f"{tmp_path}/{{00002,00000}}.parquet") == ("parquet", ["00002", "00000"])
    assert names(f"{tmp_path}/{{00000..00002}}.parquet") == ("parquet", ["00000", "00001", "00002"])


def test_glob_of_shard_folders_reads_files_format(tmp_path: Path) -> None:
    write_files_dataset(tmp_path, make_items(4), samples_per_shard=2)
    assert names(f"{tmp_path}/0000?") == ("files", ["00000", "00001"])


def test_single_shard_file(tmp_path: Path) -> None:
    [path] = write_webdataset_shards(tmp_path, make_items(2))
    _, fmt, [shard] = resolve_input(str(path))
    assert (fmt.name, shard.name, shard.path) == ("webdataset", "00000", str(path))


def test_fsspec_urls_are_resolved_on_their_filesystem() -> None:
    memory = fsspec.filesystem("memory")
    for name in ("00000", "00001"):
        memory.pipe_file(f"/capfilt-paths/{name}.tar", b"")
    try:
        fs, fmt, shards = resolve_input("memory://capfilt-paths/*.tar")
        assert isinstance(fs, MemoryFileSystem) and fmt.name == "webdataset"
        assert [s.path for s in shards] == ["/capfilt-paths/00000.tar", "/capfilt-paths/00001.tar"]
        assert [s.name for s in resolve_input("memory://capfilt-paths")[2]] == ["00000", "00001"]
    finally:
        memory.rm("/capfilt-paths", recursive=True)


def test_format_name_skips_detection(tmp_path: Path) -> None:
    write_parquet_shards(tmp_path, make_items(2))
    assert names(str(tmp_path), "parquet") == ("parquet", ["00000"])
    with pytest.raises(InputError, match="no webdataset shards"):
        resolve_input(str(tmp_path), "webdataset")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{tmp}/nope", "does not exist"),
        ("{tmp}/*.tar", "nothing matches"),
        ("{tmp}/{{00000..00002}}.parquet", "nothing matches .*00000.parquet \\(and 2 more\\)"),
        ("{tmp}", "no dataset recognised .*found docs, notes.txt"),
        ("{tmp}/*", "notes.txt, which is not a shard"),
        ("{tmp}/notes.txt", "is not a shard"),
    ],
)
def test_mistakes_are_clear_input_errors(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("no images here")
    with pytest.raises(InputError, match=message):
        resolve_input(spec.format(tmp=tmp_path))


def test_unknown_format_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown format 'tfrecord'; choose one of: webdataset, files, parquet"):
        resolve_input(str(tmp_path), "tfrecord")


def test_mixed_formats_in_one_pattern_are_refused(tmp_path: Path) -> None:
    write_webdataset_shards(tmp_path, make_items(2), metadata_files=True)
    with pytest.raises(InputError, match="several formats"):
        resolve_input(f"{tmp_path}/00000.{{tar,parquet}}")


def test_two_shards_of_one_name_are_refused(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        write_webdataset_shards(tmp_path / folder, make_items(1), metadata_files=False)
    with pytest.raises(InputError, match="would both write shard 00000"):
        resolve_input(f"{tmp_path}/*/*.tar")


def test_resolve_output_creates_the_folder(tmp_path: Path) -> None:
    fs, path = resolve_output(str(tmp_path / "out" / "captioned"))
    assert fs.isdir(path) and path == str(tmp_path / "out" / "captioned")


def test_resolve_output_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "out.tar").write_bytes(b"")
    with pytest.raises(OutputError, match="is a file"):
        resolve_output(str(tmp_path / "out.tar"))
