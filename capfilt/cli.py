"""`capfilt` command line: parses flags into a `RunConfig` and runs the pipeline; nothing else.

Only typer and rich load with it, so that `--help`, `--version`, `presets`, `show`, `summary` and every
argument error answer at once: torch and transformers load inside the commands that run models.
"""

from __future__ import annotations

import os
import sys

try:  # a Ctrl-C while the command line itself loads is an interrupt like any other: one line, exit 130
    import json
    import logging
    import traceback
    from collections.abc import Iterator
    from contextlib import contextmanager
    from typing import Annotated, NoReturn

    import typer
    from rich.console import Console

    from capfilt import __version__
    from capfilt.config import Command, DecodingSettings, FilterMode, FilterSettings, RunConfig
    from capfilt.errors import CapfiltError, ConfigError
    from capfilt.log import logger
    from capfilt.presets import DEFAULT_PRESET, Preset, load_preset
except KeyboardInterrupt:
    print("capfilt: interrupted", file=sys.stderr)
    os._exit(130)

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Options whose default comes from elsewhere (the preset, the input, the environment) say where, as click's
# `show_default` text: help text in square brackets would be read as rich markup and vanish. Preset values
# shown are the default preset's, read from its file.
PRESET_DEFAULTS = load_preset(DEFAULT_PRESET)
Input = Annotated[str, typer.Argument(help="Dataset: a directory, a glob or a brace pattern; local or fsspec URL.")]
Output = Annotated[str, typer.Argument(help="Output directory (one output shard per input shard, same names).")]
PresetOpt = Annotated[str, typer.Option("--preset", help="Model preset: blip-large, blip-base, demo, or a .toml.")]
CaptionerOpt = Annotated[
    str | None, typer.Option("--captioner", help="Captioner: HF model id or local dir.", show_default="preset's")
]
FilterOpt = Annotated[
    str | None, typer.Option("--filter", help="Filter: HF model id or local dir.", show_default="preset's")
]
NumCaptions = Annotated[int, typer.Option("--num-captions", help="Synthetic captions per image.")]
NumBeams = Annotated[int, typer.Option("--num-beams", help="1: nucleus sampling; >1: beam search.")]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling top-p.", show_default=f"preset: {PRESET_DEFAULTS.top_p}")]
MaxLength = Annotated[
    int | None, typer.Option("--max-length", help="Max tokens, prompt included.", show_default=f"preset: {PRESET_DEFAULTS.max_length}")
]
MinLength = Annotated[
    int | None, typer.Option("--min-length", help="Min tokens, prompt included.", show_default=f"preset: {PRESET_DEFAULTS.min_length}")
]
RepetitionPenalty = Annotated[
    float | None,
    typer.Option("--repetition-penalty", help="Repetition penalty.", show_default="BLIP's: 1.1 nucleus, 1.0 beam"),
]
Prompt = Annotated[
    str | None,
    typer.Option("--prompt", help="Decoder prompt, stripped from captions.",
                 show_default=f"preset: {PRESET_DEFAULTS.prompt!r}"),
]
Scores = Annotated[str, typer.Option("--scores", help="Scores to compute and require: itm, itc or itm,itc.")]
Threshold = Annotated[
    float | None, typer.Option("--threshold", help="Min ITM match probability.", show_default=f"preset: {PRESET_DEFAULTS.itm_threshold}")
]
ItcThreshold = Annotated[
    float | None, typer.Option("--itc-threshold", help="Min ITC cosine.", show_default=f"preset: {PRESET_DEFAULTS.itc_threshold}")
]
Mode = Annotated[FilterMode, typer.Option("--mode", help="drop: remove failing pairs; annotate: keep all.")]
InputFormat = Annotated[
    str | None, typer.Option("--input-format", help="webdataset, parquet or files.", show_default="detected")
]
OutputFormat = Annotated[
    str | None, typer.Option("--output-format", help="webdataset, parquet or files.", show_default="input's")
]
CaptionColumn = Annotated[
    str | None,
    typer.Option("--caption-column", help="Caption column or extension.", show_default="caption, text or txt"),
]
ImageColumn = Annotated[
    str | None, typer.Option("--image-column", help="Parquet image column.", show_default="detected")
]
Device = Annotated[str, typer.Option("--device", help="auto (GPU if visible), cpu, cuda, cuda:1 ...")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per model batch.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of nucleus sampling.")]
StorageOptions = Annotated[
    str | None, typer.Option("--storage-options", help="fsspec options as JSON.", show_default="none")
]
Quiet = Annotated[
    bool, typer.Option("--quiet", help="No progress bar, summary table or model loading lines; warnings only.")
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error or a failed shard.")]
EagerAttention = Annotated[
    bool, typer.Option("--eager-attention", help="transformers' own BLIP attention instead of fused SDPA.")
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help="torch CPU threads of each model stage.",
                 show_default="on CPU the cores split between the model stages"),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo every shard instead of resuming.")]
Devices = Annotated[
    str | None,
    typer.Option("--devices", help="One worker process per device: all (every GPU), 0,1 or cuda:0,cuda:1.",
                 show_default="--device only"),
]
Ray = Annotated[
    str | None, typer.Option("--ray", help="Run on a Ray cluster: its address, or auto.", show_default="no Ray")
]
RayWorkers = Annotated[
    int | None,
    typer.Option("--ray-workers", help="Ray actors.", show_default="one per cluster GPU, or CPU core on CPU"),
]
ShardIndex = Annotated[
    int | None,
    typer.Option("--shard-index", help="This process's share of a split job.",
                 show_default="$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0"),
]
NumShards = Annotated[
    int | None,
    typer.Option("--num-shards", help="Shares of a split job.", show_default="$SLURM_ARRAY_TASK_COUNT, else 1"),
]


def exit_interrupted(message: str = "capfilt: interrupted") -> NoReturn:
    """After Ctrl-C: one line and exit status 130, without the interpreter's teardown, which with model threads
    and thread pools just stopped (or an import cut short) can abort the process instead of exiting."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def show_version(value: bool) -> None:
    if value:
        print(f"capfilt {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print capfilt's version and exit.")
    ] = False,
) -> None:
    """CapFilt (BLIP): caption and filter image-text datasets: webdataset tars, Parquet, image folders."""


class OneLineHandler(logging.Handler):
    """Prints each record of the `capfilt` logger as one `capfilt: ...` line on stderr, above the progress bar
    while it runs."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        line = f"capfilt: {record.getMessage()}"
        if self.console.quiet:  # the console prints nothing under --quiet, but warnings still show
            print(line, file=sys.stderr)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def configure_logging(console: Console, quiet: bool, debug: bool) -> None:
    """capfilt's messages (which model loads on which device, a fast path switched off): INFO and up, only
    warnings under --quiet; printed once, by this handler alone."""
    logger.handlers = [OneLineHandler(console)]
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def listed_devices(devices: str | None) -> tuple[str, ...]:
    """The devices `--devices` names: `all` is every visible GPU, digits are CUDA devices."""
    if devices == "all":
        import torch

        listed = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        if not listed:
            raise ConfigError("--devices all: no CUDA device is visible")
        return listed
    return tuple(f"cuda:{d}" if d.isdigit() else d for d in (d.strip() for d in (devices or "").split(",")) if d)


def share_of_job(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """This process's share of a split job: the flags, else a SLURM job array's variables, else all of it."""
    if num_shards is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        num_shards = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        minimum = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        shard_index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - minimum if shard_index is None else shard_index
    return shard_index or 0, num_shards or 1


def decoding_settings(preset: Preset, num_captions: int, num_beams: int, top_p: float | None,
                      max_length: int | None, min_length: int | None, repetition_penalty: float | None,
                      prompt: str | None, seed: int) -> DecodingSettings:
    return DecodingSettings(
        num_beams=num_beams,
        num_captions=num_captions,
        top_p=preset.top_p if top_p is None else top_p,
        max_length=preset.max_length if max_length is None else max_length,
        min_length=preset.min_length if min_length is None else min_length,
        repetition_penalty=repetition_penalty,
        prompt=preset.prompt if prompt is None else prompt,
        seed=seed,
    )


def filter_settings(preset: Preset, scores: str, threshold: float | None, itc_threshold: float | None,
                    mode: FilterMode) -> FilterSettings:
    names = {name.strip() for name in scores.split(",") if name.strip()}
    if not names or names - {"itm", "itc"}:
        raise ConfigError(f"--scores takes itm, itc or itm,itc; got '{scores}'")
    return FilterSettings(
        itm="itm" in names,
        itc="itc" in names,
        itm_threshold=preset.itm_threshold if threshold is None else threshold,
        itc_threshold=preset.itc_threshold if itc_threshold is None else itc_threshold,
        mode=mode,
        text_max_tokens=preset.text_max_tokens,
    )


def parse_storage_options(text: str | None) -> dict:
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise ConfigError(f"--storage-options is not valid JSON: {error}") from error
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return options


@contextmanager
def reported_errors(debug: bool) -> Iterator[None]:
    """Failures as one `capfilt: error:` line: the user's own (settings, input, output) with exit status 2;
    anything unexpected with status 1 and, under --debug, its traceback."""
    try:
        yield
    except typer.Exit:
        raise
    except CapfiltError as error:
        _fail(str(error))
    except OSError as error:  # unwritable output, full disk, lost mount: the system's own words suffice
        _fail(f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}")
    except Exception as error:  # noqa: BLE001  (the last resort: a bug, told in one line)
        if debug:
            traceback.print_exc()
        message = " ".join(str(error).split())
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _fail(f"{type(error).__name__}{f': {message}' if message else ''}{hint}", code=1)


def execute(command: Command, input: str, output: str, quiet: bool, debug: bool, device: str, dtype: str,
            storage_options: str | None, devices: str | None, ray: str | None, ray_workers: int | None,
            shard_index: int | None, num_shards: int | None, **settings: object) -> None:
    """Build the config, run the pipeline with progress, print the summary; errors as one line."""
    console = Console(stderr=True, quiet=quiet)
    configure_logging(console, quiet, debug)
    with reported_errors(debug):
        listed = listed_devices(devices)
        index, count = share_of_job(shard_index, num_shards)
        config = RunConfig(command=command, input=input, output=output, device=listed[0] if listed else device,
                           dtype=dtype, storage_options=parse_storage_options(storage_options), devices=listed,
                           ray_address=ray, ray_workers=ray_workers, shard_index=index, num_shards=count, **settings)
        # Every argument is checked by now: only a run that will happen waits for torch and transformers.
        from transformers.utils import logging as transformers_logging

        from capfilt.pipeline import Pipeline
        from capfilt.progress import RichProgress, summary_table

        transformers_logging.disable_progress_bar()  # our own progress bar is the one to watch
        progress = RichProgress(console, debug)
        pipeline = Pipeline(config, progress)  # loads the models; the bar starts after
        try:
            with progress:
                summary = pipeline.run()
        except KeyboardInterrupt:  # the run cleaned up (temporaries, lock) on its way out
            exit_interrupted("capfilt: interrupted; the shard in progress was abandoned, finished shards are kept. "
                             "Rerun the same command to resume.")
    console.print(summary_table(summary, progress.samples))
    if summary.failed_shards:
        _fail(f"{len(summary.failed_shards)} shard(s) failed: {', '.join(summary.failed_shards)} (see the summary)")


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"capfilt: error: {message}", file=sys.stderr)
    raise typer.Exit(code=code)


@app.command()
def caption(
    input: Input, output: Output, preset: PresetOpt = DEFAULT_PRESET, captioner: CaptionerOpt = None,
    num_captions: NumCaptions = 1, num_beams: NumBeams = 1, top_p: TopP = None, max_length: MaxLength = None,
    min_length: MinLength = None, repetition_penalty: RepetitionPenalty = None, prompt: Prompt = None,
    input_format: InputFormat = None, output_format: OutputFormat = None, caption_column: CaptionColumn = None,
    image_column: ImageColumn = None, device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = 32,
    seed: Seed = 0, storage_options: StorageOptions = None, quiet: Quiet = False, debug: Debug = False,
    overwrite: Overwrite = False, eager_attention: EagerAttention = False,
    threads: Threads = None,
    devices: Devices = None, ray: Ray = None, ray_workers: RayWorkers = None,
    shard_index: ShardIndex = None, num_shards: NumShards = None,
) -> None:
    """Add synthetic captions (nucleus sampling by default, beam search with --num-beams)."""
    with reported_errors(debug):
        p = load_preset(preset)
        decoding = decoding_settings(p, num_captions, num_beams, top_p, max_length, min_length,
                                     repetition_penalty, prompt, seed)
    execute(Command.caption, input, output, quiet, debug, device, dtype, storage_options, devices, ray, ray_workers,
            shard_index, num_shards,
            captioner=captioner or p.captioner, decoding=decoding, input_format=input_format,
            output_format=output_format, caption_column=caption_column, image_column=image_column,
            batch_size=batch_size, overwrite=overwrite, sdpa=not eager_attention, threads=threads)


@app.command("filter")
def filter_command(
    input: Input, output: Output, preset: PresetOpt = DEFAULT_PRESET, filter: FilterOpt = None,
    scores: Scores = "itm", threshold: Threshold = None, itc_threshold: ItcThreshold = None,
    mode: Mode = FilterMode.drop, input_format: InputFormat = None, output_format: OutputFormat = None,
    caption_column: CaptionColumn = None, image_column: ImageColumn = None, device: Device = "auto",
    dtype: Dtype = "auto", batch_size: BatchSize = 32, storage_options: StorageOptions = None, quiet: Quiet = False,
    debug: Debug = False, overwrite: Overwrite = False, eager_attention: EagerAttention = False,
    threads: Threads = None,
    devices: Devices = None, ray: Ray = None, ray_workers: RayWorkers = None,
    shard_index: ShardIndex = None, num_shards: NumShards = None,
) -> None:
    """Score web and synthetic captions (ITM and/or ITC) and drop, or annotate, the pairs that do not match."""
    with reported_errors(debug):
        p = load_preset(preset)
        filtering = filter_settings(p, scores, threshold, itc_threshold, mode)
    execute(Command.filter, input, output, quiet, debug, device, dtype, storage_options, devices, ray, ray_workers,
            shard_index, num_shards,
            filter=filter or p.filter, filtering=filtering, input_format=input_format,
            output_format=output_format, caption_column=caption_column, image_column=image_column,
            batch_size=batch_size, overwrite=overwrite, sdpa=not eager_attention, threads=threads)


@app.command()
def bootstrap(
    input: Input, output: Output, preset: PresetOpt = DEFAULT_PRESET, captioner: CaptionerOpt = None,
    filter: FilterOpt = None, num_captions: NumCaptions = 1, num_beams: NumBeams = 1, top_p: TopP = None,
    max_length: MaxLength = None, min_length: MinLength = None, repetition_penalty: RepetitionPenalty = None,
    prompt: Prompt = None, scores: Scores = "itm", threshold: Threshold = None,
    itc_threshold: ItcThreshold = None, mode: Mode = FilterMode.drop, input_format: InputFormat = None,
    output_format: OutputFormat = None, caption_column: CaptionColumn = None, image_column: ImageColumn = None,
    device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = 32, seed: Seed = 0,
    storage_options: StorageOptions = None, quiet: Quiet = False, debug: Debug = False, overwrite: Overwrite = False,
    eager_attention: EagerAttention = False,
    threads: Threads = None,
    devices: Devices = None, ray: Ray = None, ray_workers: RayWorkers = None,
    shard_index: ShardIndex = None, num_shards: NumShards = None,
) -> None:
    """Caption, then filter the web caption and every synthetic caption, in one pass (CapFilt)."""
    with reported_errors(debug):
        p = load_preset(preset)
        decoding = decoding_settings(p, num_captions, num_beams, top_p, max_length, min_length,
                                     repetition_penalty, prompt, seed)
        filtering = filter_settings(p, scores, threshold, itc_threshold, mode)
    execute(Command.bootstrap, input, output, quiet, debug, device, dtype, storage_options, devices, ray, ray_workers,
            shard_index, num_shards,
            captioner=captioner or p.captioner, filter=filter or p.filter, decoding=decoding,
            filtering=filtering, input_format=input_format, output_format=output_format,
            caption_column=caption_column, image_column=image_column, batch_size=batch_size,
            overwrite=overwrite, sdpa=not eager_attention, threads=threads)


@app.command()
def show(
    output: Annotated[str, typer.Argument(help="A capfilt output directory (or a dataset, to see its samples).")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="Samples to show: written, dropped and rejected each.")] = 8,
    storage_options: StorageOptions = None,
    debug: Debug = False,
) -> None:
    """Show samples of an output: every caption with its scores and whether the filter kept it, and rejects."""
    with reported_errors(debug):
        from capfilt.inspect import read_output
        from capfilt.progress import rejects_table, samples_table

        found = read_output(output, limit, parse_storage_options(storage_options))
    console = Console()
    if not found.is_run_output:
        title = f"{output}: first {limit} samples of a dataset no capfilt run wrote"
        console.print(samples_table(found.samples, [], title, label="input"))
        return
    console.print(samples_table(found.samples, found.dropped, f"{output}: first {limit} written and dropped samples"))
    if found.rejects:
        console.print(rejects_table(found.rejects, f"{output}: first {limit} rejected samples"))


@app.command()
def summary(
    output: Annotated[str, typer.Argument(help="The output directory of a split job (--shard-index/--num-shards).")],
    storage_options: StorageOptions = None,
    debug: Debug = False,
) -> None:
    """Merge every shard's stats into the run summary (capfilt_summary.json), once all shares have finished."""
    with reported_errors(debug):
        from capfilt.inspect import summarize
        from capfilt.progress import summary_table

        merged, missing = summarize(output, parse_storage_options(storage_options))
    Console().print(summary_table(merged))
    if missing:
        _fail(f"{len(missing)} shard(s) not complete yet: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
              "; no summary written")
    if merged.failed_shards:
        _fail(f"{len(merged.failed_shards)} shard(s) failed: {', '.join(merged.failed_shards)} (see the summary)")


@app.command()
def presets() -> None:
    """List the model presets; --preset takes the one marked default when not given."""
    from capfilt.presets import available_presets

    with reported_errors(debug=False):
        found = [(name, load_preset(name)) for name in available_presets()]
    labels = {name: f"{name} (default)" if name == DEFAULT_PRESET else name for name, _ in found}
    width = max(map(len, labels.values()), default=0) + 2
    for name, preset in found:
        print(f"{labels[name]:{width}}{preset.description}\n{'':{width}}captioner {preset.captioner}\n"
              f"{'':{width}}filter    {preset.filter}")


def main() -> None:
    """The `capfilt` console script: the app, with a Ctrl-C at any moment told in one line and exit status 130."""
    try:
        app()
    except SystemExit as exit_:
        if exit_.code == 130:  # typer ends a Ctrl-C it catches with a silent exit 130
            exit_interrupted()
        raise
    except KeyboardInterrupt:
        exit_interrupted()
