"""Web captions for shapes scenes, as noisy as real alt text: right, partial, another picture's, or junk.

Real web alt text is rarely wrong in the way a one-detail-off caption is: much more often it names only part
of the picture ("red circle", "a circle and a square"), belongs to another picture on the same page, or says
nothing about it ("IMG_2031.JPG", "free shipping"). `web_captions` gives a set of scenes such captions in
fixed shares (`WEB_CAPTION_SHARES`, roughly what the BLIP paper's examples and LAION audits show), each with
its kind, so that what a filter keeps can be counted by kind. Everything follows from a `random.Random`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from capfilt.demo import shapes

# Each kind of web caption and its share of the scenes.
WEB_CAPTION_SHARES: tuple[tuple[str, float], ...] = (
    ("right", 0.3),
    ("partial", 0.3),
    ("another picture's", 0.2),
    ("junk", 0.2),
)
KINDS = tuple(kind for kind, _ in WEB_CAPTION_SHARES)


@dataclass(frozen=True)
class WebCaption:
    text: str
    kind: str


def partial_caption(scene: shapes.Scene, rng: random.Random) -> str:
    """Alt text that is true of the scene but names only part of it, in one of three forms:

    - one of its shapes, without the background: "a small red circle";
    - its shapes' kinds only: "a circle and a square";
    - one of its shapes on the background, without the shape's size: "a red circle on a white background".
    """
    shape = rng.choice(scene.shapes)
    form = rng.randrange(3)
    if form == 0:
        return f"a {shape.size} {shape.colour} {shape.kind}"
    if form == 1:
        return " and ".join(f"a {s.kind}" for s in scene.shapes)
    article = "an" if scene.background[0] in "aeiou" else "a"
    return f"a {shape.colour} {shape.kind} on {article} {scene.background} background"


def web_caption(kind: str, scene: shapes.Scene, others: list[shapes.Scene], rng: random.Random) -> str:
    """The web caption of `kind` for `scene`; "another picture's" is the true caption of one of `others` that
    shows something else (`others` must hold one)."""
    if kind == "right":
        return shapes.describe(scene)
    if kind == "partial":
        return partial_caption(scene, rng)
    if kind == "another picture's":
        while True:  # the scenes are random: one that shows something else comes within a few draws
            other = rng.choice(others)
            if other.facts() != scene.facts():
                return shapes.describe(other)
    if kind == "junk":
        return shapes.junk_alt_text(rng)
    raise ValueError(f"unknown web caption kind {kind!r}; one of {', '.join(KINDS)}")


def web_captions(scenes: list[shapes.Scene], rng: random.Random) -> list[WebCaption]:
    """A web caption for each scene, the kinds in exactly `WEB_CAPTION_SHARES` (rounded), in random order."""
    kinds = [kind for kind, share in WEB_CAPTION_SHARES[1:] for _ in range(round(share * len(scenes)))]
    kinds = [KINDS[0]] * (len(scenes) - len(kinds)) + kinds
    rng.shuffle(kinds)
    return [WebCaption(web_caption(kind, scene, scenes, rng), kind) for scene, kind in zip(scenes, kinds)]
