"""Train the demo captioner and filter from scratch on the shapes domain, then evaluate and save them.

    python -m capfilt.demo.train --out models/demo          # train (about 7 minutes on 2 CPU cores), save
    python -m capfilt.demo.train --out models/demo --eval-only

Both models are trained the way capfilt then uses them. The captioner learns BLIP's captioning objective:
the language-model loss on "[DEC] a picture of <caption> [SEP]" with the prompt's tokens masked out of the
loss, which is what `BlipForConditionalGeneration.generate` continues from. The filter learns BLIP's two
matching objectives on the same inputs `BlipForImageTextRetrieval.forward` sees: image-text matching (ITM,
matched against one-detail-wrong captions, other pictures' captions and junk alt text) and the image-text
contrastive loss (ITC) on its projected [CLS] features, so that both its ITM probability and its cosine
similarity separate right captions from wrong ones.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

from capfilt.demo import shapes
from capfilt.demo.tiny_blip import PROMPT, Architecture, build_processor, new_captioner, new_filter, save

ARCHITECTURE = Architecture(image_size=64, patch_size=8, hidden=128, layers=2, heads=4, embedding=64)
# Pictures are rendered at the example dataset's size and pass through JPEG, as web pictures do.
RENDER_SIZE = 128


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights."""

    seed: int = 0
    train_scenes: int = 12000
    batch_size: int = 64
    steps: int = 1500
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05


@dataclass
class Pool:
    """Scenes with their true captions and their pictures already turned into model inputs."""

    scenes: list[shapes.Scene]
    captions: list[str]
    pixels: torch.Tensor


def web_picture(scene: shapes.Scene, rng: random.Random) -> Image.Image:
    """The scene as a web picture: rendered, then JPEG-compressed at a typical quality."""
    buffer = io.BytesIO()
    shapes.render(scene, RENDER_SIZE).save(buffer, "JPEG", quality=rng.randint(75, 95))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def make_pool(count: int, rng: random.Random, processor: BlipProcessor) -> Pool:
    """`count` random scenes, their captions and pixel values (made once: rendering is slower than training)."""
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pictures = [web_picture(scene, rng) for scene in scenes]
    chunks = [
        processor.image_processor(images=pictures[start : start + 500], return_tensors="pt").pixel_values
        for start in range(0, count, 500)
    ]
    return Pool(scenes, [shapes.describe(scene) for scene in scenes], torch.cat(chunks))


def optimise(
    parameters: list[torch.nn.Parameter],
    recipe: Recipe,
    pool_size: int,
    loss_of_step: Callable[[torch.Tensor], tuple[torch.Tensor, str]],
) -> None:
    """AdamW with linear warm-up and cosine decay over random batches of pool indices; prints progress."""
    optimiser = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    steps = recipe.steps
    warmup = max(1, int(steps * recipe.warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.monotonic()
    for step in range(1, steps + 1):
        loss, detail = loss_of_step(torch.randint(pool_size, (recipe.batch_size,), generator=generator))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {detail}  {time.monotonic() - started:.0f}s")


def captioner_inputs(processor: BlipProcessor, captions: list[str]) -> dict[str, torch.Tensor]:
    """Decoder inputs and labels for "[DEC] a picture of <caption> [SEP]", as BLIP trains its captioner.

    The tokenizer writes [CLS] first; `generate` replaces it with [DEC], so training does the same. The labels
    ignore (-100) the prompt, which the caption is conditioned on but never has to predict, and the padding.
    """
    tokenizer = processor.tokenizer
    encoded = tokenizer([PROMPT + caption for caption in captions], padding="longest", return_tensors="pt")
    input_ids = encoded.input_ids.clone()
    input_ids[:, 0] = tokenizer.bos_token_id
    labels = input_ids.masked_fill(encoded.attention_mask == 0, -100)
    prompt_length = len(tokenizer(PROMPT).input_ids) - 1  # [DEC] and the prompt's words, not its [SEP]
    labels[:, :prompt_length] = -100
    return {"input_ids": input_ids, "attention_mask": encoded.attention_mask, "labels": labels}


def negative_caption(scene_index: int, pool: Pool, rng: random.Random) -> str:
    """A wrong caption for a picture, as filtering meets them: mostly one detail off, else unrelated."""
    kind = rng.random()
    if kind < 0.5:
        return shapes.mismatched_caption(pool.scenes[scene_index], rng)
    if kind < 0.8:
        return shapes.junk_alt_text(rng)
    while True:
        other = pool.captions[rng.randrange(len(pool.captions))]
        if other != pool.captions[scene_index]:
            return other


def filter_losses(
    model: BlipForImageTextRetrieval,
    processor: BlipProcessor,
    image_embeds: torch.Tensor,
    right: list[str],
    wrong: list[str],
    log_temperature: torch.nn.Parameter,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's ITM and ITC losses, computed with the very submodules `BlipForImageTextRetrieval.forward` runs.

    ITM sees every picture with its right and its wrong caption, the two classes weighted equally. ITC
    contrasts each picture with all captions of the batch (the wrong ones included, so that one-detail-off
    captions get low similarity too) and each right caption with all pictures; captions equal to a picture's
    own caption count as right for it.
    """
    texts = processor.tokenizer(right + wrong, padding="longest", return_tensors="pt")
    size = len(right)

    fused = model.text_encoder(
        input_ids=texts.input_ids,
        attention_mask=texts.attention_mask,
        encoder_hidden_states=image_embeds.repeat(2, 1, 1),
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long).repeat(2, 1),
    ).last_hidden_state
    itm_logits = model.itm_head(fused[:, 0, :])
    itm_loss = (
        F.cross_entropy(itm_logits[:size], torch.ones(size, dtype=torch.long))
        + F.cross_entropy(itm_logits[size:], torch.zeros(size, dtype=torch.long))
    ) / 2

    text_alone = model.text_encoder(input_ids=texts.input_ids, attention_mask=texts.attention_mask).last_hidden_state
    text_features = F.normalize(model.text_proj(text_alone[:, 0, :]), dim=-1)
    image_features = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    similarity = image_features @ text_features.t() / log_temperature.clamp(math.log(0.01), math.log(0.5)).exp()
    matches = torch.tensor([[caption == text for text in right + wrong] for caption in right], dtype=torch.float)
    image_to_text = -(F.log_softmax(similarity, dim=1) * matches / matches.sum(1, keepdim=True)).sum(1).mean()
    text_matches = matches[:, :size].t()
    text_to_image = -(
        F.log_softmax(similarity[:, :size].t(), dim=1) * text_matches / text_matches.sum(1, keepdim=True)
    ).sum(1).mean()
    return itm_loss, (image_to_text + text_to_image) / 2


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


def train(
    pool: Pool, recipe: Recipe
) -> tuple[BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor]:
    """Train captioner and filter together, one vision encoder shared between them, as BLIP pre-trains.

    Each step's pictures are encoded once, and the encoder learns from the captioning (LM), matching (ITM)
    and contrastive (ITC) losses at once, which teaches it far more per second than two separate runs. Each
    model is saved with its own copy of the encoder, so they load as two independent checkpoints.
    """
    captioner, processor = new_captioner(ARCHITECTURE, recipe.seed)
    retrieval, _ = new_filter(ARCHITECTURE, recipe.seed + 1)
    retrieval.vision_model = captioner.vision_model
    emphasise_edges(captioner.vision_model)
    captioner.train()
    retrieval.train()
    # ITC's learnt temperature, starting at BLIP's 0.07; the saved model's ITC score is the plain cosine.
    log_temperature = torch.nn.Parameter(torch.tensor(math.log(0.07)))
    rng = random.Random(recipe.seed)

    def loss_of_step(indices: torch.Tensor) -> tuple[torch.Tensor, str]:
        chosen = indices.tolist()
        right = [pool.captions[i] for i in chosen]
        wrong = [negative_caption(i, pool, rng) for i in chosen]
        image_embeds = captioner.vision_model(pixel_values=pool.pixels[indices]).last_hidden_state
        lm = captioner.text_decoder(
            encoder_hidden_states=image_embeds, reduction="mean", **captioner_inputs(processor, right)
        ).loss
        itm, itc = filter_losses(retrieval, processor, image_embeds, right, wrong, log_temperature)
        losses = f"lm {lm.item():.4f}  itm {itm.item():.4f}  itc {itc.item():.4f}"
        return lm + itm + itc, f"{losses}  temperature {log_temperature.exp().item():.3f}"

    # The shared encoder's parameters appear in both models; each must reach the optimiser once.
    parameters = list({id(p): p for p in [*captioner.parameters(), *retrieval.parameters(), log_temperature]}.values())
    optimise(parameters, recipe, len(pool.captions), loss_of_step)
    return captioner.eval(), retrieval.eval(), processor


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


def evaluate(captioner_dir: Path, filter_dir: Path, seed: int, count: int) -> None:
    """Evaluate saved models on held-out scenes, loading them as capfilt does."""
    rng = random.Random(f"held-out {seed}")
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pictures = [web_picture(scene, rng) for scene in scenes]
    captioner = BlipForConditionalGeneration.from_pretrained(captioner_dir).eval()
    truths = [shapes.describe(scene) for scene in scenes]
    evaluate_captioner(captioner, AutoProcessor.from_pretrained(captioner_dir), pictures, truths)
    retrieval = BlipForImageTextRetrieval.from_pretrained(filter_dir).eval()
    evaluate_filter(retrieval, AutoProcessor.from_pretrained(filter_dir), pictures, scenes, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="saves OUT/captioner and OUT/filter")
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--learning-rate", type=float, default=Recipe.learning_rate)
    parser.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes to evaluate on")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the models already in OUT")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    captioner_dir, filter_dir = args.out / "captioner", args.out / "filter"
    if not args.eval_only:
        recipe = Recipe(seed=args.seed, steps=args.steps, learning_rate=args.learning_rate)
        started = time.monotonic()
        torch.manual_seed(recipe.seed)
        pool = make_pool(recipe.train_scenes, random.Random(recipe.seed), build_processor(ARCHITECTURE))
        print(f"rendered {recipe.train_scenes} training scenes in {time.monotonic() - started:.0f}s")
        captioner, retrieval, processor = train(pool, recipe)
        save(captioner, processor, captioner_dir)
        save(retrieval, processor, filter_dir)
        print(f"trained and saved both models in {time.monotonic() - started:.0f}s")
    evaluate(captioner_dir, filter_dir, args.seed, args.eval_scenes)


if __name__ == "__main__":
    main()
