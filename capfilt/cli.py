"""`capfilt` command line: parses flags into a `RunConfig` and runs the pipeline; nothing else.

Only typer and rich load with it, so that `--help`, `--version`, `presets`, `show`, `summary` and every
argument error answer at once: torch and transformers load inside the commands that run models.
"""

from __future__ import annotations

import os
import sys

try:  # a Ctrl-C while the command line itself loads is an interrupt like any other: one line, exit 130
    import inspect
    import logging
    import traceback
    from collections.abc import Callable, Iterator
    from contextlib import contextmanager
    from typing import Annotated, Any, NoReturn

    import typer
    from rich.console import Console

    from capfilt import __version__
    from capfilt.api import parse_storage_options, run
    from capfilt.config import Command
    from capfilt.errors import CapfiltError
    from capfilt.keep import KeepTop
    from capfilt.log import logger
    from capfilt.options import OPTIONS, Option
    from capfilt.presets import DEFAULT_PRESET, load_preset
except KeyboardInterrupt:
    print("capfilt: interrupted", file=sys.stderr)
    os._exit(130)

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Input = Annotated[str, typer.Argument(help="Dataset: a directory, a glob or a brace pattern; local or fsspec URL.")]
Output = Annotated[str, typer.Argument(help="Output directory (one output shard per input shard, same names).")]
StorageOptions = Annotated[
    str | None, typer.Option("--storage-options", help="fsspec options as JSON.", show_default="none")
]
Quiet = Annotated[
    bool, typer.Option("--quiet", help="No progress bar, summary table or model loading lines; warnings only.")
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error or a failed shard.")]


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


def execute(command: Command, input: str, output: str, quiet: bool, debug: bool, **options: Any) -> None:
    """Check the options, run the job with progress, print the summary; errors as one line."""
    console = Console(stderr=True, quiet=quiet)
    configure_logging(console, quiet, debug)
    with reported_errors(debug):
        from capfilt.progress import RichProgress, summary_table

        progress = RichProgress(console, debug)  # its bar shows once the models have loaded
        try:
            with progress:
                summary = run(input, output, command, observer=progress, **options)
        except KeyboardInterrupt:  # the run cleaned up (temporaries, lock) on its way out
            if not progress.running:  # while torch imported or the models loaded: nothing was written
                exit_interrupted()
            exit_interrupted("capfilt: interrupted; the shard in progress was abandoned, finished shards are kept. "
                             "Rerun the same command to resume.")
    console.print(summary_table(summary, progress.samples))
    if options.get("report"):
        from capfilt.report import REPORT_FILE

        console.print(f"report written to {output.rstrip('/')}/{REPORT_FILE}", soft_wrap=True)
    if summary.failed_shards:
        _fail(f"{len(summary.failed_shards)} shard(s) failed: {', '.join(summary.failed_shards)} (see the summary)")


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"capfilt: error: {message}", file=sys.stderr)
    raise typer.Exit(code=code)


def _parameter(option: Option) -> inspect.Parameter:
    info = typer.Option(option.flag, help=option.help, show_default=option.show_default)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default,
                             annotation=Annotated[option.type, info])


def run_command(command: Command, doc: str) -> Callable[..., None]:
    """The CLI command `command`: the options of the table that it takes, handed to `execute` as they are."""

    def command_function(input: str, output: str, quiet: bool = False, debug: bool = False, **options: Any) -> None:
        execute(command, input, output, quiet, debug, **options)

    parameters = [
        inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Input),
        inspect.Parameter("output", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Output),
        *(_parameter(option) for option in OPTIONS if command in option.commands),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Quiet),
        inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Debug),
    ]
    command_function.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command_function.__annotations__ = {p.name: p.annotation for p in parameters}
    command_function.__doc__ = doc
    return command_function


app.command("caption")(run_command(
    Command.caption, "Add synthetic captions (nucleus sampling by default, beam search with --num-beams)."))
app.command("filter")(run_command(
    Command.filter, "Score web and synthetic captions with one or more filters and keep those the rules keep."))
app.command("bootstrap")(run_command(
    Command.bootstrap, "Caption, then score the web caption and every synthetic caption and keep by the rules "
    "(CapFilt), in one pass."))
app.command("select")(run_command(
    Command.select, "Re-apply keep rules to the scores of an annotated output (--mode annotate), loading no "
    "model: exactly the rules given, else the run's own; --keep-top over the whole input."))


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
def report(
    output: Annotated[str, typer.Argument(help="A capfilt output directory.")],
    destination: Annotated[str | None, typer.Option("--output", "-o", help="Where to write the HTML page.",
                                                    show_default="OUTPUT/report.html")] = None,
    storage_options: StorageOptions = None,
    debug: Debug = False,
) -> None:
    """Write one self-contained HTML page of what the filter did: counts, score histograms with the keep rule,
    what-if curves and sample grids, to choose a threshold by looking."""
    with reported_errors(debug):
        from capfilt.report import write_report

        written = write_report(output, destination, parse_storage_options(storage_options))
    Console().print(f"report written to {written}", soft_wrap=True)


finetune_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                           help="Fine-tune a BLIP captioner or filter on human-annotated pairs (BLIP's recipe), "
                           "resumable.")
app.add_typer(finetune_app, name="finetune")


def finetune_command(role: str) -> Callable[..., None]:
    """`capfilt finetune ROLE DATA OUT`: the options, handed to `capfilt.finetune.finetune`."""

    def command(
        data: Annotated[str, typer.Argument(help="Training pairs: any input capfilt reads; the web caption is the "
                                                 "human caption.")],
        out: Annotated[str, typer.Argument(help="Folder for the model, its processor, the record (finetune.json) "
                                                "and the checkpoints; rerun the same command to resume.")],
        model: Annotated[str | None, typer.Option("--from", help="The BLIP captioner or filter to fine-tune.",
                                                  show_default="the preset's")] = None,
        preset: Annotated[str | None, typer.Option("--preset", help="Take the preset's captioner or first "
                                                   "filter (and its prompt).",
                                                   show_default="none")] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (BLIP: 5 captioner, 6 filter).",
                                                   show_default="BLIP's")] = None,
        lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate, cosine decay (BLIP's by size: "
                                                 "ViT-B 1e-5, ViT-L 2e-6 captioner / 5e-6 filter).",
                                                 show_default="BLIP's")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per step per device.")] = 32,
        grad_accum: Annotated[int, typer.Option("--grad-accum", help="Steps whose gradients add up to one update.")] = 1,
        eval_data: Annotated[str | None, typer.Option("--eval", help="Held-out pairs (any input capfilt reads), "
                                                      "evaluated after each epoch.", show_default="none")] = None,
        eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of DATA's pictures held out "
                                                     "instead, evaluated after each epoch.")] = 0.0,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the data order, dropout and the split.")] = 42,
        device: Annotated[str | None, typer.Option("--device", help="cpu or cuda.", show_default="cuda if any")] = None,
        dtype: Annotated[str | None, typer.Option("--dtype", help="float32, or bfloat16/float16 mixed precision.",
                                                  show_default="bfloat16 on a GPU, float32 on the CPU")] = None,
        save_steps: Annotated[int, typer.Option("--save-steps", help="Updates between checkpoints.")] = 500,
        storage_options: StorageOptions = None,
        quiet: Quiet = False,
        debug: Debug = False,
    ) -> None:
        console = Console(stderr=True, quiet=quiet)
        configure_logging(console, quiet, debug)
        with reported_errors(debug):
            from capfilt.finetune import finetune

            try:
                finetune(role, data, out, model=model, preset=preset, epochs=epochs, lr=lr, batch_size=batch_size,
                         grad_accum=grad_accum, eval_fraction=eval_fraction, eval_data=eval_data, seed=seed, device=device, dtype=dtype,
                         save_steps=save_steps, storage_options=parse_storage_options(storage_options), quiet=quiet)
            except KeyboardInterrupt:
                exit_interrupted("capfilt: interrupted; rerun the same command to continue from the last checkpoint.")

    command.__doc__ = f"Fine-tune a BLIP {role} on DATA into OUT (AdamW, weight decay 0.05, cosine schedule)."
    return command


finetune_app.command("captioner")(finetune_command("captioner"))
finetune_app.command("filter")(finetune_command("filter"))


@app.command()
def presets() -> None:
    """List the model presets; --preset takes the one marked default when not given."""
    from capfilt.presets import available_presets

    with reported_errors(debug=False):
        found = [(name, load_preset(name)) for name in available_presets()]
    labels = {name: f"{name} (default)" if name == DEFAULT_PRESET else name for name, _ in found}
    width = max(map(len, labels.values()), default=0) + 2
    for name, preset in found:
        lines = [preset.description]
        lines += [f"captioner {preset.captioner}"] if preset.captioner else []
        lines += [f"filter    {model}" for model in preset.filters]
        if preset.keep:
            lines += [f"keep      {', '.join(preset.keep)}" + (f" (best {preset.keep_best})" if preset.keep_best else "")]
        lines += [f"keep      {KeepTop.parse(top).described()}, over the whole output (capfilt select)"
                  for top in preset.keep_top]
        print(f"{labels[name]:{width}}" + f"\n{'':{width}}".join(lines))


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
