"""Fine-tune a BLIP captioner or filter on human-annotated pairs, as BLIP does before CapFilt.

`capfilt finetune captioner|filter DATA OUT --from MODEL` reads DATA with capfilt's own readers and decoder
(an undecodable image or a pair without caption is skipped and counted), trains with transformers' `Trainer`
on BLIP's losses (`capfilt.models.blip_training`) and BLIP's recipe (AdamW, weight decay 0.05, cosine
schedule, the learning rate and epochs of the paper for the model's size), and writes into OUT:

- the model and its processor (`save_pretrained`), loadable with `from_pretrained` and capfilt's loaders;
- `finetune.json`, the record of the training: its settings, per-epoch losses, counts of skipped samples;
- `checkpoints/`, the Trainer's checkpoints (weights, optimizer, scheduler, RNG state, position in the
  data), from which the same command, killed at any moment, continues.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capfilt.errors import ConfigError, DecodeError
from capfilt.log import logger
from capfilt.sample import Sample

RECORD_NAME = "finetune.json"
CHECKPOINTS = "checkpoints"
ROLES = ("captioner", "filter")
DEFAULT_PROMPT = "a picture of "
# BLIP tokenizes captions for the decoder with at most 40 tokens (blip_decoder), for ITC/ITM with 35.
CAPTIONER_MAX_TOKENS = 40
FILTER_MAX_TOKENS = 35
WEIGHT_DECAY = 0.05
# The temperature of the filter's ITC loss, trained with the model and dropped when it is saved.
TEMPERATURE_NAME = "capfilt_itc_temperature"
DTYPES = ("float32", "bfloat16", "float16")
# BLIP's fine-tuning recipe (configs/caption_coco.yaml, configs/retrieval_coco.yaml): (lr, epochs) by size.
RECIPE = {
    ("captioner", "base"): (1e-5, 5),
    ("captioner", "large"): (2e-6, 5),
    ("filter", "base"): (1e-5, 6),
    ("filter", "large"): (5e-6, 6),
}
LARGE_VISION_HIDDEN = 1024  # ViT-L's width; ViT-B's is 768
# The first transformers release whose Trainer, resumed, ends with the weights of an uninterrupted run
# (tests/test_finetune.py; 5.0 to 5.5 end a few ulps away).
EXACT_RESUME_RELEASE = (5, 6)


@dataclass(frozen=True)
class FinetuneSettings:
    """What decides the training's result; OUT's record holds them, and a rerun must give the same."""

    role: str
    data: str
    model: str
    epochs: int
    lr: float
    batch_size: int
    grad_accum: int
    eval_fraction: float
    seed: int
    dtype: str
    eval_data: str | None = None
    weight_decay: float = WEIGHT_DECAY
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = CAPTIONER_MAX_TOKENS
    save_steps: int = 500


class Rows(Sequence):
    """The chosen rows of a sequence, read through to it."""

    def __init__(self, items: Sequence, rows: list[int]) -> None:
        self.items, self.rows = items, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.items[self.rows[index]]


class SpooledImages(Sequence):
    """Image bytes spooled to an Arrow file and memory-mapped: the OS pages them in as training reads them,
    so a training set larger than memory trains."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.column = pa.ipc.open_file(pa.memory_map(str(path))).read_all().column(0)

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index: int) -> bytes:
        return self.column[index].as_py()


@dataclass
class Pairs:
    """The usable (image bytes, caption) pairs of a dataset, and what was skipped, by reason."""

    keys: list[str] = field(default_factory=list)
    images: Sequence = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def subset(self, rows: list[int]) -> Pairs:
        return Pairs([self.keys[i] for i in rows], Rows(self.images, rows), [self.captions[i] for i in rows],
                     self.skipped)


def read_pairs(data: str, storage_options: dict[str, Any] | None = None, spool: Path | None = None) -> Pairs:
    """A pair for each caption `training_captions` gives of every sample of `data` whose image decodes; the
    samples without either, counted by reason. With `spool`, the images go to that Arrow file as they are read
    and are memory-mapped from it, rather than held in memory."""
    from capfilt.paths import resolve_input

    fs, fmt, shards = resolve_input(data, None, storage_options)
    pairs = Pairs()
    if spool is None:
        for shard in shards:
            _read_shard(fmt.read_shard(fs, shard, None), pairs, pairs.images.append)
        return pairs
    import pyarrow as pa

    schema = pa.schema([("image", pa.large_binary())])
    pending: list[bytes] = []
    with pa.OSFile(str(spool), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for shard in shards:
            _read_shard(fmt.read_shard(fs, shard, None), pairs, pending.append)
            # Each image once per caption, as the pairs are; written a shard at a time.
            writer.write_batch(pa.record_batch([pa.array(pending, pa.large_binary())], schema=schema))
            pending.clear()
    pairs.images = SpooledImages(spool)
    return pairs


def _read_shard(items, pairs: Pairs, keep_image) -> None:
    """Add a shard's usable pairs to `pairs` (each pair's image through `keep_image`), counting the others."""
    from capfilt.decode import DEFAULT_MAX_PIXELS, decode_image
    from capfilt.sample import Reject

    for item in items:
        if isinstance(item, Reject):
            pairs.skipped[item.reason] += 1
            continue
        captions = [text.strip() for text in training_captions(item) if text and text.strip()]
        if not captions:
            pairs.skipped["no_caption"] += 1
            continue
        try:
            decode_image(item.image_bytes or b"", DEFAULT_MAX_PIXELS)
        except DecodeError as error:
            pairs.skipped[error.reason] += 1
            continue
        for caption in captions:
            pairs.keys.append(item.key)
            keep_image(item.image_bytes or b"")
            pairs.captions.append(caption)


def training_captions(sample: Sample) -> list[str]:
    """The captions a sample teaches: in a capfilt output, every kept caption (web and synthetic, as CapFilt's
    bootstrapped data is used); elsewhere, the web caption."""
    from capfilt.schema import kept_captions

    if sample.web_kept is not None or sample.synthetic_captions:
        return kept_captions(sample)
    return [sample.web_caption] if sample.web_caption is not None else []


def recipe(role: str, vision_hidden_size: int) -> tuple[float, int]:
    """BLIP's learning rate and epochs for the role, scaled to the model's size (ViT-L from 1024 wide)."""
    return RECIPE[(role, "large" if vision_hidden_size >= LARGE_VISION_HIDDEN else "base")]


def check_model(role: str, model: str) -> Any:
    """The checkpoint's config, or a one-line refusal of a family or architecture without training support."""
    from transformers import AutoConfig

    from capfilt.models.loading import load_pretrained

    config = load_pretrained(AutoConfig, model, role)
    if config.model_type != "blip":
        raise ConfigError(f"cannot fine-tune {model}: it is a '{config.model_type}' model; fine-tuning supports "
                          "BLIP captioners and filters")
    wanted = "BlipForConditionalGeneration" if role == "captioner" else "BlipForImageTextRetrieval"
    architectures = getattr(config, "architectures", None) or []
    if architectures and wanted not in architectures:
        raise ConfigError(f"cannot fine-tune {model} as the {role}: it is a {', '.join(architectures)}, "
                          f"the {role} is a {wanted}")
    return config


def resolve_model(role: str, model: str | None, preset: str | None) -> tuple[str, str]:
    """The model to train and the captioner's prompt: --from, else the preset's captioner or first filter."""
    prompt = DEFAULT_PROMPT
    if preset is not None:
        from capfilt.presets import load_preset

        found = load_preset(preset)
        prompt = found.prompt
        if model is None:
            named = found.captioner if role == "captioner" else (found.filters[0] if found.filters else None)
            if named is None:
                raise ConfigError(f"the preset '{preset}' names no {role}; give the model with --from")
            model = named.rpartition("=")[2]
    if model is None:
        raise ConfigError("name the model to fine-tune with --from MODEL (or --preset NAME)")
    return model, prompt


def read_record(out: Path) -> dict[str, Any] | None:
    path = out / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not a fine-tuning record ({error}); give another OUT") from error


def check_out(out: Path, settings: FinetuneSettings) -> dict[str, Any] | None:
    """OUT's record when it holds this very training (to resume); a refusal when it holds another one, or
    anything else; None when it is new or empty."""
    record = read_record(out)
    if record is None:
        if out.is_file():
            raise ConfigError(f"OUT {out} is a file; give a folder")
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"OUT {out} is not empty and holds no fine-tuning record ({RECORD_NAME}); "
                              "give a new or empty folder")
        return None
    theirs = record.get("settings", {})
    ours = asdict(settings)
    # How often it checkpoints changes nothing of the result: a rerun may change it.
    different = sorted(name for name in set(ours) | set(theirs)
                       if name != "save_steps" and ours.get(name) != theirs.get(name))
    if different:
        shown = ", ".join(f"{name} {theirs.get(name)!r} there, {ours.get(name)!r} now" for name in different[:3])
        raise ConfigError(f"OUT {out} holds another training (different {shown}); give another OUT, or the same "
                          "settings to resume it")
    return record


def last_checkpoint(directory: Path) -> str | None:
    """The newest complete checkpoint: the Trainer writes its trainer_state.json last."""
    found = []
    if directory.is_dir():
        for child in directory.iterdir():
            step = child.name.removeprefix("checkpoint-")
            if child.name.startswith("checkpoint-") and step.isdigit() and (child / "trainer_state.json").is_file():
                found.append((int(step), child))
    return str(max(found)[1]) if found else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole or not at all: a kill never leaves half a record."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def epoch_losses(log_history: list[dict[str, Any]], key: str) -> list[float]:
    """The mean of the per-step `key` values logged in each epoch, in epoch order."""
    by_epoch: dict[int, list[float]] = {}
    for entry in log_history:
        if key in entry and "epoch" in entry:
            by_epoch.setdefault(max(math.ceil(entry["epoch"] - 1e-6), 1), []).append(entry[key])
    return [sum(values) / len(values) for _, values in sorted(by_epoch.items())]


def split(pairs: Pairs, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows held out and rows trained on: `eval_fraction` of the pictures, drawn with the seed, with all their
    captions, so that no held-out picture is also trained on."""
    pictures = sorted(set(image_ids(pairs.images)))
    random.Random(seed).shuffle(pictures)
    held = set(pictures[: round(len(pictures) * eval_fraction)])
    ids = image_ids(pairs.images)
    return [i for i, image in enumerate(ids) if image in held], [i for i, image in enumerate(ids) if image not in held]


def epoch_figures(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per epoch, the held-out loss and figures the Trainer logged (`eval_` dropped from their names)."""
    by_epoch: dict[float, dict[str, float]] = {}
    for entry in log_history:
        if "epoch" in entry and any(name.startswith("eval_") for name in entry):
            figures = by_epoch.setdefault(round(entry["epoch"], 4), {"epoch": round(entry["epoch"], 4)})
            figures.update({name.removeprefix("eval_"): value for name, value in entry.items()
                            if name.startswith("eval_") and not name.endswith(("_runtime", "_per_second"))})
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def show_figures(rows: list[dict[str, float]]) -> None:
    """The held-out figures of every epoch so far, as a table on stderr."""
    from rich.console import Console
    from rich.table import Table

    names = [name for name in rows[-1] if name != "epoch"]
    table = Table("epoch", *names, title="held-out evaluation")
    for row in rows:
        table.add_row(f"{row['epoch']:g}", *(f"{row[name]:.4f}" if name in row else "" for name in names))
    Console(stderr=True).print(table)


class PairDataset:
    """Pairs as the model's inputs: the image through capfilt's decoder and the preprocessing runs use (the
    checkpoint's image processor, or capfilt's table-driven path where it gives the very same tensor), the
    caption's text."""

    def __init__(self, images: Sequence, texts: list[str], image_ids: list[int], preprocess) -> None:
        self.images, self.texts, self.image_ids = images, texts, image_ids
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from capfilt.decode import DEFAULT_MAX_PIXELS, decode_image

        pixels = self.preprocess(decode_image(self.images[index], DEFAULT_MAX_PIXELS))
        return {"pixel_values": pixels, "text": self.texts[index], "image_id": self.image_ids[index]}


class Collator:
    """Stacks the pictures and tokenizes the texts of a batch, padded to its longest."""

    def __init__(self, tokenizer, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        tokens = self.tokenizer([item["text"] for item in items], padding="longest", truncation=True,
                                max_length=self.max_tokens, return_tensors="pt")
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_ids": torch.tensor([item["image_id"] for item in items]),
        }


def image_ids(images: list[bytes]) -> list[int]:
    """One id per distinct picture: the filter never takes another caption of the same picture as a negative."""
    first: dict[bytes, int] = {}
    return [first.setdefault(hashlib.sha256(image).digest(), len(first)) for image in images]


def finetune(
    role: str,
    data: str,
    out: str,
    model: str | None = None,
    preset: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 32,
    grad_accum: int = 1,
    eval_fraction: float = 0.0,
    eval_data: str | None = None,
    seed: int = 42,
    device: str | None = None,
    dtype: str | None = None,
    save_steps: int = 500,
    storage_options: dict[str, Any] | None = None,
    quiet: bool = False,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Fine-tune `model` as the `role` on `data` into `out`, continuing a training `out` holds; the record.

    Everything that can be refused is checked before any image is read or any weight loads. `callbacks` go to
    the Trainer (tests kill a run with one)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role '{role}'; fine-tune a {' or a '.join(ROLES)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if batch_size < 1 or grad_accum < 1 or save_steps < 1 or (epochs is not None and epochs < 1):
        raise ConfigError("--batch-size, --grad-accum, --epochs and --save-steps must be at least 1")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr {lr}: give a positive learning rate")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"--eval-fraction {eval_fraction}: give a fraction from 0 to below 1")
    if eval_data is not None and eval_fraction:
        raise ConfigError("give held-out pairs either with --eval DATA or with --eval-fraction, not both")
    if role == "captioner" and (eval_data is not None or eval_fraction):
        from capfilt.evaluation import check_scorers

        check_scorers()
    on_cpu = _on_cpu(device, dtype)
    # Mixed bfloat16 on a GPU, as BLIP fine-tunes (its `amp`); float32 on the CPU, where it is exact.
    dtype = dtype or ("float32" if on_cpu else "bfloat16")
    model, prompt = resolve_model(role, model, preset)
    config = check_model(role, model)
    default_lr, default_epochs = recipe(role, config.vision_config.hidden_size)
    settings = FinetuneSettings(
        role=role, data=data, model=model, epochs=epochs or default_epochs, lr=lr or default_lr,
        batch_size=batch_size, grad_accum=grad_accum, eval_fraction=eval_fraction, seed=seed, dtype=dtype,
        eval_data=eval_data,
        prompt=prompt if role == "captioner" else "",
        max_tokens=CAPTIONER_MAX_TOKENS if role == "captioner" else FILTER_MAX_TOKENS, save_steps=save_steps,
    )
    out_dir = Path(out)
    # Under torchrun every process runs this; the first alone checks and writes OUT (the others would race it).
    main_process = int(os.environ.get("RANK", "0")) == 0
    previous = check_out(out_dir, settings) if main_process else None
    # The training images are spooled to disk (under TMPDIR) and memory-mapped, not held in memory.
    with tempfile.TemporaryDirectory(prefix="capfilt-finetune-") as spool:
        return _read_and_train(settings, data, eval_data, storage_options, Path(spool) / "images.arrow", out_dir,
                               previous, main_process, on_cpu, quiet, callbacks)


def _read_and_train(settings: FinetuneSettings, data: str, eval_data: str | None,
                    storage_options: dict[str, Any] | None, spool: Path, out_dir: Path,
                    previous: dict[str, Any] | None, main_process: bool, on_cpu: bool, quiet: bool,
                    callbacks: list | None) -> dict[str, Any]:
    pairs = usable_pairs(data, storage_options, spool)
    held_out = usable_pairs(eval_data, storage_options) if eval_data is not None else None
    skipped = dict(sorted(pairs.skipped.items()))
    logger.info("%d pairs to train on; skipped: %s", len(pairs.images), counted(skipped))
    if held_out is not None:
        logger.info("%d held-out pairs from %s; skipped: %s", len(held_out.images), eval_data,
                    counted(held_out.skipped))
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "settings": asdict(settings),
        "status": "training",
        "pairs": len(pairs.images),
        "skipped": skipped,
        **({"eval_skipped": dict(sorted(held_out.skipped.items()))} if held_out is not None else {}),
        **({"started": previous["started"]} if previous and "started" in previous else {}),
    }
    if main_process:
        write_json(out_dir / RECORD_NAME, record)
    return _train(settings, pairs, held_out, out_dir, record, on_cpu, quiet, callbacks)


def counted(skipped: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "none"


def usable_pairs(data: str, storage_options: dict[str, Any] | None, spool: Path | None = None) -> Pairs:
    """`read_pairs`, refused in one line when none is usable."""
    pairs = read_pairs(data, storage_options, spool)
    if not pairs.images:
        skipped = f" ({counted(pairs.skipped)} skipped)" if pairs.skipped else ""
        raise ConfigError(f"no usable image-caption pairs in {data}{skipped}")
    return pairs


def _on_cpu(device: str | None, dtype: str | None) -> bool:
    """Whether the Trainer runs on the CPU (it takes the GPU when there is one): refused when it cannot."""
    import torch

    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device}: give cpu or cuda (pick the GPUs with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available")
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if on_cpu and dtype == "float16":
        raise ConfigError("--dtype float16 needs a GPU; on the CPU use float32 or bfloat16")
    return on_cpu


def _train(settings: FinetuneSettings, pairs: Pairs, held_out_pairs: Pairs | None, out: Path,
           record: dict[str, Any], on_cpu: bool, quiet: bool, callbacks: list | None) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import (
        AutoProcessor,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as transformers_logging

    from capfilt.evaluation import HeldOut, evaluate_captioner, evaluate_filter
    from capfilt.models.blip_training import (
        FilterLoss,
        FilterLosses,
        captioner_loss,
        prompt_length,
        release_loss_group,
    )
    from capfilt.models.loading import load_pretrained
    from capfilt.models.preprocess import choose_preprocess

    if quiet:
        transformers_logging.set_verbosity_error()
    role = settings.role
    processor = load_pretrained(AutoProcessor, settings.model, role)
    cls = BlipForConditionalGeneration if role == "captioner" else BlipForImageTextRetrieval
    model = load_pretrained(cls, settings.model, role, dtype=torch.float32)
    filter_loss = None
    if role == "filter":
        filter_loss = FilterLoss()
        # A parameter of the model, so that the Trainer's optimizer, checkpoints and resume all carry it.
        model.register_parameter(TEMPERATURE_NAME, filter_loss.temp)
    prompt_tokens = prompt_length(processor.tokenizer, settings.prompt) if role == "captioner" else 0

    def training_forward(pixel_values, input_ids, attention_mask, image_ids) -> torch.Tensor | FilterLosses:
        if filter_loss is None:
            return captioner_loss(model, pixel_values, input_ids, attention_mask, prompt_tokens)
        return filter_loss(model, pixel_values, input_ids, attention_mask, image_ids=image_ids)

    # The losses are the model's forward while it trains: DDP synchronises the gradients of the passes made
    # inside the forward it wraps, and no others.
    model.forward = training_forward

    if held_out_pairs is None:
        eval_rows, train_rows = split(pairs, settings.eval_fraction, settings.seed)
        held_out_pairs = pairs.subset(eval_rows)
        pairs = pairs.subset(train_rows)
    if not pairs.images:
        raise ConfigError("--eval-fraction leaves no pair to train on")
    held_out = HeldOut.from_pairs(held_out_pairs.images, held_out_pairs.captions) if held_out_pairs.images else None

    preprocess = choose_preprocess(processor.image_processor, role, settings.model)

    def dataset(chosen: Pairs) -> PairDataset:
        texts = [settings.prompt + caption for caption in chosen.captions] if role == "captioner" else chosen.captions
        return PairDataset(chosen.images, texts, image_ids(chosen.images), preprocess)

    class FinetuneTrainer(Trainer):
        """BLIP's losses in place of the model's own: the captioner's LM loss, the filter's ITC + ITM.

        Each is a mean over its batch, so the Trainer divides it by the accumulation steps: it never counts
        label tokens here (the batches hold no `labels`), and is told so."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False
            # The filter's ITC and ITM losses of the steps since the last log, logged apart.
            self.parts: dict[str, list[float]] = {"itc": [], "itm": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = model(**inputs)
            if isinstance(loss, FilterLosses):
                if model.training:
                    self.parts["itc"].append(float(loss.itc.detach()))
                    self.parts["itm"].append(float(loss.itm.detach()))
                loss = loss.total
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs and self.parts["itc"]:
                logs.update({name: sum(values) / len(values) for name, values in self.parts.items()})
                self.parts = {name: [] for name in self.parts}
            super().log(logs, *args, **kwargs)

        def evaluate(self, *args, **kwargs) -> dict[str, float]:
            """The held-out loss, then the held-out figures (`capfilt.evaluation`), logged, shown and recorded."""
            metrics = super().evaluate(*args, **kwargs)
            if held_out is None:
                return metrics
            training = self.model.training
            self.model.eval()
            with self.autocast_smart_context_manager():
                if role == "captioner":
                    figures = evaluate_captioner(self.model, processor, held_out, settings.prompt,
                                                 settings.batch_size, settings.max_tokens)
                else:
                    figures = evaluate_filter(self.model, processor, held_out, settings.batch_size,
                                              settings.max_tokens)
            self.model.train(training)
            figures = {f"eval_{name}": value for name, value in figures.items()}
            self.log(figures)
            metrics.update(figures)
            if self.is_world_process_zero():
                record["eval"] = epoch_figures(self.state.log_history)
                write_json(out / RECORD_NAME, record)
                if not quiet:
                    show_figures(record["eval"])
            return metrics

    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=settings.epochs,
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        seed=settings.seed,
        bf16=settings.dtype == "bfloat16",
        fp16=settings.dtype == "float16",
        use_cpu=on_cpu,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="epoch" if held_out is not None else "no",
        prediction_loss_only=True,
        label_names=["input_ids"],
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=quiet,
        # On a GPU, pictures are decoded and preprocessed by worker processes while it computes; on the CPU,
        # workers would only take cores from the training itself.
        dataloader_num_workers=0 if on_cpu else loader_workers(),
        dataloader_persistent_workers=not on_cpu,
        # Both losses use every parameter; looking for unused ones costs a pass over the graph each step.
        ddp_find_unused_parameters=False,
        **checkpointing(model.config.vision_config.hidden_size >= LARGE_VISION_HIDDEN),
    )
    trainer = FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=dataset(pairs),
        eval_dataset=dataset(held_out_pairs) if held_out is not None else None,
        data_collator=Collator(processor.tokenizer, settings.max_tokens),
        processing_class=processor,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not quiet:
        trainer.add_callback(_progress_callback())
    resume = last_checkpoint(out / CHECKPOINTS)
    if resume:
        logger.info("resuming from %s", resume)
        if _release(transformers.__version__) < EXACT_RESUME_RELEASE:
            logger.warning("transformers %s resumes a training close to, not exactly at, the weights of an "
                           "uninterrupted one (exactly from 5.6 on, tested)", transformers.__version__)
    trainer.train(resume_from_checkpoint=resume)

    del model.forward
    if filter_loss is not None:
        record["temperature"] = float(filter_loss.temp.detach())
        del model._parameters[TEMPERATURE_NAME]
    main_process = trainer.is_world_process_zero()
    if main_process:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    if torch.distributed.is_initialized():
        # Every process waits for the model to be saved, then leaves the group: one exiting while another
        # still works can abort it.
        torch.distributed.barrier()
        release_loss_group()
        torch.distributed.destroy_process_group()
    if not main_process:
        return record
    history = trainer.state.log_history
    record.update(
        status="done",
        steps=trainer.state.global_step,
        train_loss=epoch_losses(history, "loss"),
        **({"train_itc": epoch_losses(history, "itc"), "train_itm": epoch_losses(history, "itm")}
           if filter_loss is not None else {}),
        eval=epoch_figures(history),
        train_pairs=len(pairs.images),
        eval_pairs=len(held_out_pairs.images),
    )
    write_json(out / RECORD_NAME, record)
    losses = ", ".join(f"{loss:.4f}" for loss in record["train_loss"])
    logger.info("fine-tuned %s saved to %s; loss per epoch: %s", role, out, losses)
    return record


def checkpointing(wanted: bool) -> dict[str, bool]:
    """BLIP's recipe for ViT-L: recompute activations in the backward pass rather than keep them. The
    TrainingArguments field is `activation_checkpointing` from transformers 5.24 (`gradient_checkpointing`, now
    deprecated, before); only asked for when wanted."""
    from transformers import TrainingArguments

    if not wanted:
        return {}
    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def loader_workers() -> int:
    """Data loading processes per training process: this machine's cores shared among its training processes."""
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                      // per_machine - 1))


def _progress_callback():
    from transformers.trainer_callback import ProgressCallback

    class LossInProgressBar(ProgressCallback):
        """The Trainer's progress bar (steps, rate, ETA), with the latest losses beside it rather than a
        dictionary printed under it at every step; the evaluation shows its own table."""

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                shown = {name: f"{logs[name]:.4f}" for name in ("loss", "itc", "itm") if name in logs}
                self.training_bar.set_postfix(shown, refresh=False)

    return LossInProgressBar


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as 5.24.0 or 5.6.0.dev0."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
