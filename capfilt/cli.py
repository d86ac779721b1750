"""`capfilt` command line: parses flags into a `RunConfig` and runs the pipeline; nothing else."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from capfilt.config import Command, FilterMode, FilterSettings, RunConfig
from capfilt.errors import CapfiltError, ConfigError
from capfilt.models.base import DecodingSettings
from capfilt.presets import DEFAULT_PRESET, Preset, load_preset
from capfilt.progress import RichProgress, samples_table, summary_table

app = typer.Typer(
    help="CapFilt (BLIP): caption and filter image-text datasets: webdataset tars, Parquet, image folders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Input = Annotated[str, typer.Argument(help="Dataset: a directory, a glob or a brace pattern; local or fsspec URL.")]
Output = Annotated[str, typer.Argument(help="Output directory (one output shard per input shard, same names).")]
PresetOpt = Annotated[str, typer.Option("--preset", help="Model preset: blip-large, blip-base, demo, or a .toml.")]
CaptionerOpt = Annotated[str | None, typer.Option("--captioner", help="Captioner: HF model id or local dir.")]
FilterOpt = Annotated[str | None, typer.Option("--filter", help="Filter: HF model id or local dir.")]
NumCaptions = Annotated[int, typer.Option("--num-captions", help="Synthetic captions per image.")]
NumBeams = Annotated[int, typer.Option("--num-beams", help="1: nucleus sampling (default); >1: beam search.")]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling top-p [preset: 0.9].")]
MaxLength = Annotated[int | None, typer.Option("--max-length", help="Max tokens, prompt included [preset].")]
MinLength = Annotated[int | None, typer.Option("--min-length", help="Min tokens, prompt included [preset].")]
RepetitionPenalty = Annotated[
    float | None, typer.Option("--repetition-penalty", help="[BLIP: 1.1 for nucleus, 1.0 for beam].")
]
Prompt = Annotated[str | None, typer.Option("--prompt", help="Decoder prompt, stripped from captions [preset].")]
Scores = Annotated[str, typer.Option("--scores", help="Scores to compute and require: itm, itc or itm,itc.")]
Threshold = Annotated[float | None, typer.Option("--threshold", help="Min ITM match probability [preset: 0.5].")]
ItcThreshold = Annotated[float | None, typer.Option("--itc-threshold", help="Min ITC cosine [preset].")]
Mode = Annotated[FilterMode, typer.Option("--mode", help="drop: remove failing pairs; annotate: keep all.")]
InputFormat = Annotated[str | None, typer.Option("--input-format", help="webdataset, parquet or files.")]
OutputFormat = Annotated[str | None, typer.Option("--output-format", help="Convert [default: input's].")]
CaptionColumn = Annotated[str | None, typer.Option("--caption-column", help="Caption column or extension.")]
ImageColumn = Annotated[str | None, typer.Option("--image-column", help="Parquet image column.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per model batch.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of nucleus sampling.")]
StorageOptions = Annotated[str | None, typer.Option("--storage-options", help="fsspec options as JSON.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar or summary table.")]
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
    str | None, typer.Option("--devices", help="One worker process per device: all (every GPU), 0,1 or cuda:0,cuda:1.")
]
Ray = Annotated[str | None, typer.Option("--ray", help="Run on a Ray cluster: its address, or auto.")]
RayWorkers = Annotated[
    int | None, typer.Option("--ray-workers", help="Ray actors [default: one per cluster GPU, or CPU core on CPU].")
]
ShardIndex = Annotated[
    int | None, typer.Option("--shard-index", help="This process's share of a split job [$SLURM_ARRAY_TASK_ID].")
]
NumShards = Annotated[int | None, typer.Option("--num-shards", help="Shares of a split job [$SLURM_ARRAY_TASK_COUNT].")]


def resolve_device(device: str, dtype: str, devices: str | None) -> tuple[str, str, tuple[str, ...]]:
    """The device (the first of `devices` when given), the dtype for it, and every device to run on."""
    import torch

    listed: tuple[str, ...] = ()
    if devices == "all":
        listed = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        if not listed:
            raise ConfigError("--devices all: no CUDA device is visible")
    elif devices:
        listed = tuple(f"cuda:{d}" if d.isdigit() else d for d in (d.strip() for d in devices.split(",")) if d)
    if listed:
        device = listed[0]
    elif device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype, listed or (device,)


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


def execute(command: Command, input: str, output: str, quiet: bool, device: str, dtype: str,
            storage_options: str | None, devices: str | None, ray: str | None, ray_workers: int | None,
            shard_index: int | None, num_shards: int | None, **settings: object) -> None:
    """Build the config, run the pipeline with progress, print the summary; user errors as one line."""
    console = Console(stderr=True, quiet=quiet)
    try:
        device, dtype, listed = resolve_device(device, dtype, devices)
        options = json.loads(storage_options) if storage_options else {}
        if not isinstance(options, dict):
            raise ConfigError("--storage-options must be a JSON object")
        index, count = share_of_job(shard_index, num_shards)
        config = RunConfig(command=command, input=input, output=output, device=device, dtype=dtype,
                           storage_options=options, devices=listed, ray_address=ray, ray_workers=ray_workers,
                           shard_index=index, num_shards=count, **settings)
        from transformers.utils import logging as transformers_logging

        from capfilt.pipeline import Pipeline

        transformers_logging.disable_progress_bar()  # our own progress bar is the one to watch

        progress = RichProgress(console)
        pipeline = Pipeline(config, progress)  # loads the models; the bar starts after
        with progress:
            summary = pipeline.run()
    except json.JSONDecodeError as error:
        _fail(f"--storage-options is not valid JSON: {error}")
    except CapfiltError as error:
        _fail(str(error))
    except OSError as error:  # unwritable output, full disk, lost mount: the system's own words suffice
        _fail(f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}")
    except KeyboardInterrupt:
        print("capfilt: interrupted; the shard in progress was abandoned, finished shards are kept. "
              "Rerun the same command to resume.", file=sys.stderr)
        # Everything is cleaned up by now (temporaries, lock); exit without the interpreter's teardown, which
        # with model threads and thread pools just stopped can abort the process instead of exiting with 130.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    console.print(summary_table(summary))
    if summary.failed_shards:
        _fail(f"{len(summary.failed_shards)} shard(s) failed: {', '.join(summary.failed_shards)} (see the summary)")


def _fail(message: str) -> None:
    print(f"capfilt: error: {message}", file=sys.stderr)
    raise typer.Exit(code=2)


@app.command()
def caption(
    input: Input, output: Output, preset: PresetOpt = DEFAULT_PRESET, captioner: CaptionerOpt = None,
    num_captions: NumCaptions = 1, num_beams: NumBeams = 1, top_p: TopP = None, max_length: MaxLength = None,
    min_length: MinLength = None, repetition_penalty: RepetitionPenalty = None, prompt: Prompt = None,
    input_format: InputFormat = None, output_format: OutputFormat = None, caption_column: CaptionColumn = None,
    image_column: ImageColumn = None, device: Device = "auto", dtype: Dtype = "auto", batch_size: BatchSize = 32,
    seed: Seed = 0, storage_options: StorageOptions = None, quiet: Quiet = False, overwrite: Overwrite = False,
    eager_attention: EagerAttention = False,
    threads: Threads = None,
    devices: Devices = None, ray: Ray = None, ray_workers: RayWorkers = None,
    shard_index: ShardIndex = None, num_shards: NumShards = None,
) -> None:
    """Add synthetic captions (nucleus sampling by default, beam search with --num-beams)."""
    try:
        p = load_preset(preset)
        decoding = decoding_settings(p, num_captions, num_beams, top_p, max_length, min_length,
                                     repetition_penalty, prompt, seed)
    except CapfiltError as error:
        _fail(str(error))
    execute(Command.caption, input, output, quiet, device, dtype, storage_options, devices, ray, ray_workers,
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
    overwrite: Overwrite = False, eager_attention: EagerAttention = False,
    threads: Threads = None,
    devices: Devices = None, ray: Ray = None, ray_workers: RayWorkers = None,
    shard_index: ShardIndex = None, num_shards: NumShards = None,
) -> None:
    """Score web and synthetic captions (ITM and/or ITC) and drop, or annotate, the pairs that do not match."""
    try:
        p = load_preset(preset)
        filtering = filter_settings(p, scores, threshold, itc_threshold, mode)
    except CapfiltError as error:
        _fail(str(error))
    execute(Command.filter, input, output, quiet, device, dtype, storage_options, devices, ray, ray_workers,
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
    storage_options: StorageOptions = None, quiet: Quiet = False, overwrite: Overwrite = False,
    eager_attention: EagerAttention = False,
    threads: Threads = None,
    devices: Devices = None, ray: Ray = None, ray_workers: RayWorkers = None,
    shard_index: ShardIndex = None, num_shards: NumShards = None,
) -> None:
    """Caption, then filter the web caption and every synthetic caption, in one pass (CapFilt)."""
    try:
        p = load_preset(preset)
        decoding = decoding_settings(p, num_captions, num_beams, top_p, max_length, min_length,
                                     repetition_penalty, prompt, seed)
        filtering = filter_settings(p, scores, threshold, itc_threshold, mode)
    except CapfiltError as error:
        _fail(str(error))
    execute(Command.bootstrap, input, output, quiet, device, dtype, storage_options, devices, ray, ray_workers,
            shard_index, num_shards,
            captioner=captioner or p.captioner, filter=filter or p.filter, decoding=decoding,
            filtering=filtering, input_format=input_format, output_format=output_format,
            caption_column=caption_column, image_column=image_column, batch_size=batch_size,
            overwrite=overwrite, sdpa=not eager_attention, threads=threads)


@app.command()
def show(
    output: Annotated[str, typer.Argument(help="A capfilt output directory.")],
    limit: Annotated[int, typer.Option("--limit", "-n", help="Samples to show, written and dropped each.")] = 8,
    storage_options: StorageOptions = None,
) -> None:
    """Show samples of an output: every caption with its scores and whether the filter kept it."""
    from capfilt.inspect import read_output_samples

    try:
        options = json.loads(storage_options) if storage_options else {}
        written, dropped = read_output_samples(output, limit, options)
    except json.JSONDecodeError as error:
        _fail(f"--storage-options is not valid JSON: {error}")
    except CapfiltError as error:
        _fail(str(error))
    Console().print(samples_table(written, dropped, f"{output}: first {limit} written and dropped samples"))


@app.command()
def summary(
    output: Annotated[str, typer.Argument(help="The output directory of a split job (--shard-index/--num-shards).")],
    storage_options: StorageOptions = None,
) -> None:
    """Merge every shard's stats into the run summary (capfilt_summary.json), once all shares have finished."""
    from capfilt.pipeline import summarize

    try:
        options = json.loads(storage_options) if storage_options else {}
        merged, missing = summarize(output, options)
    except json.JSONDecodeError as error:
        _fail(f"--storage-options is not valid JSON: {error}")
    except CapfiltError as error:
        _fail(str(error))
    Console().print(summary_table(merged))
    if missing:
        _fail(f"{len(missing)} shard(s) not complete yet: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
              "; no summary written")
    if merged.failed_shards:
        _fail(f"{len(merged.failed_shards)} shard(s) failed: {', '.join(merged.failed_shards)} (see the summary)")


@app.command()
def presets() -> None:
    """List the model presets."""
    from capfilt.presets import available_presets

    for name in available_presets():
        preset = load_preset(name)
        print(f"{name:12} {preset.description}\n{'':12} captioner {preset.captioner}\n{'':12} filter    {preset.filter}")


def main() -> None:
    app()
