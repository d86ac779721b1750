"""Turn the user's input and output arguments into a filesystem, a format and a list of shards.

An input is a dataset folder (its format detected from its contents), one shard, a glob (`data/*.tar`) or a
brace pattern (`shards/{00000..00099}.tar`, as webdataset writes them), on a local path or any fsspec URL
(`s3://bucket/data/*.tar`). Every mistake is an `InputError` that says what to fix.
"""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
from braceexpand import braceexpand
from fsspec import AbstractFileSystem

from capfilt.errors import InputError, OutputError
from capfilt.formats import FORMATS, Format, Shard, detect_format, get_format

_GLOB_CHARS = "*?["
_SUFFIXES = ", ".join(suffix for fmt in FORMATS.values() for suffix in fmt.suffixes)


def resolve_input(
    spec: str, format_name: str | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, Format, list[Shard]]:
    """The filesystem, format and shards that `spec` names; `format_name` skips detection.

    A folder gives its shards sorted by name; a glob gives its matches sorted; a brace pattern keeps its own
    order. Every path of a brace pattern must exist, and every glob must match something.
    """
    fmt = get_format(format_name) if format_name else None
    fs, paths = _to_fs(_patterns(spec), storage_options or {})
    if len(paths) == 1 and not _is_glob(paths[0]):
        fmt, shards = _single_path(fs, paths[0], spec, fmt)
    else:
        matches = _expand(fs, paths, spec)
        fmt = fmt or _format_of_matches(fs, matches, spec)
        shards = [fmt.shard_from_path(path) for path in matches]
    _check_unique_names(shards, spec)
    return fs, fmt, shards


def open_output(spec: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and folder path of the output `spec`, which may not exist."""
    try:
        fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
    except (ValueError, ImportError) as error:
        raise OutputError(f"cannot open output {spec}: {error}") from error
    return fs, path


def resolve_output(
    spec: str, storage_options: dict[str, Any] | None = None, create: bool = True
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and folder path of the output `spec`, creating the folder unless `create` is False."""
    fs, path = open_output(spec, storage_options)
    if fs.isfile(path):
        raise OutputError(f"output {spec} is a file; give a folder for the output shards")
    if create:
        fs.makedirs(path, exist_ok=True)
    return fs, path.rstrip("/")


def check_output_apart(
    fs_in: AbstractFileSystem, shards: list[Shard], fs_out: AbstractFileSystem, output: str, input_spec: str | None = None
) -> None:
    """Refuse an output folder that holds input shards (output shards of the same names would replace them),
    or lies inside an input shard or inside the folder given as input (a later run over that folder would read
    the output as input). `input_spec` is the input as the user gave it."""
    if fs_in.protocol != fs_out.protocol:
        return
    output = output.rstrip("/")
    for shard in shards:
        path = shard.path.rstrip("/")
        if output in (path, posixpath.dirname(path)):
            raise OutputError(f"the output folder {output} holds the input shard {path}; write to another folder")
        if output.startswith(f"{path}/"):
            raise OutputError(f"the output folder {output} is inside the input shard {path}; write to another folder")
    folder = _input_folder(shards, input_spec)
    if folder is not None and output.startswith(f"{folder}/"):
        raise OutputError(f"the output folder {output} is inside the input folder {folder}; write to a folder outside it")


def _input_folder(shards: list[Shard], input_spec: str | None) -> str | None:
    """The folder the input names, when it names one folder of shards (not a pattern, not a shard itself)."""
    if input_spec is None or _is_glob(input_spec) or len(_patterns(input_spec)) > 1:
        return None
    folder = fsspec.core.strip_protocol(input_spec).rstrip("/")
    return None if any(shard.path.rstrip("/") == folder for shard in shards) else folder


def _patterns(spec: str) -> list[str]:
    """The paths a brace pattern names, in its order; a spec without braces is itself."""
    try:
        return list(braceexpand(spec))
    except ValueError:  # unbalanced braces: a literal path
        return [spec]


def _to_fs(patterns: list[str], storage_options: dict[str, Any]) -> tuple[AbstractFileSystem, list[str]]:
    """The filesystem of the patterns (fsspec caches it, so one instance serves all) and their paths on it."""
    try:
        resolved = [fsspec.core.url_to_fs(pattern, **storage_options) for pattern in patterns]
    except (ValueError, ImportError) as error:
        raise InputError(f"cannot open input {patterns[0]}: {error}") from error
    return resolved[0][0], [path for _, path in resolved]


def _single_path(fs: AbstractFileSystem, path: str, spec: str, fmt: Format | None) -> tuple[Format, list[Shard]]:
    if not fs.exists(path):
        raise InputError(f"input {spec} does not exist")
    if fs.isdir(path):
        fmt = fmt or detect_format(fs, path)
        shards = fmt.list_shards(fs, path)
        if not shards:
            raise InputError(f"no {fmt.name} shards in {spec}")
        return fmt, shards
    fmt = fmt or _format_of_file(path)
    if fmt is None:
        raise InputError(
            f"input {spec} is not a shard ({_SUFFIXES}); name its format with --input-format to read it anyway"
        )
    return fmt, [fmt.shard_from_path(path)]


def _expand(fs: AbstractFileSystem, paths: list[str], spec: str) -> list[str]:
    matches: list[str] = []
    missing: list[str] = []
    for path in paths:
        found = sorted(fs.glob(path)) if _is_glob(path) else [path] if fs.exists(path) else []
        matches += found
        if not found:
            missing.append(path)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"input {spec}: nothing matches {missing[0]}{more}")
    return matches


def _format_of_matches(fs: AbstractFileSystem, matches: list[str], spec: str) -> Format:
    """The one format of the paths a pattern matched: a path named with a format's suffix is that format's
    shard (a folder so named fails alone when read), other folders are `files` shards."""
    found: dict[str, Format] = {}
    for path in matches:
        fmt = _format_of_file(path) or (FORMATS["files"] if fs.isdir(path) else None)
        if fmt is None:
            raise InputError(f"input {spec} matches {path}, which is not a shard ({_SUFFIXES}); narrow the pattern "
                             "or name the format with --input-format")
        found[fmt.name] = fmt
    if len(found) > 1:
        raise InputError(f"input {spec} matches shards of several formats ({', '.join(found)}); narrow the pattern")
    return next(iter(found.values()))


def _format_of_file(path: str) -> Format | None:
    return next((fmt for fmt in FORMATS.values() if fmt.suffixes and path.endswith(fmt.suffixes)), None)


def _check_unique_names(shards: list[Shard], spec: str) -> None:
    """Each shard's outputs take its name, so two shards of one name would overwrite each other."""
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise InputError(f"input {spec}: {seen[shard.name]} and {shard.path} would both write shard {shard.name}")
        seen[shard.name] = shard.path


def _is_glob(path: str) -> bool:
    return any(char in path for char in _GLOB_CHARS)
