"""`capfilt finetune` against a plain transformers training loop: training samples/s and peak memory.

    python benchmarks/finetune_speed.py [--size tiny|base|large] [--images N] [--epochs E] [--batch-size B]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--roles captioner,filter] [--image-size 384]
        [--models-dir DIR] [--seed S] [--repeats R]

For each role it builds a random-weight BLIP model of --size (bench.py's models: "tiny" is the demo models'
size, "base" and "large" BLIP ViT-B and ViT-L with a BERT-size word-level tokenizer), writes N shapes JPEGs
with their captions as one webdataset shard, and trains on it for E epochs, batch B, in two ways:

- capfilt: `capfilt.finetune.finetune` (transformers' Trainer with BLIP's losses), as the CLI calls it;
- plain: the loop the transformers docs show: a torch DataLoader decoding each JPEG with PIL and batching it
  through the checkpoint's processor, `torch.optim.AdamW(model.parameters(), lr, weight_decay=0.05)`, the
  model's own loss (captioner: `labels=input_ids`), `backward`, `step`. transformers has no training loss for
  `BlipForImageTextRetrieval`, so the plain filter loop calls capfilt's `FilterLoss` (ITC + ITM with hard
  negatives) by hand. Both sides train on the same texts (the captioner's with capfilt's prompt), truncated
  alike, so their batches have the same shapes.

samples/s counts the training steps after the first (from the end of step 1 to the end of the last): model
loading, data reading, the warm-up step and the final save are left out; "run s" is the whole run, those
included (capfilt's also checks every image decodes before training, and writes a checkpoint at the end).
Each side runs in its own process (this script with --side), so that its peak memory is its own: the process's
peak RSS on CPU, `torch.cuda.max_memory_allocated` on a GPU. In bfloat16 both sides train under autocast. Both
use torch's default thread count (set OMP_NUM_THREADS to choose it). On a shared machine, `--repeats R` runs
each side R times, alternating, and shows each side's fastest run. The defaults take about 2 minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset

# benchmarks/ is this script's folder, so its sibling imports as `bench` (run it as benchmarks/bench.py is run).
from bench import SIZES, build_models, make_items, write_shard
from PIL import Image
from transformers import (
    AutoProcessor,
    BatchFeature,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    TrainerCallback,
)
from transformers.utils import logging as transformers_logging

from capfilt.finetune import CAPTIONER_MAX_TOKENS, DEFAULT_PROMPT, FILTER_MAX_TOKENS, WEIGHT_DECAY, finetune
from capfilt.models.blip_training import FilterLoss

ROLES = ("captioner", "filter")
SIDES = ("capfilt", "plain")
LR = 1e-5  # BLIP's for base models; speed does not depend on it


def log(message: str) -> None:
    print(f"[finetune_speed] {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    """One side's figures, as its process hands them back."""

    steps: int
    timed_samples: int  # samples of the steps after the first
    timed_seconds: float  # from the end of step 1 to the end of the last
    run_seconds: float
    peak_memory_gib: float

    @property
    def rate(self) -> float:
        return self.timed_samples / self.timed_seconds if self.timed_seconds > 0 else math.nan


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # GPU work is asynchronous: wait for it before reading the clock
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux gives KiB


def timed_samples(pairs: int, epochs: int, batch_size: int) -> int:
    """Samples of every step but the first (a full batch, or all pairs if fewer)."""
    return pairs * epochs - min(batch_size, pairs)


# --- capfilt ------------------------------------------------------------------------------------------------


class StepClock(TrainerCallback):
    """The clock at the end of the first step and of the last; each step's logging and data loading fall
    between two ends, so they are counted, while the final checkpoint (written after the last end) is not."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: dict[int, float] = {}  # by step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in (1, state.max_steps):
            synchronize(self.device)
            self.ends[state.global_step] = time.perf_counter()


def run_capfilt(args: argparse.Namespace, device: torch.device, out: Path) -> Result:
    clock = StepClock(device)
    started = time.perf_counter()
    record = finetune(args.role, str(args.data), str(out), model=str(args.model_dir), epochs=args.epochs, lr=LR,
                      batch_size=args.batch_size, seed=args.seed, device=device.type, dtype=args.dtype,
                      quiet=True, callbacks=[clock])
    run_seconds = time.perf_counter() - started
    steps = max(clock.ends)
    return Result(steps, timed_samples(record["train_pairs"], args.epochs, args.batch_size),
                  clock.ends[steps] - clock.ends[1], run_seconds, peak_memory_gib(device))


# --- the plain loop -----------------------------------------------------------------------------------------


class Pictures(torch.utils.data.Dataset):
    """(picture, text) pairs, each JPEG decoded when the loader asks for it."""

    def __init__(self, jpegs: list[bytes], texts: list[str]) -> None:
        self.jpegs, self.texts = jpegs, texts

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return Image.open(io.BytesIO(self.jpegs[index])).convert("RGB"), self.texts[index]


def run_plain(args: argparse.Namespace, device: torch.device, out: Path) -> Result:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    captioner = args.role == "captioner"
    processor = AutoProcessor.from_pretrained(args.model_dir)
    cls = BlipForConditionalGeneration if captioner else BlipForImageTextRetrieval
    model = cls.from_pretrained(args.model_dir, dtype=torch.float32).to(device).train()
    filter_loss = None if captioner else FilterLoss().to(device)
    parameters = list(model.parameters()) + (list(filter_loss.parameters()) if filter_loss else [])
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=WEIGHT_DECAY)

    samples = list(webdataset.WebDataset(str(args.data), shardshuffle=False).to_tuple("jpg", "txt"))
    prefix = DEFAULT_PROMPT if captioner else ""
    texts = [prefix + caption.decode().strip() for _, caption in samples]
    max_tokens = CAPTIONER_MAX_TOKENS if captioner else FILTER_MAX_TOKENS

    def collate(batch: list[tuple[Image.Image, str]]) -> BatchFeature:
        images, batch_texts = zip(*batch)
        return processor(images=list(images), text=list(batch_texts), padding="longest", truncation=True,
                         max_length=max_tokens, return_tensors="pt")

    loader = torch.utils.data.DataLoader(Pictures([jpeg for jpeg, _ in samples], texts),
                                         batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    steps, first_end = 0, 0.0
    for _ in range(args.epochs):
        for batch in loader:
            batch = batch.to(device)
            with autocast:
                if filter_loss is None:
                    loss = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss
                else:
                    loss = filter_loss(model, batch["pixel_values"], batch["input_ids"],
                                       batch["attention_mask"]).total
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if steps == 1:
                synchronize(device)
                first_end = time.perf_counter()
    synchronize(device)
    timed_seconds = time.perf_counter() - first_end
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Result(steps, timed_samples(len(samples), args.epochs, args.batch_size), timed_seconds,
                  time.perf_counter() - started, peak_memory_gib(device))


# --- both sides ---------------------------------------------------------------------------------------------


def run_side(args: argparse.Namespace) -> None:
    """One side, in this process: its Result as JSON into --result."""
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix=f"capfilt-finetune-{args.side}-") as out:
        result = (run_capfilt if args.side == "capfilt" else run_plain)(args, device, Path(out) / "out")
    args.result.write_text(json.dumps(asdict(result)))


def spawn_side(args: argparse.Namespace, side: str, role: str, model_dir: Path, data: Path, result: Path) -> Result:
    command = [sys.executable, __file__, "--side", side, "--role", role, "--model-dir", str(model_dir),
               "--data", str(data), "--result", str(result), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype,
               "--seed", str(args.seed)]
    log(f"{role}: {side}")
    subprocess.run(command, check=True)
    return Result(**json.loads(result.read_text()))


def benchmark(args: argparse.Namespace, workdir: Path) -> None:
    captioner_dir, filter_dir = build_models(args.size, args.models_dir or workdir / "models", args.seed)
    log(f"writing {args.images} JPEGs of {args.image_size} px")
    shard = write_shard(workdir / "input", make_items(args.images, args.image_size, args.seed)) / "00000.tar"
    rows = []
    for role in args.roles:
        model_dir = captioner_dir if role == "captioner" else filter_dir
        runs: dict[str, list[Result]] = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            # Alternate which side goes first, so that a load that drifts over time weighs on both alike.
            for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
                runs[side].append(spawn_side(args, side, role, model_dir, shard, workdir / f"{role}-{side}.json"))
        rows.append((role, {side: max(results, key=lambda r: r.rate) for side, results in runs.items()}))
    print_table(args, rows)


def print_table(args: argparse.Namespace, rows: list[tuple[str, dict[str, Result]]]) -> None:
    print(f"\n$ {shlex.join(['python', 'benchmarks/finetune_speed.py', *sys.argv[1:]])}")
    device = torch.device(args.device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    print(f"BLIP {args.size}, random weights; {args.images} shapes JPEGs of {args.image_size} px, {epochs}, batch "
          f"{args.batch_size}; {args.device}{name}, {args.dtype}, torch threads {torch.get_num_threads()}")
    header = (f"{'role':<10}{'size':<6}{'steps':>6}{'capfilt sa/s':>14}{'plain sa/s':>12}{'capfilt/plain':>15}"
              f"{'capfilt peak GiB':>18}{'plain peak GiB':>16}{'capfilt run s':>15}{'plain run s':>13}")
    print("\n" + header + "\n" + "-" * len(header))
    for role, results in rows:
        capfilt, plain = results["capfilt"], results["plain"]
        print(f"{role:<10}{args.size:<6}{capfilt.steps:>6}{capfilt.rate:>14.3g}{plain.rate:>12.3g}"
              f"{capfilt.rate / plain.rate:>14.2f}x{capfilt.peak_memory_gib:>18.2f}{plain.peak_memory_gib:>16.2f}"
              f"{capfilt.run_seconds:>15.1f}{plain.run_seconds:>13.1f}")
    peak = "the process's peak RSS" if device.type == "cpu" else "torch.cuda.max_memory_allocated"
    best = f", the best of {args.repeats} runs of each side" if args.repeats > 1 else ""
    print(f"sa/s: training samples per second over the steps after the first{best} (loading, reading, warm-up step "
          "and saving left out);\nrun s: the whole run, those included. Each side ran in its own process; peak GiB: "
          f"{peak}.")
    if "filter" in args.roles:
        print("plain filter loop: transformers has no training loss for BlipForImageTextRetrieval, so it calls "
              "capfilt's FilterLoss (ITC + ITM, hard negatives) by hand.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", *SIZES], default="tiny")
    parser.add_argument("--images", type=int, default=512, help="training pairs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--roles", default=",".join(ROLES), help="comma-separated: captioner, filter or both")
    parser.add_argument("--image-size", type=int, default=384, help="side of the generated JPEGs, in pixels")
    parser.add_argument("--models-dir", type=Path, help="where to save the models, and reuse them from next time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating; the table shows "
                        "each side's fastest (on a shared machine, the least disturbed)")
    one = parser.add_argument_group("one side, in this process (what the benchmark runs each side as)")
    one.add_argument("--side", choices=SIDES)
    one.add_argument("--role", choices=ROLES)
    one.add_argument("--model-dir", type=Path)
    one.add_argument("--data", type=Path, help="a webdataset shard")
    one.add_argument("--result", type=Path, help="where to write the side's figures as JSON")
    args = parser.parse_args(argv)
    args.roles = [role.strip() for role in args.roles.split(",") if role.strip()]
    if not args.roles or set(args.roles) - set(ROLES):
        parser.error(f"--roles: a comma-separated list of {', '.join(ROLES)}")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if args.side and not (args.role and args.model_dir and args.data and args.result):
        parser.error("--side needs --role, --model-dir, --data and --result")
    if not args.side and args.epochs * math.ceil(args.images / args.batch_size) < 2:
        parser.error("needs two training steps at least (the first is a warm-up): raise --images or --epochs")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.side:
        run_side(args)
        return
    with tempfile.TemporaryDirectory(prefix="capfilt-finetune-speed-") as workdir:
        benchmark(args, Path(workdir))


if __name__ == "__main__":
    main()
