"""The whole CapFilt loop of the BLIP paper, measured on held-out human captions, in the shapes domain.

    python examples/capfilt_loop.py                       # 16 minutes on one CPU thread (20 on a busy machine)
    python examples/capfilt_loop.py --web 10000 --threads 4 --work out/capfilt_loop_10k

1. Data: a web set whose captions are as noisy as alt text (`capfilt.demo.web_noise`: 30% right, 30% naming
   only part of the picture, 20% another picture's, 20% junk), a small human-annotated set and a held-out
   human test set (true captions, each a different one), as webdatasets in WORK/data.
2. (a) Pre-train a tiny BLIP captioner from random weights on the raw web data, then the filter from the
   captioner's weights (BLIP pre-trains the two as one model), with `capfilt finetune` at a learning rate
   for training from scratch.
3. (b) Fine-tune both on the human set, as BLIP fine-tunes on COCO before CapFilt.
4. (c) Bootstrap the web data with them: `capfilt bootstrap` writes one synthetic caption per picture (beam
   search) and keeps the better of web and synthetic caption by ITM, if its match probability is at least 0.3.
5. (d) Pre-train again from the same random weights with the same recipe, on the bootstrapped data;
   (d') fine-tune that on the human set too.

Each model is evaluated on the test set (`capfilt.evaluation`: CIDEr, BLEU-4 and exact match of beam-search
captions; ITM accuracy and retrieval recall of the filter), and the table printed and written to
WORK/capfilt_loop.json. It shows what Table 1 of the paper shows at scale: the model pre-trained on the
bootstrapped data beats the one pre-trained on the raw web data, with the same recipe and no more pairs.
Every stage that finished is skipped when the command is run again, and a stage that was cut continues
(finetune and bootstrap resume).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval, TrainerCallback
from transformers.utils import logging as transformers_logging
from webdataset import TarWriter

import capfilt
from capfilt.demo import shapes, web_noise
from capfilt.demo.tiny_blip import Architecture, new_captioner, new_filter, save
from capfilt.evaluation import evaluate
from capfilt.finetune import RECORD_NAME, finetune
from capfilt.inspect import read_output_samples

# The demo models' architecture: a 64-pixel ViT cut into the shapes' 8 x 8 grid, two layers of width 128.
ARCHITECTURE = Architecture(image_size=64, patch_size=8, hidden=128, layers=2, heads=4, embedding=64)
RENDER_SIZE = 128
SAMPLES_PER_SHARD = 1000
ROLES = ("captioner", "filter")
RECORD = "capfilt_loop.json"
WEB_CAPTIONS = "web_captions.json"
# Rows of the table: the stage whose models are evaluated, and how the table names them.
ROWS = {
    "a": "(a) pre-trained on web data",
    "b": "(b) (a) fine-tuned on human pairs",
    "d": "(d) pre-trained on bootstrapped data",
    "d'": "(d') (d) fine-tuned on human pairs",
}
COLUMNS = (
    ("cider", "CIDEr"), ("bleu4", "BLEU-4"), ("exact_match", "exact"), ("itm_accuracy", "ITM acc"),
    ("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5"),
)


@dataclass(frozen=True)
class Settings:
    """Everything that decides the loop's figures; a WORK folder holds the loop of one `Settings`."""

    seed: int = 0
    web: int = 3000
    human: int = 300
    test: int = 250
    # Pre-training from random weights, (a) and (d): the same recipe for both.
    epochs: int = 8
    lr: float = 1e-3
    # Fine-tuning on the human set, (b) and (d'): the small models are far from converged, and the longer they
    # fine-tune the better they caption (after (a), seed 1: exact match 12% after 10 epochs at 5e-4, 21% after
    # 30 at 1e-3) and retrieve (R@1 20% against 26%).
    human_epochs: int = 30
    human_lr: float = 1e-3
    batch_size: int = 32
    # The captioner learns as well under bf16 autocast as in fp32, 1.4x faster on a CPU with AVX512-BF16; the
    # filter does not (ITC logits over a temperature of 0.07 lose too much: R@5 34% against 53%, measured).
    captioner_dtype: str = "bfloat16"
    filter_dtype: str = "float32"
    # Bootstrapping, (c): BLIP's one synthetic caption per picture, by beam search (nucleus sampling, the
    # paper's choice at scale, writes fewer right captions from a captioner this small: 3% against 12%).
    num_beams: int = 3
    num_captions: int = 1
    # BLIP keeps a caption at an ITM match probability of 0.5; this small filter is less sure of right pairs
    # (web right captions: median 0.56, another picture's 0.05, junk 0.13), and at 0.5 drops a third of the
    # pictures. One caption per picture, so that (d) trains on no more pairs than (a).
    keep: str = "itm>=0.3"
    keep_best: int = 1


class Journal:
    """WORK/capfilt_loop.json: the settings, and each finished stage with its seconds and results."""

    def __init__(self, work: Path, settings: Settings) -> None:
        self.path = work / RECORD
        self.data: dict[str, Any] = {"settings": asdict(settings), "stages": {}}
        if self.path.is_file():
            found = json.loads(self.path.read_text())
            if found["settings"] != self.data["settings"]:
                changed = sorted(k for k in self.data["settings"] if found["settings"].get(k) != asdict(settings)[k])
                raise SystemExit(f"{work} holds a loop with other settings ({', '.join(changed)}); give another "
                                 "--work, or the same flags to continue it")
            self.data = found
        work.mkdir(parents=True, exist_ok=True)

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def finish(self, stage: str, seconds: float, **results: Any) -> dict[str, Any]:
        self.data["stages"][stage] = {"seconds": round(seconds, 1), **results}
        self.save()
        return self.data["stages"][stage]

    def save(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        temporary.replace(self.path)


def web_jpeg(scene: shapes.Scene, rng: random.Random) -> bytes:
    """The scene as a web picture: rendered, then JPEG-compressed at a typical quality."""
    buffer = io.BytesIO()
    shapes.render(scene, RENDER_SIZE).save(buffer, "JPEG", quality=rng.randint(75, 95))
    return buffer.getvalue()


def write_webdataset(directory: Path, scenes: list[shapes.Scene], captions: list[str], rng: random.Random) -> None:
    """The scenes as `KEY.jpg` + `KEY.txt` pairs in tars of `SAMPLES_PER_SHARD`, img2dataset's layout."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(scenes), SAMPLES_PER_SHARD)):
        with open(directory / f"{shard:05d}.tar", "wb") as stream, TarWriter(stream, mtime=0) as tar:
            for index in range(start, min(start + SAMPLES_PER_SHARD, len(scenes))):
                tar.write({"__key__": f"{shard:05d}{index - start:04d}", "jpg": web_jpeg(scenes[index], rng),
                           "txt": captions[index].encode()})


def distinct_scenes(count: int, rng: random.Random) -> list[shapes.Scene]:
    """`count` random scenes with `count` different true captions, so that retrieval has one right answer."""
    scenes: dict[str, shapes.Scene] = {}
    while len(scenes) < count:
        scene = shapes.random_scene(rng)
        scenes.setdefault(shapes.describe(scene), scene)
    return list(scenes.values())


def write_data(data: Path, settings: Settings) -> None:
    """The web, human and test sets, and WEB_CAPTIONS: each web sample's caption kind and true caption, by key."""
    rng = random.Random(f"{settings.seed}/web")
    web_scenes = [shapes.random_scene(rng) for _ in range(settings.web)]
    web = web_noise.web_captions(web_scenes, rng)
    write_webdataset(data / "web", web_scenes, [caption.text for caption in web], rng)
    rng = random.Random(f"{settings.seed}/human")
    human_scenes = [shapes.random_scene(rng) for _ in range(settings.human)]
    write_webdataset(data / "human", human_scenes, [shapes.describe(s) for s in human_scenes], rng)
    rng = random.Random(f"{settings.seed}/test")
    test_scenes = distinct_scenes(settings.test, rng)
    write_webdataset(data / "test", test_scenes, [shapes.describe(s) for s in test_scenes], rng)
    keys = [f"{i // SAMPLES_PER_SHARD:05d}{i % SAMPLES_PER_SHARD:04d}" for i in range(settings.web)]
    truths = {key: {"kind": caption.kind, "truth": shapes.describe(scene)}
              for key, caption, scene in zip(keys, web, web_scenes)}
    (data / WEB_CAPTIONS).write_text(json.dumps(truths, indent=1) + "\n")


@torch.no_grad()
def emphasise_edges(vision_model: torch.nn.Module) -> None:
    """Make half the patch-embedding filters start as edge detectors, blind to a patch's plain colour.

    Freshly initialised, every filter mostly measures a patch's average colour, and a shape's faint outline is
    lost among eight colours on eight backgrounds: the encoder then takes thousands of steps to start telling
    shapes apart (the same start as `capfilt.demo.train`'s).
    """
    weight = vision_model.embeddings.patch_embedding.weight
    edges = weight[weight.shape[0] // 2 :]
    edges -= edges.mean(dim=(2, 3), keepdim=True)
    edges *= 10


def write_random_models(directory: Path, seed: int) -> None:
    """The randomly initialised captioner and filter both pre-trainings, (a) and (d), start from."""
    captioner, processor = new_captioner(ARCHITECTURE, seed)
    retrieval, _ = new_filter(ARCHITECTURE, seed + 1)
    emphasise_edges(captioner.vision_model)
    emphasise_edges(retrieval.vision_model)
    save(captioner, processor, directory / "captioner")
    save(retrieval, processor, directory / "filter")


class EpochPrinter(TrainerCallback):
    """About five lines per training: the role, the epoch, the mean training loss since the last line and the
    time so far."""

    def __init__(self, name: str) -> None:
        self.name, self.started, self.logged = name, time.monotonic(), 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.logged = len(state.log_history)  # a resumed training's history holds the epochs done before

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        epoch, epochs = round(state.epoch), round(args.num_train_epochs)
        if epoch % math.ceil(epochs / 5) and epoch != epochs:
            return
        losses = [entry["loss"] for entry in state.log_history[self.logged :] if "loss" in entry]
        self.logged = len(state.log_history)
        mean = sum(losses) / len(losses) if losses else float("nan")
        print(f"  {self.name}: epoch {epoch}/{epochs}, loss {mean:.4f}, {time.monotonic() - self.started:.0f}s",
              flush=True)


def train(stage: str, role: str, data: Path, out: Path, start: Path, epochs: int, lr: float,
          settings: Settings) -> dict[str, Any]:
    """`capfilt finetune ROLE DATA OUT --from START`; its record. `finetune` continues a training cut in OUT."""
    dtype = settings.captioner_dtype if role == "captioner" else settings.filter_dtype
    print(f"{stage}: capfilt finetune {role} {data} {out} --from {start} --epochs {epochs} --lr {lr} "
          f"--batch-size {settings.batch_size} --seed {settings.seed} --dtype {dtype}", flush=True)
    record_path = out / RECORD_NAME
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("status") == "done":  # WORK holds one loop's settings: a finished training is this one
        return record
    return finetune(role, str(data), str(out), model=str(start), epochs=epochs, lr=lr,
                    batch_size=settings.batch_size, seed=settings.seed, device="cpu", dtype=dtype,
                    quiet=True, callbacks=[EpochPrinter(role)])


@torch.no_grad()
def write_filter_start(captioner: Path, random_filter: Path, out: Path) -> None:
    """The filter's starting weights in pre-training: the pre-trained captioner's image encoder, and its text
    decoder's layers but self-attention, on the random filter (whose ITC projections and ITM head stay random).

    BLIP pre-trains captioner and filter as one model, whose image encoder they share and whose text encoder
    shares all but the self-attention layers with the text decoder; here the captioner is pre-trained first
    and the filter starts from what it learnt. It learns much faster so: on the web data, from random weights
    the filter reached i2t R@5 12% in 5 epochs, from the captioner's image encoder alone 15% in 3, from the
    image encoder and text layers 48% in 3 (measured).
    """
    learnt = BlipForConditionalGeneration.from_pretrained(captioner).state_dict()
    model = BlipForImageTextRetrieval.from_pretrained(random_filter)
    shared = {name: weight for name, weight in learnt.items() if name.startswith("vision_model.")}
    shared |= {"text_encoder." + name.removeprefix("text_decoder.bert."): weight for name, weight in learnt.items()
               if name.startswith("text_decoder.bert.") and ".attention." not in name}
    model.load_state_dict(shared, strict=False)
    save(model, AutoProcessor.from_pretrained(random_filter), out)


def pretrain(stage: str, data: Path, out: Path, random_models: Path, settings: Settings,
             test: Path) -> dict[str, Any]:
    """Pre-train the captioner from random weights, then the filter from it; both evaluated on `test`."""
    captioner = train(stage, "captioner", data, out / "captioner", random_models / "captioner", settings.epochs,
                      settings.lr, settings)
    write_filter_start(out / "captioner", random_models / "filter", out / "filter_start")
    retrieval = train(stage, "filter", data, out / "filter", out / "filter_start", settings.epochs, settings.lr,
                      settings)
    return figures(captioner, retrieval, out, test)


def fine_tune(stage: str, data: Path, out: Path, models: Path, settings: Settings, test: Path) -> dict[str, Any]:
    """Fine-tune the captioner and filter in `models` on the human pairs; both evaluated on `test`."""
    records = [train(stage, role, data, out / role, models / role, settings.human_epochs, settings.human_lr,
                     settings) for role in ROLES]
    return figures(*records, out, test)


def figures(captioner: dict[str, Any], retrieval: dict[str, Any], out: Path, test: Path) -> dict[str, Any]:
    """The test-set figures of the pair in `out`, and the pairs and steps each trained on."""
    results: dict[str, Any] = {}
    for role, record in zip(ROLES, (captioner, retrieval)):
        results[f"{role}_pairs"], results[f"{role}_steps"] = record["pairs"], record["steps"]
        results.update(evaluate(role, str(out / role), str(test), batch_size=64, device="cpu"))
    return results


def bootstrap(web: Path, out: Path, models: Path, settings: Settings, threads: int) -> dict[str, Any]:
    """`capfilt bootstrap` of the web data with the fine-tuned pair; what it kept, by kind of caption."""
    print(f"(c): capfilt bootstrap {web} {out} --preset demo --captioner {models / 'captioner'} --filter "
          f"{models / 'filter'} --num-beams {settings.num_beams} --num-captions {settings.num_captions} "
          f"--keep '{settings.keep}' --keep-best {settings.keep_best} --seed {settings.seed}", flush=True)
    # The demo preset gives the shapes domain's prompt and caption lengths; models and rules are given here.
    summary = capfilt.run(str(web), str(out), "bootstrap", preset="demo", captioner=str(models / "captioner"),
                          filter=[str(models / "filter")], num_beams=settings.num_beams,
                          num_captions=settings.num_captions, keep=[settings.keep], keep_best=settings.keep_best,
                          seed=settings.seed, device="cpu", dtype="float32", threads=threads)
    truths = json.loads((web.parent / WEB_CAPTIONS).read_text())
    written, dropped = read_output_samples(str(out), len(truths) + 1, {})
    web_kept: Counter[str] = Counter()
    web_count: Counter[str] = Counter()
    synthetic_kept = synthetic_right = 0
    for sample in written + dropped:
        kind, truth = truths[sample.key]["kind"], truths[sample.key]["truth"]
        web_count[kind] += 1
        web_kept[kind] += bool(sample.web_kept)
        # One text is one training pair: a synthetic caption that repeats the kept web caption adds nothing.
        kept = [caption.text for caption in sample.synthetic_captions
                if caption.kept and caption.text != sample.web_caption]
        synthetic_kept += len(kept)
        synthetic_right += sum(text == truth for text in kept)
    return {
        "pictures_written": summary.written,
        "pictures_dropped": summary.dropped,
        "web_kept": {kind: [web_kept[kind], web_count[kind]] for kind in web_noise.KINDS},
        "synthetic_kept": synthetic_kept,
        "synthetic_kept_right": synthetic_right,
    }


def table(stages: dict[str, Any]) -> str:
    """The evaluated rows as a Markdown table: figures in percent (CIDEr x 100, as BLIP reports it), the pairs
    the captioner last trained on, and the stage's minutes (in the run that finished it)."""
    head = ["model", *(title for _, title in COLUMNS), "pairs", "min"]
    lines = [head]
    for stage, name in ROWS.items():
        if stage not in stages:
            continue
        found = stages[stage]
        lines.append([name, *(f"{100 * found[key]:.1f}" for key, _ in COLUMNS),
                      str(found["captioner_pairs"]), f"{found['seconds'] / 60:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def row(cells: list[str]) -> str:
        # The model's name left-aligned, the figures right-aligned.
        aligned = [cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(aligned) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (width + 1) + ":" for width in widths[1:]]) + "|"
    return "\n".join([row(lines[0]), rule, *(row(line) for line in lines[1:])])


def bootstrap_line(found: dict[str, Any]) -> str:
    kept = ", ".join(f"{kind} {k}/{n}" for kind, (k, n) in found["web_kept"].items())
    return (f"(c) bootstrapping kept web captions: {kept}; new synthetic captions kept: {found['synthetic_kept']} "
            f"({found['synthetic_kept_right']} exactly right); pictures written {found['pictures_written']}, "
            f"dropped {found['pictures_dropped']}; {found['seconds'] / 60:.1f} min")


def run_loop(work: Path, settings: Settings, threads: int) -> dict[str, Any]:
    journal = Journal(work, settings)
    data, random_models = work / "data", work / "random"
    test = data / "test"

    def stage(name: str, action: Callable[..., dict[str, Any] | None], *args: Any) -> dict[str, Any]:
        found = journal.done(name)
        if found is not None:
            print(f"{name}: done before ({found['seconds']:.0f}s), skipped", flush=True)
            return found
        started = time.monotonic()
        results = action(*args) or {}
        torch.set_num_threads(threads)  # a bootstrap run leaves its own thread count behind
        return journal.finish(name, time.monotonic() - started, **results)

    stage("data", write_data, data, settings)
    stage("random", write_random_models, random_models, settings.seed)
    stage("a", pretrain, "(a)", data / "web", work / "a", random_models, settings, test)
    stage("b", fine_tune, "(b)", data / "human", work / "b", work / "a", settings, test)
    stage("c", bootstrap, data / "web", work / "c", work / "b", settings, threads)
    stage("d", pretrain, "(d)", work / "c", work / "d", random_models, settings, test)
    stage("d'", fine_tune, "(d')", data / "human", work / "d'", work / "d", settings, test)
    return journal.data["stages"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--work", type=Path, default=Path("out/capfilt_loop"),
                        help="data, models and the record go here; rerun with the same flags to continue")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--web", type=int, default=defaults.web, help="web pictures (noisy captions)")
    parser.add_argument("--human", type=int, default=defaults.human, help="human-annotated training pictures")
    parser.add_argument("--test", type=int, default=defaults.test, help="held-out human-annotated pictures")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs of (a) and (d)")
    parser.add_argument("--human-epochs", type=int, default=defaults.human_epochs, help="epochs of (b) and (d')")
    parser.add_argument("--num-captions", type=int, default=defaults.num_captions,
                        help="synthetic captions per picture in (c)")
    parser.add_argument("--keep", default=defaults.keep, help="keep rule of (c), as capfilt's --keep")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (bootstrap: of each model stage, which run side by side)")
    args = parser.parse_args()
    settings = Settings(seed=args.seed, web=args.web, human=args.human, test=args.test, epochs=args.epochs,
                        human_epochs=args.human_epochs, num_captions=args.num_captions, keep=args.keep)
    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()  # save_pretrained's bar, once per saved model
    started = time.monotonic()
    stages = run_loop(args.work, settings, args.threads)
    print()
    print(table(stages))
    print()
    print(bootstrap_line(stages["c"]))
    print("ITM acc: 66.7 is what a filter that always says 'no match' scores (each true pair against two hard "
          "negatives).")
    total = sum(found["seconds"] for found in stages.values())
    print(f"all stages: {total / 60:.1f} min ({(time.monotonic() - started) / 60:.1f} min in this run); "
          f"record: {args.work / RECORD}")


if __name__ == "__main__":
    main()
