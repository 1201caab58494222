"""Captioned pictures of simple scenes, drawn with Pillow: the training data of zflux's small models.

A scene is one coloured shape on a plain background of another colour, of one of three sizes, centred
or moved towards one side, sometimes with a short word written in the picture. Its caption says
exactly what is drawn, in English or in Chinese. The grammar ([...] optional, | a choice):

    english := a [size " "] colour " " shape [" " place] " on " a colour " background" [' with the word "' word '"']
    a       := "a " | "an " (before a vowel: "an orange circle on an orange background")
    size    := "small" | "large"                                          (unsaid: medium)
    place   := "on the left" | "on the right" | "at the top" | "at the bottom"    (unsaid: centred)
    colour  := "red" | "green" | "blue" | "yellow" | "white" | "black" | "orange" | "purple"
    shape   := "circle" | "square" | "triangle"
    word    := "zflux" | "hello" | "sun" | "cat" | "sky" | "ok" | "art" | "hi"

    chinese := colour "背景上的一个" [size "的"] colour shape ["，位于" place] ['，写着"' word '"']
    colour  := 红色 绿色 蓝色 黄色 白色 黑色 橙色 紫色;  shape := 圆形 正方形 三角形;  size := 小 | 大
    place   := 左侧 | 右侧 | 上方 | 下方

so "a red circle on a blue background" is "蓝色背景上的一个红色圆形". The shape's colour is never the
background's. Some (colour, shape, background) combinations never occur in training (HELD_OUT), so that
tests can ask for pictures the models have not seen.
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = {  # name -> RGB, far apart so that each pixel's nearest palette colour names it
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (245, 215, 50),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 30), "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "medium": 0.24, "large": 0.34}  # the shape's radius as a fraction of the picture's side
PLACES = ("centre", "left", "right", "top", "bottom")
WORDS = ("zflux", "hello", "sun", "cat", "sky", "ok", "art", "hi")
LANGUAGES = ("en", "zh")

ZH_COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "white": "白色", "black": "黑色", "orange": "橙色",
              "purple": "紫色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
ZH_SIZES = {"small": "小", "large": "大"}
EN_PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
ZH_PLACES = {"left": "左侧", "right": "右侧", "top": "上方", "bottom": "下方"}

SIZE_ODDS = {"medium": 0.6, "small": 0.2, "large": 0.2}
PLACE_ODDS = {"centre": 0.6, "left": 0.1, "right": 0.1, "top": 0.1, "bottom": 0.1}
WORD_ODDS = 0.3  # share of scenes with a word written in them
MARGIN = 0.06  # a shape moved to one side stops this far (fraction of the side) from the edge
JITTER = 0.03  # random offset of the shape's centre, fraction of the side
SUPERSAMPLE = 2  # drawn this many times larger, then box-filtered down: anti-aliased edges
FONT_SIZE = 0.13  # of the side


def _held_out() -> frozenset[tuple[str, str, str]]:
    """24 (colour, shape, background) triples: 3 per shape colour and 3 per background, shapes spread evenly.

    Every colour pair, and every colour with every shape, still appears in training in other triples.
    """
    names = list(COLOURS)
    pairs = [(c, b) for i, c in enumerate(names) for j, b in enumerate(names) if (j - i) % len(names) in (1, 3, 6)]
    return frozenset((c, SHAPES[k % len(SHAPES)], b) for k, (c, b) in enumerate(pairs))


HELD_OUT = _held_out()


@dataclass(frozen=True)
class Scene:
    """What one picture shows; `dx`, `dy` nudge the shape (fractions of the side), unsaid in the caption."""

    colour: str
    shape: str
    background: str
    size: str = "medium"
    place: str = "centre"
    word: str | None = None
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self):
        for value, allowed in ((self.colour, COLOURS), (self.background, COLOURS), (self.shape, SHAPES), (self.size, SIZES),
                               (self.place, PLACES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background would not show")

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.background


def caption(scene: Scene, language: str = "en") -> str:
    """The scene's caption in `language` ("en" or "zh"), by the grammar above."""
    if language == "en":
        size = "" if scene.size == "medium" else f"{scene.size} "
        place = "" if scene.place == "centre" else f" {EN_PLACES[scene.place]}"
        word = "" if scene.word is None else f' with the word "{scene.word}"'
        return f"{_a(size + scene.colour)} {scene.shape}{place} on {_a(scene.background)} background{word}"
    if language == "zh":
        size = "" if scene.size == "medium" else f"{ZH_SIZES[scene.size]}的"
        place = "" if scene.place == "centre" else f"，位于{ZH_PLACES[scene.place]}"
        word = "" if scene.word is None else f'，写着"{scene.word}"'
        return f"{ZH_COLOURS[scene.background]}背景上的一个{size}{ZH_COLOURS[scene.colour]}{ZH_SHAPES[scene.shape]}{place}{word}"
    raise ValueError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGES)}")


def _a(words: str) -> str:
    """`words` with the indefinite article in front."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def _pick(rng: random.Random, odds: dict[str, float]) -> str:
    return rng.choices(list(odds), weights=list(odds.values()))[0]


def random_scene(rng: random.Random) -> Scene:
    """A scene drawn from the training distribution (never a HELD_OUT triple)."""
    while True:
        colour, background = rng.sample(list(COLOURS), 2)
        shape = rng.choice(SHAPES)
        if (colour, shape, background) not in HELD_OUT:
            break
    word = rng.choice(WORDS) if rng.random() < WORD_ODDS else None
    return Scene(colour, shape, background, size=_pick(rng, SIZE_ODDS), place=_pick(rng, PLACE_ODDS), word=word,
                 dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER))


def shape_centre(scene: Scene) -> tuple[float, float]:
    """Where the shape's centre sits, as fractions (x, y) of the side."""
    r = SIZES[scene.size]
    edge = {"left": (MARGIN + r, 0.5), "right": (1 - MARGIN - r, 0.5), "top": (0.5, MARGIN + r), "bottom": (0.5, 1 - MARGIN - r)}
    x, y = edge.get(scene.place, (0.5, 0.5))
    return x + scene.dx, y + scene.dy


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a square or an upward triangle of radius r about (x, y), sized to look as big as a circle of radius r."""
    if shape == "square":
        a = 0.9 * r
        return [(x - a, y - a), (x + a, y - a), (x + a, y + a), (x - a, y + a)]
    R = 1.2 * r  # the triangle's circumradius; its centroid sits at (x, y)
    return [(x, y - R), (x + 0.866 * R, y + R / 2), (x - 0.866 * R, y + R / 2)]


def draw(scene: Scene, size: int) -> Image.Image:
    """The scene as a `size` x `size` RGB picture."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    pen = ImageDraw.Draw(image)
    cx, cy = shape_centre(scene)
    x, y, r = cx * side, cy * side, SIZES[scene.size] * side
    if scene.shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[scene.colour])
    else:
        pen.polygon(_outline(scene.shape, x, y, r), fill=COLOURS[scene.colour])
    if scene.word is not None:
        _write(pen, scene, side)
    return image.reduce(SUPERSAMPLE)


def _write(pen: ImageDraw.ImageDraw, scene: Scene, side: int) -> None:
    """The scene's word, in black or white (whichever stands out from the background), on the side away from the shape."""
    ink = "black" if sum(COLOURS[scene.background]) > 384 else "white"
    y = 0.1 if scene.place == "bottom" else 0.9
    font = ImageFont.load_default(size=round(FONT_SIZE * side))
    pen.text((side / 2, y * side), scene.word, fill=ink, font=font, anchor="mm")
