"""A toy world of captioned 64 px pictures: the data set of the miniature SD-XL base model.

The real T-LoRA experiment needs SD-XL and a GPU. This world is small enough for a CPU to learn in minutes,
yet has what the experiment measures: an object a prompt names ("a red star") and a context a prompt names
("on the beach", "on a blue background"). A picture is a function of a `Scene` (shape, colour, context,
size, position and a seed for the context's details), so the generator itself is the data set: nothing is
downloaded and the same seed gives the same pixels.

    shapes    circle square triangle star ring cross
    colours   red green blue yellow purple orange
    contexts  scenes: the beach (sand below sky), the snow, night, the grass;
              solid backgrounds: white, black, pink, blue, red, yellow (never the object's colour)

Captions follow one grammar, "a {colour} {shape} {where}", with {where} as in `CONTEXT_PHRASES`:
"a green ring on the beach", "a red star on a blue background". The concept of the experiment, the robot
of `examples/concept.png`, is not in the world; `concept_on_context` places it on one context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so their edges are smooth at 64 px

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (40, 86, 214),
    "yellow": (242, 204, 36),
    "purple": (136, 62, 186),
    "orange": (245, 132, 30),
}
SOLID_BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 24),
    "pink": (246, 170, 200),
    "blue": (120, 170, 235),
    "red": (200, 70, 70),
    "yellow": (246, 226, 120),
}
SCENES = ("beach", "snow", "night", "grass")
CONTEXTS = SCENES + tuple(f"{name} background" for name in SOLID_BACKGROUNDS)
CONTEXT_PHRASES = {
    "beach": "on the beach",
    "snow": "in the snow",
    "night": "at night",
    "grass": "on the grass",
    **{f"{name} background": f"on a {name} background" for name in SOLID_BACKGROUNDS},
}

# The concept taught from one picture, and its caption in the world's grammar ("a sks toy on the beach"). Not the
# paper's "a photo of sks toy": the toy base reads prompts with random, frozen text encoders whose causal attention
# makes a word's embedding depend on every word before it, so "sks toy" names the concept only after the words it
# was trained after. Training on the beginning that every contextual prompt shares keeps it the same word there.
CONCEPT = "sks toy"
CONCEPT_PROMPT = f"a {CONCEPT}"

# Object size (radius in px at 64 px) and how far its centre may move from the middle.
MIN_RADIUS, MAX_RADIUS = 10, 17
MAX_OFFSET = 10


@dataclass(frozen=True)
class Scene:
    """Everything a picture shows; `render(scene)` draws it and `caption(scene)` describes it."""

    shape: str
    colour: str
    context: str
    radius: int
    x: int
    y: int
    detail_seed: int  # stars at night, snowflakes, grass blades, ripples

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {', '.join(COLOURS)}")
        if self.context not in CONTEXTS:
            raise ValueError(f"unknown context {self.context!r}; expected one of {', '.join(CONTEXTS)}")
        if self.context == f"{self.colour} background":
            raise ValueError(f"a {self.colour} object on a {self.colour} background would be invisible")


def contexts_for(colour: str) -> tuple[str, ...]:
    """The contexts an object of `colour` can be shown on (all but a background of its own colour)."""
    return tuple(context for context in CONTEXTS if context != f"{colour} background")


def sample_scene(rng: random.Random) -> Scene:
    colour = rng.choice(tuple(COLOURS))
    return Scene(
        shape=rng.choice(SHAPES),
        colour=colour,
        context=rng.choice(contexts_for(colour)),
        radius=rng.randint(MIN_RADIUS, MAX_RADIUS),
        x=IMAGE_SIZE // 2 + rng.randint(-MAX_OFFSET, MAX_OFFSET),
        y=IMAGE_SIZE // 2 + rng.randint(-MAX_OFFSET, MAX_OFFSET),
        detail_seed=rng.randrange(2**31),
    )


def sample_scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(count)]


def context_phrase(context: str) -> str:
    return CONTEXT_PHRASES[context]


def caption(scene: Scene) -> str:
    return f"a {scene.colour} {scene.shape} {context_phrase(scene.context)}"


# --------------------------------------------------------------------------- contexts


def _ground_and_sky(size: int, horizon: float, sky, ground) -> Image.Image:
    image = Image.new("RGB", (size, size), sky)
    ImageDraw.Draw(image).rectangle((0, round(horizon * size), size, size), fill=ground)
    return image


def draw_context(context: str, size: int = IMAGE_SIZE, detail_seed: int = 0) -> Image.Image:
    """The background of `context` alone, `size` x `size`; details (stars, flakes, blades) follow `detail_seed`."""
    if context not in CONTEXTS:
        raise ValueError(f"unknown context {context!r}; expected one of {', '.join(CONTEXTS)}")
    rng = random.Random(detail_seed)
    if context.endswith(" background"):
        return Image.new("RGB", (size, size), SOLID_BACKGROUNDS[context.removesuffix(" background")])
    u = size / IMAGE_SIZE
    if context == "beach":
        image = _ground_and_sky(size, 0.55, (125, 196, 240), (232, 206, 140))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, round(0.47 * size), size, round(0.55 * size)), fill=(40, 120, 190))  # the sea
        for _ in range(4):
            x, y = rng.uniform(0, size), rng.uniform(0.6, 0.95) * size
            draw.line((x, y, x + 5 * u, y), fill=(206, 180, 116), width=max(1, round(u)))
    elif context == "snow":
        image = _ground_and_sky(size, 0.6, (196, 204, 214), (250, 250, 252))
        draw = ImageDraw.Draw(image)
        for _ in range(18):
            x, y, r = rng.uniform(0, size), rng.uniform(0, 0.6 * size), rng.uniform(0.6, 1.2) * u
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255))
    elif context == "night":
        image = Image.new("RGB", (size, size), (16, 22, 58))
        draw = ImageDraw.Draw(image)
        for _ in range(14):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.4, 0.8) * u
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 250, 210))
        mx, my = rng.choice((10, 54)) * u, 10 * u
        draw.ellipse((mx - 6 * u, my - 6 * u, mx + 6 * u, my + 6 * u), fill=(250, 244, 200))  # the moon
    else:  # grass
        image = _ground_and_sky(size, 0.5, (170, 214, 246), (70, 150, 50))
        draw = ImageDraw.Draw(image)
        for _ in range(20):
            x, y = rng.uniform(0, size), rng.uniform(0.52, 1.0) * size
            draw.line((x, y, x + rng.uniform(-1, 1) * u, y - 3 * u), fill=(40, 110, 30), width=max(1, round(u)))
    return image


# --------------------------------------------------------------------------- objects


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        angle = -np.pi / 2 + i * np.pi / 5
        radius = r if i % 2 == 0 else 0.45 * r
        points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        side = 0.82 * r
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=round(0.38 * r))
    else:  # cross
        arm = 0.3 * r
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB picture (coordinates in the scene are for 64 px)."""
    big = size * SUPERSAMPLE
    u = big / IMAGE_SIZE
    canvas = draw_context(scene.context, big, scene.detail_seed)
    _draw_shape(ImageDraw.Draw(canvas), scene.shape, scene.x * u, scene.y * u, scene.radius * u, COLOURS[scene.colour])
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """(N, 64, 64, 3) uint8 pictures of `scenes`."""
    return np.stack([np.asarray(render(scene)) for scene in scenes])


# --------------------------------------------------------------------------- the concept


def cut_out_concept(picture: Image.Image, threshold: int = 40) -> Image.Image:
    """RGBA cut-out of the character in `examples/concept.png`.

    That picture's background is a vertical gradient and the character never touches the left edge, so each
    row's background colour is its leftmost pixel; pixels far enough from it are the character (its soft
    ground shadow fades below `threshold` and drops out).
    """
    rgb = np.asarray(picture.convert("RGB"), dtype=np.int16)
    background = rgb[:, :1, :]
    distance = np.abs(rgb - background).max(axis=2)
    alpha = Image.fromarray(np.where(distance > threshold, 255, 0).astype(np.uint8)).filter(ImageFilter.MinFilter(3))
    cut_out = Image.fromarray(rgb.astype(np.uint8)).convert("RGBA")
    cut_out.putalpha(alpha)
    return cut_out


def concept_on_context(
    concept_path: Path, context: str, size: int = IMAGE_SIZE, scale: float = 0.8, offset: tuple[int, int] = (0, 0)
) -> Image.Image:
    """The character of `concept_path` on `context`, `scale` of the picture's width, shifted by `offset` px."""
    with Image.open(concept_path) as picture:
        cut_out = cut_out_concept(picture)
    box = cut_out.getbbox()
    if box is None:
        raise ValueError(f"{concept_path}: found no character to cut out (the picture is one flat colour)")
    cut_out = cut_out.crop(box)
    big = size * SUPERSAMPLE
    side = round(scale * big)
    factor = side / max(cut_out.size)
    cut_out = cut_out.resize((max(1, round(cut_out.width * factor)), max(1, round(cut_out.height * factor))))
    canvas = draw_context(context, big)
    left = (big - cut_out.width) // 2 + offset[0] * SUPERSAMPLE
    top = (big - cut_out.height) // 2 + offset[1] * SUPERSAMPLE
    canvas.paste(cut_out, (left, top), cut_out)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)
