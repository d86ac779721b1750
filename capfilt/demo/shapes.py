"""A synthetic "shapes" domain: pictures of coloured shapes whose true caption is known exactly.

It stands in for web images so that capfilt can be demonstrated and tested offline: the demo captioner and
filter are trained on it, and the example dataset's noisy web captions are made from it. Everything follows
from a `random.Random`, so the same seed always gives the same scenes, pictures and captions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
KINDS = ("circle", "square", "triangle", "star")
# Shape centres sit on the corners of a GRID x GRID grid. The demo models cut their input into the same grid
# of patches, so a shape always covers its patches the same way; with free placement a tiny vision
# transformer trained for minutes on a CPU cannot tell the shapes apart in so many colours.
GRID = 8
# Radius of each size, as a fraction of the picture's side.
SIZES: dict[str, float] = {"small": 1 / GRID, "large": 1.75 / GRID}
# Least gap between two shapes, so that "left one first" is always clear.
GAP = 0.03

_JUNK_PHRASES = (
    "click here to buy now",
    "free shipping on all orders",
    "image not found",
    "stock photo",
    "best price guaranteed",
    "view larger image",
)
_DIGITS = tuple("0123456789")
_PUNCTUATION = ("_", ".", "-")


@dataclass(frozen=True)
class Shape:
    """One shape; `x`, `y` (its centre) and `radius` are fractions of the picture's side."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A plain background with one or two shapes, ordered left to right as the caption names them."""

    background: str
    shapes: tuple[Shape, ...]

    def facts(self) -> tuple[str, frozenset[tuple[str, str, str]]]:
        """What the scene shows regardless of where: two captions are equally right iff their facts agree."""
        return self.background, frozenset((s.size, s.colour, s.kind) for s in self.shapes)


def _random_shape(rng: random.Random, background: str) -> tuple[str, str, str]:
    colour = rng.choice([c for c in COLOURS if c != background])
    return rng.choice(KINDS), colour, rng.choice(list(SIZES))


def _grid_points(radius: float) -> list[float]:
    """Grid coordinates where a shape of `radius` lies wholly inside the picture."""
    return [i / GRID for i in range(1, GRID) if radius <= i / GRID <= 1 - radius]


def random_scene(rng: random.Random) -> Scene:
    """A scene with random background and one or two shapes (evenly), the second wholly right of the first."""
    background = rng.choice(list(COLOURS))
    looks = [_random_shape(rng, background) for _ in range(rng.choice((1, 2)))]
    radii = [SIZES[size] for _, _, size in looks]
    while True:
        xs = [rng.choice(_grid_points(r)) for r in radii]
        if len(xs) == 1 or xs[1] - xs[0] >= radii[0] + radii[1] + GAP:
            break
    shapes = tuple(
        Shape(kind, colour, size, x, rng.choice(_grid_points(r)), r)
        for (kind, colour, size), r, x in zip(looks, radii, xs)
    )
    return Scene(background, shapes)


def _outline(shape: Shape, side: int) -> list[tuple[float, float]]:
    """The polygon of a triangle or star, scaled to a `side`-pixel picture."""
    cx, cy, r = shape.x * side, shape.y * side, shape.radius * side
    if shape.kind == "triangle":
        return [(cx, cy - r), (cx + r * 0.94, cy + r * 0.8), (cx - r * 0.94, cy + r * 0.8)]
    points = []
    for i in range(10):
        # The outer tips of a five-pointed star, one pointing up, with inner corners at 0.45 of the radius.
        reach = r if i % 2 == 0 else r * 0.45
        angle = math.pi * (i / 5 - 0.5)
        points.append((cx + reach * math.cos(angle), cy + reach * math.sin(angle)))
    return points


def render(scene: Scene, size: int = 128) -> Image.Image:
    """The scene drawn as a `size` x `size` RGB picture."""
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fill = COLOURS[shape.colour]
        cx, cy, r = shape.x * size, shape.y * size, shape.radius * size
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            half = r * 0.85  # a square of the same radius would look much bigger than the circle
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon(_outline(shape, size), fill=fill)
    return image


def describe(scene: Scene) -> str:
    """The scene's true caption, e.g. "a small yellow triangle and a large green square on a white background"."""
    things = " and ".join(f"a {s.size} {s.colour} {s.kind}" for s in scene.shapes)
    article = "an" if scene.background[0] in "aeiou" else "a"
    return f"{things} on {article} {scene.background} background"


def mismatched_caption(scene: Scene, rng: random.Random) -> str:
    """A caption that is wrong for the scene in one detail only (a hard negative for the filter).

    One of: a shape's colour, kind or size, or the background colour changes. The result always differs from
    the scene in `Scene.facts`, so it is never a right caption in other words.
    """
    while True:
        detail = rng.choice(("colour", "kind", "size", "background"))
        index = rng.randrange(len(scene.shapes))
        shape = scene.shapes[index]
        if detail == "background":
            used = {s.colour for s in scene.shapes} | {scene.background}
            wrong = replace(scene, background=rng.choice([c for c in COLOURS if c not in used]))
        else:
            if detail == "colour":
                others = [c for c in COLOURS if c not in (shape.colour, scene.background)]
                changed = replace(shape, colour=rng.choice(others))
            elif detail == "kind":
                changed = replace(shape, kind=rng.choice([k for k in KINDS if k != shape.kind]))
            else:
                changed = replace(shape, size=next(s for s in SIZES if s != shape.size))
            wrong = replace(scene, shapes=scene.shapes[:index] + (changed,) + scene.shapes[index + 1 :])
        if wrong.facts() != scene.facts():
            return describe(wrong)


def junk_alt_text(rng: random.Random) -> str:
    """Alt text of the kind web pages carry that says nothing about the picture (file names, adverts)."""
    form = rng.randrange(4)
    if form == 0:
        return f"IMG_{rng.randrange(10000):04d}.JPG"
    if form == 1:
        return f"DSC{rng.randrange(100000):05d}"
    if form == 2:
        return f"untitled-{rng.randrange(1, 20)}.png"
    return rng.choice(_JUNK_PHRASES)


def _words() -> list[str]:
    caption_words = {"a", "an", "and", "on", "background", *COLOURS, *KINDS, *SIZES}
    junk_words = {"img", "jpg", "dsc", "untitled", "png"} | {w for phrase in _JUNK_PHRASES for w in phrase.split()}
    return sorted(caption_words | junk_words | set(_DIGITS) | set(_PUNCTUATION))


# Every token (lower case, as a BERT tokenizer splits text) that a caption or junk alt text can contain.
# Numbers in junk alt text are spelled with the digits, so a tokenizer also needs "##0".."##9" pieces.
VOCABULARY: list[str] = _words()
