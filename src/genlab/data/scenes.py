"""Procedural captioned scenes: offline, measurable text-to-image data (issue 10).

Every image is drawn from a `Scene` spec, and its caption is a deterministic function of that
spec, so the ground truth of every caption is exact: what objects, which colours and sizes,
where, and what the cat wears. A held-out split holds caption *combinations* (colour-shape
pairs, spatial arrangements, both accessories at once) that the train split never shows,
while every part of them (each colour, shape, relation, accessory) is seen in train: the
measure of compositional generalisation that `genlab.evaluate.scene_checker` scores.

Grammar (lowercase; NP = noun phrase):
    NP    := ("a " | "an ") [size " "] [colour " "] kind [" wearing " accessories]
    scene := NP | NP " " relation " " NP
    kind ∈ circle square triangle (take a colour) | cat sun tree (fixed colours)
    relation ∈ left of, right of, above, below, next to
e.g. "a red circle", "a large blue square", "a red circle left of a blue square",
"a cat wearing sunglasses and a hat", "a cat next to a tree", "a sun above a tree".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw  # Pillow ships with matplotlib, a genlab dependency

from genlab.errors import InvalidParameterError

SHAPES = ("circle", "square", "triangle")
THINGS = ("cat", "sun", "tree")  # drawn in fixed colours; captions never name a colour for them
KINDS = SHAPES + THINGS
# Far apart in RGB so that a 32x32 image (or a generator's imperfect one) still tells them apart.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 205, 20),
    "purple": (145, 45, 185),
    "orange": (250, 135, 20),
}
COLOURS = tuple(PALETTE)
# Training-only variety (`diverse=True`, train split): shapes in twelve more colours, six more
# shapes, four more things (in fixed colours) to stand in relations, and three more things a cat
# may wear: a crown (on the head, like the hat), an eye patch (over the eyes, like the
# sunglasses) and a bow tie, worn in any combination but the held-out one (sunglasses with a
# hat). None of it ever forms a held-out combination; what it teaches is that a colour word, a
# kind, a relation and an accessory combine freely, so a model is not left to learn "squares are
# never red" from six colours and three shapes, "a triangle is always right of a circle" from
# six kinds, or "a head item means bare eyes" (`bench/image.py` measures each step; README). The
# checker and every evaluation use the core vocabulary above only.
EXTRA_PALETTE = {
    "pink": (250, 130, 190), "cyan": (40, 200, 215), "brown": (125, 75, 35), "grey": (125, 125, 125),
    "lime": (165, 225, 40), "navy": (20, 30, 110), "teal": (15, 120, 120), "magenta": (225, 40, 200),
    "maroon": (120, 20, 45), "olive": (110, 120, 20), "sky": (120, 185, 250), "black": (25, 25, 25),
}
EXTRA_SHAPES = ("diamond", "star", "cross", "hexagon", "heart", "ring")
EXTRA_THINGS = ("moon", "house", "flower", "fish")  # fixed colours, like cat / sun / tree
ALL_PALETTE = {**PALETTE, **EXTRA_PALETTE}
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below", "next to")
ACCESSORIES = ("sunglasses", "hat")
BACKGROUND = (250, 250, 245)
WORN_TEXT = {"sunglasses": "sunglasses", "eye_patch": "an eye patch", "hat": "a hat", "crown": "a crown",
             "bow_tie": "a bow tie"}  # caption order
SIZE_FRACTION = {"small": 0.34, "large": 0.62}  # object extent as a fraction of the canvas side
# where a cat's accessories are drawn, relative to its centre in units of its extent (x0, y0, x1, y1)
PART_BOXES = {"sunglasses": (-0.34, -0.14, 0.34, 0.08), "hat": (-0.42, -0.76, 0.42, -0.27)}
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges keep small shapes readable

# Held-out combinations: never in "train", each the point of a "heldout" scene. Arrangements are
# kind-level and geometric ((left, "left of", right) or (top, "above", bottom)), so paraphrases
# ("a circle right of a triangle") and "next to" cannot leak them into train.
HELDOUT_COLOUR_SHAPES = frozenset({("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square")})
HELDOUT_ARRANGEMENTS = frozenset({
    ("triangle", "left of", "circle"),
    ("square", "above", "triangle"),
    ("tree", "left of", "cat"),
    ("sun", "above", "cat"),
})
HELDOUT_ACCESSORIES = frozenset({("sunglasses", "hat")})  # a cat wearing both
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class Obj:
    """One object. Geometry (x, y, scale) is part of the spec so `render` is a pure function."""

    kind: str
    colour: str | None = None  # a PALETTE name for shapes; None for cat / sun / tree
    size: str = "large"
    x: float = 0.5  # centre, fraction of the width (0 = left edge)
    y: float = 0.5  # centre, fraction of the height (0 = top edge)
    scale: float = 1.0  # jitter around the nominal size (never changes small vs large)
    sunglasses: bool = False  # cats only
    hat: bool = False  # cats only
    eye_patch: bool = False  # cats only; the three below are training-only variety (never evaluated)
    crown: bool = False
    bow_tie: bool = False

    @property
    def key(self) -> tuple[str, str | None]:
        """What identifies the object in a scene: no scene holds two with the same key."""
        return (self.kind, self.colour)


@dataclass(frozen=True)
class Scene:
    """One or two objects; with two, `relation` says how objects[0] stands to objects[1]."""

    objects: tuple[Obj, ...]
    relation: str | None = None
    say_size: bool = False  # whether the caption names the size (single-object scenes)

    @property
    def caption(self) -> str:
        return caption(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(Obj(**o) for o in d["objects"]), d.get("relation"), d.get("say_size", False))


def noun_phrase(obj: Obj, say_size: bool = False) -> str:
    words = ([obj.size] if say_size else []) + ([obj.colour] if obj.colour else []) + [obj.kind]
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")  # "an orange circle"
    worn = [text for attr, text in WORN_TEXT.items() if getattr(obj, attr)]
    if worn:
        words += ["wearing", " and ".join(worn)]
    return " ".join(words)


def caption(scene: Scene) -> str:
    if len(scene.objects) == 1:
        return noun_phrase(scene.objects[0], scene.say_size)
    a, b = scene.objects
    return f"{noun_phrase(a, scene.say_size)} {scene.relation} {noun_phrase(b, scene.say_size)}"


def parse_caption(text: str) -> Scene:
    """The inverse of `caption` on the grammar (geometry left at defaults): what a caption asks for."""
    text = " ".join(text.lower().strip().rstrip(".").split())
    for rel in RELATIONS:
        if f" {rel} a " in text or f" {rel} an " in text:
            left, right = text.split(f" {rel} ", 1)
            (a, sa), (b, sb) = _parse_np(left, text), _parse_np(right, text)
            return Scene((a, b), rel, sa or sb)
    obj, said = _parse_np(text, text)
    return Scene((obj,), None, said)


def _parse_np(np_text: str, whole: str) -> tuple[Obj, bool]:
    words = np_text.split()
    if not words or words[0] not in ("a", "an"):
        raise InvalidParameterError(f"caption {whole!r}: expected 'a ...' or 'an ...' at {np_text!r}")
    words = words[1:]
    size = words.pop(0) if words and words[0] in SIZES else None
    colour = words.pop(0) if words and words[0] in PALETTE else None
    kind = words.pop(0) if words else None
    if kind not in KINDS or (kind in SHAPES) != (colour is not None):
        raise InvalidParameterError(f"caption {whole!r}: cannot read {np_text!r} (kinds: {', '.join(KINDS)}; shapes need a colour)")
    rest = " ".join(words)
    worn = {"": (), "wearing sunglasses": ("sunglasses",), "wearing a hat": ("hat",),
            "wearing sunglasses and a hat": ("sunglasses", "hat")}
    if rest not in worn or (worn[rest] and kind != "cat"):
        raise InvalidParameterError(f"caption {whole!r}: cannot read {rest!r} after {kind!r}")
    return Obj(kind, colour, size or "large", sunglasses="sunglasses" in worn[rest], hat="hat" in worn[rest]), size is not None


# ---------------------------------------------------------------- held-out bookkeeping

def arrangement(scene: Scene) -> tuple[str, str, str] | None:
    """The kind-level spatial arrangement from the geometry: (left, "left of", right) or (top, "above", bottom)."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    if abs(a.x - b.x) >= abs(a.y - b.y):
        return (a.kind, "left of", b.kind) if a.x < b.x else (b.kind, "left of", a.kind)
    return (a.kind, "above", b.kind) if a.y < b.y else (b.kind, "above", a.kind)


def heldout_parts(scene: Scene) -> set:
    """Which held-out combinations the scene shows (empty for every train scene)."""
    found = {("colour-shape", o.colour, o.kind) for o in scene.objects if (o.colour, o.kind) in HELDOUT_COLOUR_SHAPES}
    if arrangement(scene) in HELDOUT_ARRANGEMENTS:
        found.add(("arrangement",) + arrangement(scene))
    found |= {("accessories",) + worn for o in scene.objects for worn in HELDOUT_ACCESSORIES if all(getattr(o, a) for a in worn)}
    return found


def condition_vector(scene: Scene) -> np.ndarray:
    """What the caption asks for as a vector [66]: per (kind, colour) entity, present + the sign of
    its displacement from the other object along x and y; then the cat's accessories, size said."""
    entities = [(k, c) for k in SHAPES for c in COLOURS] + [(k, None) for k in THINGS]
    sign = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1), "next to": (0, 0), None: (0, 0)}
    v = np.zeros(len(entities) * 3 + 3)
    for n, o in enumerate(scene.objects):
        e, (dx, dy), flip = entities.index(o.key) * 3, sign[scene.relation], 1 if n == 0 else -1
        v[e:e + 3] = (1, dx * flip, dy * flip)
        v[-3:-1] = np.maximum(v[-3:-1], (o.sunglasses, o.hat))
    v[-1] = float(scene.say_size)
    return v


# ---------------------------------------------------------------- sampling

def _random_entity(rng: np.random.Generator, kinds=KINDS, diverse: bool = False) -> Obj:
    if diverse:
        kinds = (tuple(kinds) + (EXTRA_SHAPES if set(kinds) & set(SHAPES) else ())
                 + (EXTRA_THINGS if set(kinds) & set(THINGS) else ()))
    kind = str(rng.choice(kinds))
    colours = COLOURS + tuple(EXTRA_PALETTE) if diverse else COLOURS
    return Obj(kind, str(rng.choice(colours)) if kind in SHAPES + EXTRA_SHAPES else None)


def _place_single(rng, obj: Obj, size: str) -> Obj:
    # a large object has little room to move; a small one can sit anywhere it fits
    room = 0.5 - SIZE_FRACTION[size] / 2 - 0.06
    x, y = rng.uniform(0.5 - room, 0.5 + room, size=2)
    if obj.kind == "cat" and size == "large":
        y = rng.uniform(0.55, 0.62)  # leave room above the head for a hat
    return dataclasses.replace(obj, size=size, x=float(x), y=float(y), scale=float(rng.uniform(0.9, 1.1)))


def _place_pair(rng, a: Obj, b: Obj, relation: str) -> tuple[Obj, Obj]:
    """Two small objects displaced along the relation's axis by far more than across it."""
    if relation == "next to":
        relation = "left of" if rng.random() < 0.5 else "right of"
    near, far = rng.uniform(0.2, 0.3), rng.uniform(0.7, 0.8)  # along the axis: never touching
    across = rng.uniform(0.3, 0.7)
    pa, pb = (near, far) if relation in ("left of", "above") else (far, near)
    ja, jb = rng.uniform(-0.05, 0.05, size=2)  # objects need not line up exactly
    if relation in ("left of", "right of"):
        (xa, ya), (xb, yb) = (pa, across + ja), (pb, across + jb)
    else:
        (xa, ya), (xb, yb) = (across + ja, pa), (across + jb, pb)
    sa, sb = rng.uniform(0.9, 1.1, size=2)
    a = dataclasses.replace(a, size="small", x=float(xa), y=float(ya), scale=float(sa))
    b = dataclasses.replace(b, size="small", x=float(xb), y=float(yb), scale=float(sb))
    return a, b


def _draw_candidate(rng: np.random.Generator, focus: str | None = None, diverse: bool = False) -> Scene:
    """A scene from the templates; `focus` steers it towards one held-out kind of combination;
    `diverse` adds the training-only colours, shapes, things and accessories."""
    template = focus or str(rng.choice(["shape", "thing", "cat", "pair"], p=[0.3, 0.05, 0.2, 0.45]))
    heldout_pair = sorted(HELDOUT_COLOUR_SHAPES)[rng.integers(len(HELDOUT_COLOUR_SHAPES))]
    if template == "colour-shape":  # a held-out pair, alone (40%) or inside a relation scene
        template = "shape" if rng.random() < 0.4 else "pair-with-colour-shape"
        obj = Obj(heldout_pair[1], heldout_pair[0])
    else:
        obj = _random_entity(rng, SHAPES, diverse)
    if template == "shape":
        return Scene((_place_single(rng, obj, str(rng.choice(SIZES))),), None, bool(rng.random() < 0.5))
    if template == "thing":
        obj = Obj(str(rng.choice(["sun", "tree", *(EXTRA_THINGS if diverse else ())])))
        return Scene((_place_single(rng, obj, str(rng.choice(SIZES))),), None, bool(rng.random() < 0.5))
    if template in ("cat", "accessories"):
        glasses, hat = (True, True) if template == "accessories" else (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        extra = {}
        if diverse:  # one item at most over the eyes and one on the head, each kind equally likely
            eyes, head = rng.integers(3), rng.integers(3)
            glasses, hat = bool(eyes == 1), bool(head == 1)
            extra = dict(eye_patch=bool(eyes == 2), crown=bool(head == 2), bow_tie=bool(rng.random() < 0.4))
        return Scene((_place_single(rng, Obj("cat", sunglasses=glasses, hat=hat, **extra), "large"),))
    relation = str(rng.choice(RELATIONS))
    a, b = _random_entity(rng, diverse=diverse), _random_entity(rng, diverse=diverse)
    if template == "pair-with-colour-shape":
        a, b = (obj, b) if rng.random() < 0.5 else (a, obj)
    if template == "arrangement":
        first, rel, second = sorted(HELDOUT_ARRANGEMENTS)[rng.integers(len(HELDOUT_ARRANGEMENTS))]
        a, b = _random_entity(rng, (first,)), _random_entity(rng, (second,))
        relation = rel
        if rng.random() < 0.5:  # the same arrangement said the other way round
            a, b, relation = b, a, {"left of": "right of", "above": "below"}[rel]
    a, b = _place_pair(rng, a, b, relation)
    return Scene((a, b), relation)


def sample_scene(rng: np.random.Generator, split: str = "train", diverse: bool = False) -> Scene:
    """One scene of a split. "train" never shows a held-out combination; every "heldout" scene
    shows at least one; "all" draws from the templates with no filter. `diverse` (train only):
    the training-only colours, shapes and accessories as well (EXTRA_PALETTE)."""
    if split not in SPLITS:
        raise InvalidParameterError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if diverse and split != "train":
        raise InvalidParameterError("diverse scenes are training data: only the train split has them")
    while True:
        focus = None
        if split == "heldout":
            focus = str(rng.choice(["colour-shape", "arrangement", "accessories"], p=[0.4, 0.4, 0.2]))
        scene = _draw_candidate(rng, focus, diverse)
        if len({o.key for o in scene.objects}) < len(scene.objects):
            continue  # two identical objects: neither caption nor checker could tell them apart
        held = heldout_parts(scene)
        if split == "all" or (split == "train") == (not held):
            return scene


# ---------------------------------------------------------------- drawing

def render(scene: Scene, size: int = 32, palette: dict | None = None) -> np.ndarray:
    """The scene as a uint8 RGB array [size, size, 3] on a near-white background. `palette`
    overrides colour name -> RGB (the scene checker recolours shapes to learn shape apart from colour)."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, big, palette or ALL_PALETTE)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()


def extent(o: Obj) -> float:
    """The object's extent (side of its bounding square) as a fraction of the image side."""
    return SIZE_FRACTION[o.size] * o.scale


def random_palette(rng: np.random.Generator) -> dict:
    """Every colour name -> a random saturated RGB (for shape-only images whose colour goes unlabelled)."""
    import colorsys

    hsv = zip(rng.random(len(COLOURS)), rng.uniform(0.5, 1, len(COLOURS)), rng.uniform(0.55, 1, len(COLOURS)))
    return {name: tuple(int(255 * v) for v in colorsys.hsv_to_rgb(*c)) for name, c in zip(COLOURS, hsv)}


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj, big: int, palette: dict) -> None:
    s = extent(o) * big  # in pixels
    cx, cy = o.x * big, o.y * big

    def box(dx0, dy0, dx1, dy1):  # a box relative to the centre, in units of the extent
        return [cx + dx0 * s, cy + dy0 * s, cx + dx1 * s, cy + dy1 * s]

    def pts(*xy):
        return [(cx + dx * s, cy + dy * s) for dx, dy in xy]

    if o.kind == "circle":
        draw.ellipse(box(-0.5, -0.5, 0.5, 0.5), fill=palette[o.colour])
    elif o.kind == "square":
        draw.rectangle(box(-0.42, -0.42, 0.42, 0.42), fill=palette[o.colour])
    elif o.kind == "triangle":
        draw.polygon(pts((0, -0.5), (-0.5, 0.42), (0.5, 0.42)), fill=palette[o.colour])
    elif o.kind == "diamond":
        draw.polygon(pts((0, -0.5), (0.42, 0), (0, 0.5), (-0.42, 0)), fill=palette[o.colour])
    elif o.kind == "star":
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.22)
        draw.polygon(pts(*zip(radii * np.cos(angles), radii * np.sin(angles))), fill=palette[o.colour])
    elif o.kind == "cross":
        draw.rectangle(box(-0.14, -0.45, 0.14, 0.45), fill=palette[o.colour])
        draw.rectangle(box(-0.45, -0.14, 0.45, 0.14), fill=palette[o.colour])
    elif o.kind == "hexagon":
        angles = np.pi * np.arange(6) / 3
        draw.polygon(pts(*zip(0.5 * np.cos(angles), 0.5 * np.sin(angles))), fill=palette[o.colour])
    elif o.kind == "heart":
        draw.ellipse(box(-0.5, -0.42, 0.02, 0.1), fill=palette[o.colour])
        draw.ellipse(box(-0.02, -0.42, 0.5, 0.1), fill=palette[o.colour])
        draw.polygon(pts((-0.47, -0.05), (0.47, -0.05), (0, 0.48)), fill=palette[o.colour])
    elif o.kind == "ring":
        draw.ellipse(box(-0.5, -0.5, 0.5, 0.5), outline=palette[o.colour], width=max(1, round(0.16 * s)))
    elif o.kind == "moon":  # a crescent: a disc with a background-coloured disc bitten out of it
        draw.ellipse(box(-0.45, -0.45, 0.45, 0.45), fill=(240, 225, 120))
        draw.ellipse(box(-0.2, -0.55, 0.6, 0.35), fill=BACKGROUND)
    elif o.kind == "house":
        draw.rectangle(box(-0.36, -0.05, 0.36, 0.48), fill=(200, 150, 90))  # walls
        draw.polygon(pts((-0.5, -0.02), (0, -0.5), (0.5, -0.02)), fill=(170, 40, 40))  # roof
        draw.rectangle(box(-0.09, 0.2, 0.09, 0.48), fill=(90, 55, 30))  # door
    elif o.kind == "flower":
        draw.rectangle(box(-0.05, 0.0, 0.05, 0.5), fill=(40, 140, 40))  # stem
        for angle in np.arange(5) * 2 * np.pi / 5:
            c, t = 0.2 * np.cos(angle), 0.2 * np.sin(angle) - 0.18
            draw.ellipse(box(c - 0.15, t - 0.15, c + 0.15, t + 0.15), fill=(235, 120, 200))  # petals
        draw.ellipse(box(-0.1, -0.28, 0.1, -0.08), fill=(250, 215, 40))
    elif o.kind == "fish":
        draw.ellipse(box(-0.5, -0.25, 0.25, 0.25), fill=(245, 140, 40))  # body
        draw.polygon(pts((0.15, 0), (0.5, -0.28), (0.5, 0.28)), fill=(245, 140, 40))  # tail
        draw.ellipse(box(-0.36, -0.1, -0.24, 0.02), fill=(25, 25, 30))  # eye
    elif o.kind == "sun":
        for angle in np.arange(8) * np.pi / 4:  # eight rays: what tells a sun from a yellow circle
            c, t = np.cos(angle), np.sin(angle)
            draw.line(pts((0.3 * c, 0.3 * t), (0.52 * c, 0.52 * t)), fill=(245, 170, 0), width=max(1, round(0.08 * s)))
        draw.ellipse(box(-0.3, -0.3, 0.3, 0.3), fill=(250, 200, 0))
    elif o.kind == "tree":
        draw.rectangle(box(-0.09, 0.05, 0.09, 0.5), fill=(120, 75, 35))  # trunk
        draw.ellipse(box(-0.36, -0.5, 0.36, 0.2), fill=(35, 125, 45))  # canopy
    elif o.kind == "cat":
        _draw_cat(draw, o, box, pts, s)
    else:
        raise InvalidParameterError(f"unknown object kind {o.kind!r}")


def _draw_cat(draw, o: Obj, box, pts, s: float) -> None:
    fur, dark = (150, 150, 155), (25, 25, 30)
    draw.polygon(pts((-0.44, -0.12), (-0.36, -0.5), (-0.1, -0.33)), fill=fur)  # ears
    draw.polygon(pts((0.44, -0.12), (0.36, -0.5), (0.1, -0.33)), fill=fur)
    draw.polygon(pts((-0.34, -0.18), (-0.33, -0.4), (-0.2, -0.3)), fill=(235, 160, 170))  # inner ears
    draw.polygon(pts((0.34, -0.18), (0.33, -0.4), (0.2, -0.3)), fill=(235, 160, 170))
    draw.ellipse(box(-0.46, -0.38, 0.46, 0.42), fill=fur)  # head
    draw.polygon(pts((-0.06, 0.1), (0.06, 0.1), (0, 0.17)), fill=(230, 110, 130))  # nose
    if o.sunglasses:  # two dark lenses over the eyes and a bridge: a band across the face (PART_BOXES)
        draw.ellipse(box(-0.34, -0.14, -0.04, 0.08), fill=dark)
        draw.ellipse(box(0.04, -0.14, 0.34, 0.08), fill=dark)
        draw.rectangle(box(-0.06, -0.09, 0.06, -0.04), fill=dark)
    else:
        draw.ellipse(box(-0.24, -0.09, -0.12, 0.03), fill=(60, 140, 60))  # green eyes
        draw.ellipse(box(0.12, -0.09, 0.24, 0.03), fill=(60, 140, 60))
    if o.eye_patch:  # a dark patch over the left eye and its strap
        draw.line(pts((-0.44, -0.22), (0.44, 0.02)), fill=dark, width=max(1, round(0.05 * s)))
        draw.ellipse(box(-0.3, -0.13, -0.06, 0.07), fill=dark)
    if o.crown:  # a gold crown with three points
        draw.polygon(pts((-0.3, -0.3), (-0.3, -0.62), (-0.15, -0.45), (0, -0.7), (0.15, -0.45), (0.3, -0.62), (0.3, -0.3)),
                     fill=(235, 185, 20))
    if o.bow_tie:  # under the chin
        draw.polygon(pts((0, 0.36), (-0.24, 0.26), (-0.24, 0.5), (0, 0.4), (0.24, 0.5), (0.24, 0.26)), fill=(40, 60, 200))
    if o.hat:  # a top hat: brim on the head, tall crown, red band
        draw.rectangle(box(-0.3, -0.76, 0.3, -0.3), fill=dark)
        draw.rectangle(box(-0.42, -0.36, 0.42, -0.27), fill=dark)
        draw.rectangle(box(-0.3, -0.44, 0.3, -0.36), fill=(200, 30, 40))


# ---------------------------------------------------------------- datasets

def make_dataset(n: int, split: str = "train", seed: int = 0, size: int = 32, diverse: bool = False):
    """n scenes of a split -> (images [n, size, size, 3] uint8, captions, specs); same seed, same
    data. `diverse`: training data with the training-only variety (see EXTRA_PALETTE)."""
    if n < 0:
        raise InvalidParameterError(f"n must be >= 0, not {n}")
    rng = np.random.default_rng(seed)
    specs = [sample_scene(rng, split, diverse) for _ in range(n)]
    images = np.stack([render(s, size) for s in specs]) if specs else np.zeros((0, size, size, 3), np.uint8)
    return images, [caption(s) for s in specs], specs


def write_folder(out_dir, n: int, split: str = "train", seed: int = 0, size: int = 32, diverse: bool = False) -> Path:
    """Write `name.png` + `name.txt` (the caption) pairs, plus `specs.jsonl` (one exact spec per
    image, for scoring), into `out_dir` as a whole: built under a temporary name, then renamed."""
    from genlab.fsutil import atomic_dir

    images, captions, specs = make_dataset(n, split, seed, size, diverse)
    with atomic_dir(out_dir) as tmp:
        lines = []
        for i, (image, text, spec) in enumerate(zip(images, captions, specs)):
            name = f"{split}-{i:06d}"
            Image.fromarray(image).save(tmp / f"{name}.png")
            (tmp / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            lines.append(json.dumps({"name": name, "caption": text, "spec": spec.to_dict()}))
        (tmp / "specs.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return Path(out_dir)


def digits_dataset(size: int = 32):
    """scikit-learn's 1,797 handwritten digits as captioned RGB images: dark ink on white,
    8x8 upscaled (bicubic) to size x size. -> (images [N, size, size, 3] uint8, captions, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = (255 - digits.images / 16.0 * 255).clip(0, 255).astype(np.uint8)  # 0..16 -> white paper
    images = np.stack([np.asarray(Image.fromarray(d).resize((size, size), Image.Resampling.BICUBIC)) for d in ink])
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    return images, [f"the digit {int(t)}" for t in labels], labels
