"""resolve_input / resolve_output: folders, globs, brace patterns and URLs to a format and its shards."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from capfilt.errors import InputError, OutputError
from capfilt.formats import FORMATS
from capfilt.paths import check_output_apart, resolve_input, resolve_output
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
        ("{tmp}/*", "notes.txt, which is not a shard .*--input-format"),
        ("{tmp}/notes.txt", "is not a shard .*name its format with --input-format"),
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


@pytest.mark.parametrize(
    "input_spec, output, message",
    [
        ("{tmp}/in", "{tmp}/in", "holds the input shard"),
        ("{tmp}/in", "{tmp}/in/out", "inside the input folder"),
        ("{tmp}/in/", "{tmp}/in/a/b", "inside the input folder"),
        ("{tmp}/in/00000", "{tmp}/in/00000/out", "inside the input shard"),
    ],
)
def test_an_output_in_or_inside_the_input_is_refused(tmp_path: Path, input_spec: str, output: str,
                                                     message: str) -> None:
    write_files_dataset(tmp_path / "in", make_items(2), samples_per_shard=1)
    spec = input_spec.format(tmp=tmp_path)
    fs, _, shards = resolve_input(spec)
    with pytest.raises(OutputError, match=message):
        check_output_apart(fs, shards, fs, output.format(tmp=tmp_path), spec)


@pytest.mark.parametrize("input_spec", ["{tmp}/in/00000.tar", "{tmp}/in/*.tar", "{tmp}/in/{{00000..00001}}.tar"])
def test_an_output_beside_shards_named_one_by_one_is_allowed(tmp_path: Path, input_spec: str) -> None:
    """Only a folder given as input is read whole again later; shards named by path or pattern are not."""
    write_webdataset_shards(tmp_path / "in", make_items(2), samples_per_shard=1)
    spec = input_spec.format(tmp=tmp_path)
    fs, _, shards = resolve_input(spec)
    check_output_apart(fs, shards, fs, str(tmp_path / "in" / "out"), spec)


def test_shards_tell_their_sample_count_without_being_read(tmp_path: Path) -> None:
    items = make_items(5)
    items[1] = (items[1][0], None, items[1][2], None)  # a failed download: not in tars or folders
    write_webdataset_shards(tmp_path / "wds", items, samples_per_shard=3)
    write_files_dataset(tmp_path / "files", items, samples_per_shard=3)
    write_parquet_shards(tmp_path / "parquet", items, samples_per_shard=3)  # failed rows kept, image null
    write_hf_parquet(tmp_path / "hf", items)
    expected = {"wds": [2, 2], "files": [2, 2], "parquet": [3, 2], "hf": [5]}
    for folder, counts in expected.items():
        fs, fmt, shards = resolve_input(str(tmp_path / folder))
        assert [fmt.expected_samples(fs, shard) for shard in shards] == counts, folder
        samples = [sum(1 for _ in fmt.read_shard(fs, shard, None)) for shard in shards]
        assert samples == counts, folder  # what the reader yields, rejects included: the progress bar's count


def test_a_shard_without_a_count_beside_it_tells_none(tmp_path: Path) -> None:
    write_webdataset_shards(tmp_path / "bare", make_items(2), metadata_files=False)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "tabby.jpg").write_bytes(encode_image(make_image()))
    write_webdataset_shards(tmp_path / "broken", make_items(2))
    (tmp_path / "broken" / "00000_stats.json").write_text("{not json")
    for folder in ("bare", "cats", "broken"):
        fs, fmt, shards = resolve_input(str(tmp_path / folder))
        assert fmt.expected_samples(fs, shards[0]) is None, folder
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    fs, _, [shard] = resolve_input(str(tmp_path / "bad.parquet"))
    assert FORMATS["parquet"].expected_samples(fs, shard) is None


def test_a_capfilt_output_read_as_input_tells_what_it_wrote(tmp_path: Path) -> None:
    write_webdataset_shards(tmp_path, make_items(3), metadata_files=False)
    (tmp_path / "00000_stats.json").write_text('{"shard": "00000", "read": 4, "written": 3, "error": null}')
    fs, fmt, [shard] = resolve_input(str(tmp_path / "00000.tar"))
    assert fmt.expected_samples(fs, shard) == 3
    (tmp_path / "00000_stats.json").write_text('{"shard": "00000", "read": 4, "written": 3, "error": "truncated"}')
    assert fmt.expected_samples(fs, shard) is None
