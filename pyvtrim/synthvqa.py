"""A seeded synthetic visual-QA task: flat-coloured shapes on a dark noisy background, one-word answers.

Used to train the tiny VLMs that the fidelity evaluation measures reductions against (tools/train_tiny_vlm.py,
tools/eval_fidelity.py) and by the demo. numpy only (no torch, no Pillow).

    from pyvtrim import synthvqa
    s = synthvqa.sample(seed=7, index=0)        # a Scene: image (H x W x 3 uint8), objects, masks
    qs = synthvqa.questions(s, n=3, seed=7)     # [Question(kind, text, answer)]
    synthvqa.prompt(qs[0].text)                 # "USER: <image>\\n... ASSISTANT:" (LLaVA-1.5's format)

Every answer is one word whose " word" is a single piece of the Llama-2 vocabulary ("▁red", "▁three", "▁yes",
...): ANSWER_WORDS lists them all. The same (seed, index) always gives the same scene and questions.

Objects: 1-6 per image, COLOURS x SHAPES x two sizes (small: 7-9 px, large: 14-20 px), never overlapping.
Question kinds (each drawn only when it has a well-defined answer for the scene):
  count_colour  "How many red shapes are there?"           zero..six
  count_shape   "How many circles are there?"              zero..six
  count_all     "How many shapes are there?"               one..six
  exists        "Is there a blue triangle?"                yes / no (balanced)
  colour_of     "What colour is the triangle?"             (the shape is unique in the image)
  small_colour  "What colour is the small circle?"         (a unique small object: small-object question)
  shape_of      "What shape is the green object?"          (the colour is unique)
  left_right    "Is the red square on the left or the right?"   left / right (the object is clearly on one side)
  top_bottom    "Is the red square at the top or the bottom?"   top / bottom
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_SIZE = 96
COLOURS: Dict[str, tuple] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "white": (235, 235, 235),
    "orange": (245, 140, 20),
}
SHAPES = ("square", "circle", "triangle")
SHAPE_PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles"}
SIZES = {"small": (7, 9), "large": (14, 20)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_OBJECTS = 6
KINDS = ("count_colour", "count_shape", "count_all", "exists", "colour_of", "small_colour", "shape_of",
         "left_right", "top_bottom")
ANSWER_WORDS = tuple(NUMBER_WORDS) + ("yes", "no", "left", "right", "top", "bottom") + tuple(COLOURS) + SHAPES
# A side question needs the object's centre this far (px) from the middle line.
SIDE_MARGIN = 10


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str  # "small" | "large"
    side: int  # px: square side, circle diameter, triangle base and height
    cx: float
    cy: float


@dataclass
class Scene:
    seed: int
    index: int
    image: np.ndarray  # H x W x 3 uint8
    objects: List[Obj]
    object_map: np.ndarray  # H x W int16: index into objects, -1 for background


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, stream])


_GRIDS: Dict[int, tuple] = {}


def _grid(size: int):
    if size not in _GRIDS:
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        _GRIDS[size] = (ys, xs)
    return _GRIDS[size]


def shape_mask(shape: str, side: int, cx: float, cy: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean H x W mask of one object (pixel centres inside the shape)."""
    ys, xs = _grid(size)
    h = side / 2.0
    if shape == "square":
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    if shape == "triangle":  # apex up, base at the bottom
        t = (ys - (cy - h)) / side  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * h)
    raise ValueError(f"unknown shape {shape!r}")


def make_scene(seed: int, index: int, n_objects: Optional[int] = None, *, min_objects: int = 1,
               max_objects: int = MAX_OBJECTS, size: int = IMAGE_SIZE) -> Scene:
    """The scene of (seed, index): 1-6 non-overlapping objects (n_objects to force a count)."""
    rng = _rng(seed, index, 0)
    n = int(n_objects) if n_objects is not None else int(rng.integers(min_objects, max_objects + 1))
    colours, objs = list(COLOURS), []
    for _ in range(n):
        for _attempt in range(200):
            sz = "small" if rng.random() < 0.4 else "large"
            lo, hi = SIZES[sz]
            side = int(rng.integers(lo, hi + 1))
            m = side / 2 + 2
            cx, cy = float(rng.uniform(m, size - m)), float(rng.uniform(m, size - m))
            # bounding circles (radius side*0.75) at least 3 px apart
            if all(np.hypot(cx - o.cx, cy - o.cy) > 0.75 * (side + o.side) + 3 for o in objs):
                objs.append(Obj(colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))],
                                sz, side, round(cx, 2), round(cy, 2)))
                break
    img = rng.normal(28, 10, (size, size, 3))
    img += rng.normal(0, 6, (1, 1, 3))  # a per-image tint
    omap = np.full((size, size), -1, np.int16)
    for i, o in enumerate(objs):
        mk = shape_mask(o.shape, o.side, o.cx, o.cy, size)
        col = np.array(COLOURS[o.colour], np.float64) + rng.normal(0, 8, 3)
        img[mk] = col + rng.normal(0, 5, (int(mk.sum()), 3))
        omap[mk] = i
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(seed, index, image, objs, omap)


def sample(seed: int, index: int, **kw) -> Scene:
    return make_scene(seed, index, **kw)


def blank_image(size: int = IMAGE_SIZE) -> np.ndarray:
    """The "image removed" input: a uniform image of the background's mean level."""
    return np.full((size, size, 3), 28, np.uint8)


# ------------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------------


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _candidates(scene: Scene, kind: str, rng: np.random.Generator) -> Optional[Question]:
    objs = scene.objects
    if kind == "count_colour":
        # half the time a colour present in the image, so the counts are not mostly zero
        present = sorted({o.colour for o in objs})
        c = present[int(rng.integers(len(present)))] if rng.random() < 0.7 else list(COLOURS)[
            int(rng.integers(len(COLOURS)))]
        return Question(kind, f"How many {c} shapes are there?", _count_word(sum(o.colour == c for o in objs)))
    if kind == "count_shape":
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        return Question(kind, f"How many {SHAPE_PLURALS[s]} are there?", _count_word(sum(o.shape == s for o in objs)))
    if kind == "count_all":
        return Question(kind, "How many shapes are there?", _count_word(len(objs)))
    if kind == "exists":
        pairs = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = sorted(pairs)[int(rng.integers(len(pairs)))]
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
            c, s = absent[int(rng.integers(len(absent)))]
        return Question(kind, f"Is there a {c} {s}?", "yes" if (c, s) in pairs else "no")
    if kind == "colour_of":
        uniq = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return Question(kind, f"What colour is the {o.shape}?", o.colour)
    if kind == "small_colour":
        uniq = [o for o in objs if o.size == "small"
                and sum(p.shape == o.shape and p.size == "small" for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return Question(kind, f"What colour is the small {o.shape}?", o.colour)
    if kind == "shape_of":
        uniq = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return Question(kind, f"What shape is the {o.colour} object?", o.shape)
    if kind in ("left_right", "top_bottom"):
        mid = IMAGE_SIZE / 2
        uniq = [o for o in objs if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1
                and abs((o.cx if kind == "left_right" else o.cy) - mid) >= SIDE_MARGIN]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        if kind == "left_right":
            return Question(kind, f"Is the {o.colour} {o.shape} on the left or the right?",
                            "left" if o.cx < mid else "right")
        return Question(kind, f"Is the {o.colour} {o.shape} at the top or the bottom?",
                        "top" if o.cy < mid else "bottom")
    raise ValueError(f"unknown question kind {kind!r}")


def questions(scene: Scene, n: int = 1, seed: Optional[int] = None, kinds: Sequence[str] = KINDS,
              stream: int = 1) -> List[Question]:
    """n questions about the scene, their kinds drawn uniformly among those that apply (seeded by the
    scene's seed and index, or by seed)."""
    rng = _rng(scene.seed if seed is None else seed, scene.index, stream)
    out: List[Question] = []
    for _ in range(200 * max(n, 1)):
        if len(out) >= n:
            break
        q = _candidates(scene, kinds[int(rng.integers(len(kinds)))], rng)
        if q is not None:
            out.append(q)
    return out


def held_out(seed: int, n: int) -> List[Tuple[Scene, Question]]:
    """n evaluation pairs: scenes 0..n-1 of `seed`, one question each (the same for training and evaluation)."""
    out = []
    for i in range(n):
        scene = sample(seed, i)
        out.append((scene, questions(scene, 1)[0]))
    return out


def prompt(question: str) -> str:
    """LLaVA-1.5's single-turn prompt (the answer follows as one token after "ASSISTANT:")."""
    return f"USER: <image>\n{question} ASSISTANT:"


def answer(scene: Scene, q: Question) -> str:
    """Recompute a question's answer from the scene's objects (an independent check of the generator)."""
    objs = scene.objects
    t = q.text
    words = t.rstrip("?").split()
    if t.startswith("How many shapes"):
        return _count_word(len(objs))
    if t.startswith("How many") and words[3] == "shapes":
        return _count_word(sum(o.colour == words[2] for o in objs))
    if t.startswith("How many"):
        s = next(k for k, v in SHAPE_PLURALS.items() if v == words[2])
        return _count_word(sum(o.shape == s for o in objs))
    if t.startswith("Is there"):
        return "yes" if any((o.colour, o.shape) == (words[3], words[4]) for o in objs) else "no"
    if t.startswith("What colour is the small"):
        return next(o.colour for o in objs if o.size == "small" and o.shape == words[5])
    if t.startswith("What colour"):
        return next(o.colour for o in objs if o.shape == words[4])
    if t.startswith("What shape"):
        return next(o.shape for o in objs if o.colour == words[4])
    if t.startswith("Is the"):
        o = next(o for o in objs if (o.colour, o.shape) == (words[2], words[3]))
        if "left" in words:
            return "left" if o.cx < IMAGE_SIZE / 2 else "right"
        return "top" if o.cy < IMAGE_SIZE / 2 else "bottom"
    raise ValueError(f"unknown question {t!r}")


# ------------------------------------------------------------------------------------------------
# Dense per-patch labels (the vision tower's pretraining objective)
# ------------------------------------------------------------------------------------------------

N_COLOUR_CLASSES = len(COLOURS) + 1  # 0 = background
N_SHAPE_CLASSES = len(SHAPES) + 1
N_SIZE_CLASSES = 3  # background, small, large


@dataclass
class PatchLabels:
    colour: np.ndarray  # [n_patches] int64, 0 = background
    shape: np.ndarray
    size: np.ndarray
    centre: np.ndarray  # [n_patches] 1 where an object's centre lies
    extra: Dict[str, np.ndarray] = field(default_factory=dict)


def patch_labels(scene: Scene, patch: int = 8, min_pixels: int = 6) -> PatchLabels:
    """Per patch (row-major): the object covering most of it (if at least min_pixels, or its centre is there)."""
    size = scene.object_map.shape[0]
    g = size // patch
    n = g * g
    centre = np.zeros(n, np.int64)
    blocks = scene.object_map.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(n, patch * patch)
    cols, shps = list(COLOURS), list(SHAPES)
    k = len(scene.objects)
    # table row 0 = background, row i+1 = object i: (colour, shape, size) classes
    table = np.zeros((k + 1, 3), np.int64)
    for i, o in enumerate(scene.objects):
        table[i + 1] = (cols.index(o.colour) + 1, shps.index(o.shape) + 1, 1 + (o.size == "large"))
    counts = np.zeros((n, k + 1), np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), patch * patch), blocks.reshape(-1).astype(np.int64) + 1), 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    best[counts.max(1) < min_pixels] = 0
    colour, shape, sz = (table[best, j].copy() for j in range(3))
    for o in scene.objects:
        p = min(int(o.cy // patch), g - 1) * g + min(int(o.cx // patch), g - 1)
        colour[p], shape[p], sz[p], centre[p] = cols.index(o.colour) + 1, shps.index(o.shape) + 1, \
            1 + (o.size == "large"), 1
    return PatchLabels(colour, shape, sz, centre)
