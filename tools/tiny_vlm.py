"""The tiny VLM of tools/train_tiny_vlm.py without its training: the model's configuration, its tokenizer and
prompts, and the data (CLIP-normalised images, the per-patch label maps, a cached pool of scenes). Imported by the
trainer, tools/eval_fidelity.py and the trainer's tests."""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "support"))  # fixtures: the Llama-2 tokenizer.model rebuilt from the archive

from pyvtrim import synthvqa as sv  # noqa: E402

IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001
PADDED_VOCAB = 32064
PATCH = 8
N_PATCHES = (sv.IMAGE_SIZE // PATCH) ** 2
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

DEFAULTS = dict(vision_hidden=128, vision_ff=384, vision_layers=3, vision_heads=4,
                text_hidden=128, text_ff=256, text_layers=4, text_heads=4, text_kv_heads=4)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------------------------------------
# The model and its tokenizer
# ------------------------------------------------------------------------------------------------


def build_model(hp: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tc = LlamaConfig(hidden_size=hp["text_hidden"], intermediate_size=hp["text_ff"],
                     num_hidden_layers=hp["text_layers"], num_attention_heads=hp["text_heads"],
                     num_key_value_heads=hp["text_kv_heads"], max_position_embeddings=512, rms_norm_eps=1e-5,
                     rope_theta=10000.0, vocab_size=PADDED_VOCAB, tie_word_embeddings=False,
                     pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2)
    vc = CLIPVisionConfig(hidden_size=hp["vision_hidden"], intermediate_size=hp["vision_ff"],
                          num_hidden_layers=hp["vision_layers"], num_attention_heads=hp["vision_heads"],
                          image_size=sv.IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu",
                          projection_dim=hp["text_hidden"])
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=N_PATCHES, tie_word_embeddings=False, pad_token_id=PAD_TOKEN_ID)
    return LlavaForConditionalGeneration(cfg)


def save_tokenizer_and_preprocessor(out_dir: Path) -> None:
    import fixtures

    fixtures._save_tokenizer(out_dir, fixtures.spm_tokenizer_model())
    fixtures._save_preprocessor(out_dir, dict(image_size=sv.IMAGE_SIZE, patch_size=PATCH, do_pad=False,
                                              vision_feature_select_strategy="default"))


class Prompts:
    """Token ids of LLaVA prompts, with <image> expanded to the 144 image tokens (cached per question)."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}
        self.answer_ids = {}
        for w in sv.ANSWER_WORDS:
            i = tok.convert_tokens_to_ids("\u2581" + w)
            assert isinstance(i, int) and i != tok.unk_token_id, w
            self.answer_ids[w] = i

    def turn_ids(self, question: str):
        """A later turn of the same conversation: " USER: <question> ASSISTANT:" (no BOS)."""
        key = ("turn", question)
        if key not in self.cache:
            self.cache[key] = self.tok(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
        return self.cache[key]

    def packed(self, qs):
        """One image, several questions as turns: the ids and the positions whose logits give each answer."""
        ids, where = list(self.ids(qs[0].text)), []
        for k, q in enumerate(qs):
            if k:
                ids += self.turn_ids(q.text)
            where.append(len(ids) - 1)
            ids.append(self.answer_ids[q.answer])
        return ids, where

    def ids(self, question: str):
        if question not in self.cache:
            ids = self.tok(sv.prompt(question))["input_ids"]
            assert ids.count(IMAGE_TOKEN_ID) == 1 and ids[0] == 1, ids
            k = ids.index(IMAGE_TOKEN_ID)
            self.cache[question] = ids[:k] + [IMAGE_TOKEN_ID] * N_PATCHES + ids[k + 1:]
        return self.cache[question]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> CLIP-normalised float32 [B, 3, H, W] (the images are already 96 x 96)."""
    x = images.astype(np.float32) / 255.0
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


LABELS = ("colour", "shape", "size", "centre", "row", "col")
LABEL_CLASSES = (sv.N_COLOUR_CLASSES, sv.N_SHAPE_CLASSES, sv.N_SIZE_CLASSES, 2, 12, 12)


# The joint class of a patch: (colour, shape, size, centre) as one index, so that a conjunction ("a blue triangle",
# "the centre of a red object") is one key for the decoder's attention rather than a sum of separate ones.
N_JOINT = sv.N_COLOUR_CLASSES * sv.N_SHAPE_CLASSES * sv.N_SIZE_CLASSES * 2


def joint_index(labels):
    """labels [..., 6, 144] (numpy or torch ints) -> [..., 144]: the (colour, shape, size, centre) class."""
    c, s, z, m = (labels[..., j, :] for j in range(4))
    return ((c * sv.N_SHAPE_CLASSES + s) * sv.N_SIZE_CLASSES + z) * 2 + m


def scene_labels(s: sv.Scene) -> np.ndarray:
    """[6, 144] int: per patch the LABELS (colour, shape and size of the object there, its centre, row, column)."""
    lab = sv.patch_labels(s, PATCH)
    row, col = np.divmod(np.arange(N_PATCHES), sv.IMAGE_SIZE // PATCH)
    return np.stack([lab.colour, lab.shape, lab.size, lab.centre, row, col])


class Pool:
    """A fixed set of training scenes (images, per-patch labels), questions drawn afresh each time."""

    def __init__(self, seed: int, n: int, cache: Path = None, distinct: bool = False):
        self.seed, self.n, self.distinct = seed, n, distinct
        f = cache / f"pool-{seed}-{n}.pkl" if cache else None
        if f is not None and f.is_file():
            with open(f, "rb") as fh:
                self.images, self.labels, self.objects = pickle.load(fh)
        else:
            imgs, labs, objs = [], [], []
            for i in range(n):
                s = sv.sample(seed, i)
                imgs.append(s.image)
                labs.append(scene_labels(s))
                objs.append(s.objects)
            self.images, self.labels = np.stack(imgs), np.stack(labs).astype(np.int8)
            self.objects = objs
            if f is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                with open(f, "wb") as fh:
                    pickle.dump((self.images, self.labels, self.objects), fh)
        self.rng = np.random.default_rng([seed, 99])

    def scene(self, i: int) -> sv.Scene:
        return sv.Scene(self.seed, i, self.images[i], self.objects[i], np.zeros((1, 1), np.int16))

    def batch_images(self, b: int):
        idx = self.rng.integers(0, self.n, b)
        return idx, normalize(self.images[idx]), self.labels[idx].astype(np.int64)

    def pick(self, b: int, max_objects: int) -> np.ndarray:
        """b random scenes of the pool with at most max_objects objects (the curriculum's cap)."""
        idx = []
        while len(idx) < b:
            i = int(self.rng.integers(0, self.n))
            if len(self.objects[i]) <= max_objects:
                idx.append(i)
        return np.array(idx)

    def batch_groups(self, b: int, per: int, max_objects: int = sv.MAX_OBJECTS):
        """b scenes with up to `per` questions each (as turns of one conversation); with `distinct` no question
        repeats an earlier one of its pack (a repeat is answered by copying the earlier answer, not from the image:
        24% of 10-question packs)."""
        idx = self.pick(b, max_objects)
        groups = [sv.questions(self.scene(int(i)), per, seed=int(self.rng.integers(1 << 30))) for i in idx]
        if self.distinct:
            groups = [[q for k, q in enumerate(g) if all(q.text != p.text for p in g[:k])] for g in groups]
        return idx, normalize(self.images[idx]), groups

    def batch_questions(self, b: int, prompts: Prompts, max_objects: int = sv.MAX_OBJECTS):
        idx = self.pick(b, max_objects)
        qs = [sv.questions(self.scene(int(i)), 1, seed=int(self.rng.integers(1 << 30)))[0] for i in idx]
        return idx, normalize(self.images[idx]), qs


def SymbolicTokens(d: int, tie=None, joint: bool = False):
    """Image tokens made of the true per-patch labels: a sum of one learned row per label (colour, shape, size,
    centre, row, column). The decoder learns to answer from these first (stage 0, no vision tower in the loop,
    so steps are cheap and the retrieval is learnt from clean keys); the projector is then trained to produce
    them from the tower's features (stage 1c). What an image token carries stays its own patch's facts.

    tie: (the decoder's token embedding, {label index: token ids of its classes 1..}) to use the words' own
    embedding rows (scaled by a learned factor) for the colour, shape and size of a patch: the question's
    "red" then finds the red patches by the same vector, as LLaVA's projector maps into the word space.

    joint: add one more learned row per (colour, shape, size, centre) class (joint_index): still the patch's own
    facts, but a conjunction becomes a single key (without it, "Is there a blue triangle?" and "How many red
    shapes?" stayed at a constant answer for 2,000 steps)."""
    import torch

    class _Symbolic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.ModuleList(torch.nn.Embedding(n, d) for n in LABEL_CLASSES + ((N_JOINT,) if joint
                                                                                             else ()))
            for t in self.tables:
                torch.nn.init.normal_(t.weight, 0.0, d ** -0.5)
            object.__setattr__(self, "_word", tie[0] if tie else None)   # not a submodule: the decoder's
            self.tied = {}
            if tie:
                for j, ids in tie[1].items():
                    self.register_buffer(f"ids{j}", torch.tensor([0] + list(ids)))
                    self.tied[j] = f"ids{j}"
                self.scale = torch.nn.Parameter(torch.tensor(float(d ** -0.5 / 0.02)))

        def forward(self, labels):  # [B, 6, 144] -> [B, 144, d]
            out = 0
            for j, t in enumerate(self.tables):
                y = labels[:, j] if j < len(LABELS) else joint_index(labels)
                e = t(y)
                if j in self.tied:
                    w = self._word(getattr(self, self.tied[j])[y]) * self.scale
                    e = torch.where((y > 0).unsqueeze(-1), w, e)
                out = out + e
            return out

    return _Symbolic()
