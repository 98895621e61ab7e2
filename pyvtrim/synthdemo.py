"""`pyvtrim demo` with the trained tiny VLM: a fresh synthetic picture, three questions, answers against the truth.

The model (pyvtrim/data/tiny-llava-synthvqa.gguf, trained by tools/train_tiny_vlm.py on pyvtrim.synthvqa) is a
LlavaForConditionalGeneration converted by pyvtrim.conversion; every answer is one token, read as the argmax of
the logits after "ASSISTANT:". Nothing is downloaded; without the file the demo falls back to random weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import synthvqa as sv

TRAINED_MODEL = "tiny-llava-synthvqa.gguf"
TRAINED_SUMMARY = "tiny-llava-synthvqa.json"


def trained_model_path() -> Optional[Path]:
    """The shipped trained model, or None when this installation has none."""
    from ._ffi import data_path

    p = Path(data_path(TRAINED_MODEL))
    return p if p.is_file() else None


@dataclass
class DemoAnswer:
    question: sv.Question
    answer: str  # the model's word (its argmax token, decoded)
    ms: float  # encode + prefill of this question
    n_image_tokens: int
    n_kept: int
    kept_patches: List[int] = field(default_factory=list)  # image patch indices (row-major) the decoder kept
    stages: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return self.answer == self.question.answer


def ask(m: Any, scene: sv.Scene, questions: Sequence[sv.Question], reduce: Any = None) -> List[DemoAnswer]:
    """Each question in a fresh sequence (the runtime's forward), its answer the argmax token."""
    out = []
    for q in questions:
        tokens = m.tokenize(sv.prompt(q.text))
        start = tokens.index(m.image_token_id)  # the image's rows begin here in the expanded prompt
        t0 = time.perf_counter()
        logits = m.forward(tokens, [scene.image], reduce=reduce)
        ms = 1000.0 * (time.perf_counter() - t0)
        word = m.detokenize([int(np.argmax(logits))], remove_leading_space=True).strip()
        word = word if word.isprintable() and word else repr(word)
        st = m.last_stats
        kept = [r - start for r in m.last_kept_image_rows()] if reduce is not None else []
        out.append(DemoAnswer(q, word, ms, int(st["n_image_tokens"]), int(st["n_image_tokens_kept"]), kept,
                              list(st.get("stages", []))))
    return out


def cell_colours(scene: sv.Scene, grid: int) -> List[int]:
    """Per cell of a grid x grid split of the picture (row-major): the colour class (1-based, 0 = background)
    of the object covering it. With whole patches (96 % grid == 0) the generator's own per-patch labels,
    otherwise the object covering at least a tenth of the cell."""
    size = scene.image.shape[0]
    if size % grid == 0:
        return [int(c) for c in sv.patch_labels(scene, size // grid).colour]
    colours, edges, out = list(sv.COLOURS), np.linspace(0, size, grid + 1).round().astype(int), []
    for r in range(grid):
        for c in range(grid):
            cell = scene.object_map[edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
            ids, counts = np.unique(cell[cell >= 0], return_counts=True)
            best = int(ids[counts.argmax()]) if len(ids) and counts.max() >= 0.1 * cell.size else -1
            out.append(0 if best < 0 else colours.index(scene.objects[best].colour) + 1)
    return out


def patch_grid(scene: sv.Scene, kept: Optional[Sequence[int]] = None, grid: int = 12) -> List[str]:
    """The picture as one character per image token: an object's cell is its colour's initial (upper case when
    the reduction kept it or nothing was reduced, lower case when it was dropped); background "." (kept: "+")."""
    colours = list(sv.COLOURS)
    cells = cell_colours(scene, grid)
    keep = None if kept is None else set(int(k) for k in kept)
    rows = []
    for r in range(grid):
        line = []
        for c in range(grid):
            i = r * grid + c
            on = keep is None or i in keep
            if cells[i]:
                ch = colours[cells[i] - 1][0]
                line.append(ch.upper() if on else ch.lower())
            else:
                line.append("+" if keep is not None and on else ".")
        rows.append(" ".join(line))
    return rows


def describe(scene: sv.Scene) -> str:
    return ", ".join(f"{o.size} {o.colour} {o.shape}" for o in scene.objects)
