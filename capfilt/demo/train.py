"""Make the demo captioner and filter with capfilt itself: `capfilt finetune` from random weights, then evaluate.

    python -m capfilt.demo.train --out models/demo          # about 15 minutes on 2 free CPU cores
    python -m capfilt.demo.train --out models/demo --eval-only

The demo models are capfilt's own output. This script
1. renders 12000 random shapes scenes as JPEG web pictures with their true captions into a webdataset
   (`KEY.jpg` and `KEY.txt` in tars, as img2dataset writes them), in WORK: `--work`, else a temporary folder;
2. builds a randomly initialised tiny BLIP captioner and filter (`capfilt.demo.tiny_blip`: transformers' own
   BLIP classes, a 64-pixel ViT and a word-level BERT tokenizer), their patch embeddings part edge detectors
   (`emphasise_edges`), and saves them;
3. runs `capfilt finetune captioner` and `capfilt finetune filter` on those pairs from those random models,
   both at once (one CPU thread each), with the settings that train them from scratch (`Settings`) rather
   than BLIP's fine-tuning recipe;
4. copies what `save_pretrained` wrote for each model and its processor into OUT/captioner and OUT/filter,
   with a short record of how it was made (`finetune.json`: the command, settings, losses and time; the
   run's own record and checkpoints stay in WORK), and evaluates both on held-out scenes.

The captioner learns BLIP's captioning loss, the filter BLIP's ITC and ITM losses with hard negatives drawn
from the batch's other captions (`capfilt.models.blip_training`): the filter never sees junk alt text or a
deliberately one-detail-wrong caption in training, only other pictures' captions, many of which are one or
two details off.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor
from webdataset import TarWriter

from capfilt.demo import shapes
from capfilt.demo.tiny_blip import PROMPT, Architecture, new_captioner, new_filter, save
from capfilt.finetune import RECORD_NAME

ARCHITECTURE = Architecture(image_size=64, patch_size=8, hidden=128, layers=2, heads=4, embedding=64)
# Pictures are rendered at the example dataset's size and pass through JPEG, as web pictures do.
RENDER_SIZE = 128
SAMPLES_PER_SHARD = 2000
ROLES = ("captioner", "filter")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trained weights.

    Chosen by measuring on 200 held-out scenes (seed 0; lr 1e-3, cosine decay to 0, no warm-up, as `capfilt
    finetune` schedules it). Batches of 32 train both models better than batches of 64 for the same epochs, by
    taking twice the updates: after 8 epochs of 64 the filter's ITM put 78% of right captions above 0.5,
    after 8 epochs of 32, 99%. The captioner's beam captions were 82% exact after 4 epochs of 64, 99.5% after
    8; 97% after 5 epochs of 32 (86% without the edge detectors), 100% after 8. The two runs, side by side,
    take about the same time.
    """

    seed: int = 0
    scenes: int = 12000
    batch_size: int = 32
    captioner_epochs: int = 8
    filter_epochs: int = 8
    captioner_lr: float = 1e-3
    filter_lr: float = 1e-3
    edges: bool = True


def web_jpeg(scene: shapes.Scene, rng: random.Random) -> bytes:
    """The scene as a web picture: rendered, then JPEG-compressed at a typical quality."""
    buffer = io.BytesIO()
    shapes.render(scene, RENDER_SIZE).save(buffer, "JPEG", quality=rng.randint(75, 95))
    return buffer.getvalue()


def web_picture(scene: shapes.Scene, rng: random.Random) -> Image.Image:
    return Image.open(io.BytesIO(web_jpeg(scene, rng))).convert("RGB")


def write_scenes(directory: Path, count: int, seed: int) -> Path:
    """`count` random scenes as a webdataset of JPEG pictures and their true captions (the same for a seed)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for shard, start in enumerate(range(0, count, SAMPLES_PER_SHARD)):
        with open(directory / f"{shard:05d}.tar", "wb") as stream, TarWriter(stream, mtime=0) as tar:
            for index in range(start, min(start + SAMPLES_PER_SHARD, count)):
                scene = shapes.random_scene(rng)
                tar.write({"__key__": f"{index:09d}", "jpg": web_jpeg(scene, rng),
                           "txt": shapes.describe(scene).encode()})
    return directory


@torch.no_grad()
def emphasise_edges(vision_model: torch.nn.Module) -> None:
    """Make half the patch-embedding filters start as edge detectors, blind to a patch's plain colour.

    Freshly initialised, every filter mostly measures a patch's average colour, and after the layer norm the
    faint trace of a shape's outline is lost among eight colours on eight backgrounds: the encoder then takes
    thousands of steps to start telling shapes apart. Filters with their mean removed and scaled up answer to
    outlines only, so shape learning starts at once; the other half still sees colour.
    """
    weight = vision_model.embeddings.patch_embedding.weight
    edges = weight[weight.shape[0] // 2 :]
    edges -= edges.mean(dim=(2, 3), keepdim=True)
    edges *= 10


def write_random_models(directory: Path, settings: Settings) -> dict[str, Path]:
    """The randomly initialised captioner and filter, saved as `from_pretrained` loads them."""
    captioner, processor = new_captioner(ARCHITECTURE, settings.seed)
    retrieval, _ = new_filter(ARCHITECTURE, settings.seed + 1)
    if settings.edges:
        emphasise_edges(captioner.vision_model)
        emphasise_edges(retrieval.vision_model)
    return {"captioner": save(captioner, processor, directory / "captioner"),
            "filter": save(retrieval, processor, directory / "filter")}


def finetune_command(role: str, data: Path, out: Path, start: Path, settings: Settings) -> list[str]:
    """`capfilt finetune ROLE DATA OUT --from START ...`, as a user types it."""
    epochs = settings.captioner_epochs if role == "captioner" else settings.filter_epochs
    lr = settings.captioner_lr if role == "captioner" else settings.filter_lr
    return ["capfilt", "finetune", role, str(data), str(out), "--from", str(start), "--epochs", str(epochs),
            "--lr", str(lr), "--batch-size", str(settings.batch_size), "--seed", str(settings.seed),
            "--device", "cpu"]


def run_finetunes(commands: dict[str, list[str]], threads: int, parallel: bool, logs: Path) -> None:
    """Run the commands, each one's output into LOGS/ROLE.log: all at once with `parallel`, sharing `threads`
    between them, else one after the other with all of them; each one's time printed."""
    per_run = max(1, threads // len(commands)) if parallel else threads
    env = {**os.environ, "OMP_NUM_THREADS": str(per_run), "MKL_NUM_THREADS": str(per_run)}
    running: dict[str, tuple[subprocess.Popen, float]] = {}

    def launch(role: str) -> None:
        print("$ " + " ".join(commands[role]), flush=True)
        with open(logs / f"{role}.log", "w") as log:
            argv = [sys.executable, "-m", "capfilt", *commands[role][1:]]
            running[role] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), time.monotonic()

    def finish(role: str) -> None:
        process, started = running.pop(role)
        code = process.wait()
        if code != 0:
            sys.exit(f"capfilt finetune {role} failed (exit status {code}); its output ends:\n"
                     + (logs / f"{role}.log").read_text()[-3000:])
        print(f"fine-tuned the {role} in {time.monotonic() - started:.0f}s", flush=True)

    for role in commands:
        launch(role)
        if not parallel:
            finish(role)
    for role in list(running):
        finish(role)


def ship(trained: Path, out: Path, command: list[str]) -> None:
    """Copy what `save_pretrained` wrote into `trained` (model and processor) into `out`, with a short record
    in place of the run's own (whose paths are WORK's) and without its checkpoints."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(trained.iterdir()):
        if path.is_file() and path.name != RECORD_NAME:
            shutil.copy2(path, out / path.name)
    record = json.loads((trained / RECORD_NAME).read_text())
    settings = {k: v for k, v in record["settings"].items() if k not in ("data", "model", "eval_data", "save_steps")}
    shown = list(command)
    shown[3], shown[4], shown[6] = "SCENES", "OUT", "RANDOM"  # capfilt finetune ROLE DATA OUT --from MODEL ...
    shipped = {
        "made_by": "python -m capfilt.demo.train (SCENES: its training scenes, RANDOM: the random model)",
        "command": " ".join(shown),
        "settings": settings,
        "pairs": record["pairs"],
        "steps": record["steps"],
        "train_loss": [round(loss, 4) for loss in record["train_loss"]],
        **({"temperature": round(record["temperature"], 4)} if "temperature" in record else {}),
    }
    (out / RECORD_NAME).write_text(json.dumps(shipped, indent=2) + "\n")


def make(out: Path, work: Path, settings: Settings, threads: int, parallel: bool, roles: tuple[str, ...]) -> None:
    started = time.monotonic()
    data = write_scenes(work / "scenes", settings.scenes, settings.seed)
    print(f"rendered {settings.scenes} training scenes into {data} in {time.monotonic() - started:.0f}s", flush=True)
    random_models = write_random_models(work / "random", settings)
    commands = {role: finetune_command(role, data, work / role, random_models[role], settings) for role in roles}
    run_finetunes(commands, threads, parallel, work)
    for role in roles:
        ship(work / role, out / role, commands[role])
    print(f"made {', '.join(roles)} into {out} in {time.monotonic() - started:.0f}s", flush=True)


def word_accuracy(predicted: str, truth: str) -> float:
    """Share of the true caption's words that the prediction has at the same position."""
    expected = truth.split()
    return sum(p == t for p, t in zip(predicted.split(), expected)) / len(expected)


@torch.no_grad()
def evaluate_captioner(
    model: BlipForConditionalGeneration, processor: BlipProcessor, pictures: list[Image.Image], truths: list[str]
) -> None:
    """Exact-match and word accuracy of beam-search and nucleus-sampled captions, and a few examples."""
    decodings = {
        "beam search (3 beams)": {"num_beams": 3},
        "nucleus sampling (top_p 0.9)": {"do_sample": True, "top_p": 0.9},
    }
    for name, settings in decodings.items():
        torch.manual_seed(0)
        inputs = processor(images=pictures, text=[PROMPT] * len(pictures), return_tensors="pt")
        output = model.generate(**inputs, max_length=30, **settings)
        decoded = processor.batch_decode(output, skip_special_tokens=True)
        captions = [text.removeprefix(PROMPT.strip()).strip() for text in decoded]
        exact = sum(c == t for c, t in zip(captions, truths)) / len(truths)
        words = sum(word_accuracy(c, t) for c, t in zip(captions, truths)) / len(truths)
        print(f"captioner, {name}: exact match {exact:.1%}, word accuracy {words:.1%}")
        for caption, truth in list(zip(captions, truths))[:4]:
            print(f"    {caption!r}  (true: {truth!r})")


@torch.no_grad()
def evaluate_filter(
    model: BlipForImageTextRetrieval,
    processor: BlipProcessor,
    pictures: list[Image.Image],
    scenes: list[shapes.Scene],
    rng: random.Random,
) -> None:
    """How often ITM probability and ITC cosine put right captions above 0.5 / above wrong ones."""
    truths = [shapes.describe(scene) for scene in scenes]
    kinds = {
        "right": truths,
        "one detail wrong": [shapes.mismatched_caption(scene, rng) for scene in scenes],
        "another picture's": truths[1:] + truths[:1],
        "junk alt text": [shapes.junk_alt_text(rng) for _ in scenes],
    }
    itm: dict[str, torch.Tensor] = {}
    itc: dict[str, torch.Tensor] = {}
    for kind, texts in kinds.items():
        inputs = processor(images=pictures, text=texts, padding=True, return_tensors="pt")
        itm[kind] = model(**inputs, use_itm_head=True).itm_score.softmax(-1)[:, 1]
        itc[kind] = model(**inputs, use_itm_head=False).itm_score.diagonal()
    for kind in kinds:
        right_side = itm[kind] > 0.5 if kind == "right" else itm[kind] < 0.5
        below = (itc[kind] < itc["right"]).float().mean()
        ranked = "" if kind == "right" else f", below the right caption's {below:.1%}"
        print(
            f"filter, {kind} captions: ITM probability mean {itm[kind].mean():.3f}, on the right side of 0.5 "
            f"{right_side.float().mean():.1%}; ITC cosine mean {itc[kind].mean():.3f}{ranked}"
        )
    for index in range(2):
        print(f"    picture of {truths[index]!r}:")
        for kind, texts in kinds.items():
            print(f"        ITM {itm[kind][index]:.3f}  ITC {itc[kind][index]:+.3f}  {texts[index]!r}")


def evaluate(captioner_dir: Path | None, filter_dir: Path | None, seed: int, count: int) -> None:
    """Evaluate saved models on held-out scenes, loading them as capfilt does."""
    rng = random.Random(f"held-out {seed}")
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pictures = [web_picture(scene, rng) for scene in scenes]
    if captioner_dir is not None:
        captioner = BlipForConditionalGeneration.from_pretrained(captioner_dir).eval()
        truths = [shapes.describe(scene) for scene in scenes]
        evaluate_captioner(captioner, AutoProcessor.from_pretrained(captioner_dir), pictures, truths)
    if filter_dir is not None:
        retrieval = BlipForImageTextRetrieval.from_pretrained(filter_dir).eval()
        evaluate_filter(retrieval, AutoProcessor.from_pretrained(filter_dir), pictures, scenes, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="saves OUT/captioner and OUT/filter")
    parser.add_argument("--work", type=Path, help="keep the scenes, random models and fine-tuning runs here "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--scenes", type=int, default=defaults.scenes, help="training scenes")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--captioner-epochs", type=int, default=defaults.captioner_epochs)
    parser.add_argument("--filter-epochs", type=int, default=defaults.filter_epochs)
    parser.add_argument("--captioner-lr", type=float, default=defaults.captioner_lr)
    parser.add_argument("--filter-lr", type=float, default=defaults.filter_lr)
    parser.add_argument("--no-edges", action="store_true", help="leave the patch embedding as initialised")
    parser.add_argument("--only", choices=ROLES, help="make (and evaluate) one of the two models")
    parser.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes to evaluate on")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the models already in OUT")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    parser.add_argument("--one-after-the-other", action="store_true",
                        help="fine-tune the two one after the other, each with all threads (default: both at once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    roles = (args.only,) if args.only else ROLES
    if not args.eval_only:
        settings = Settings(seed=args.seed, scenes=args.scenes, batch_size=args.batch_size,
                            captioner_epochs=args.captioner_epochs, filter_epochs=args.filter_epochs,
                            captioner_lr=args.captioner_lr, filter_lr=args.filter_lr, edges=not args.no_edges)
        parallel = not args.one_after_the_other and len(roles) > 1
        if args.work is not None:
            make(args.out, args.work, settings, args.threads, parallel, roles)
        else:
            with tempfile.TemporaryDirectory(prefix="capfilt-demo-") as work:
                make(args.out, Path(work), settings, args.threads, parallel, roles)
    evaluate(args.out / "captioner" if "captioner" in roles else None,
             args.out / "filter" if "filter" in roles else None, args.seed, args.eval_scenes)


if __name__ == "__main__":
    main()
