"""tools/train_tiny_vlm.py's data path: the per-patch labels line up with the patches the model sees, the prompt
packing puts each answer's logits where a single-question prompt has them, and the tree packing (several questions
about one image in one sequence, each seeing the image and itself only) gives exactly the single-question logits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import tiny_vlm as D  # noqa: E402
import train_tiny_vlm as T  # noqa: E402

from pyvtrim import synthvqa as sv  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-vlm-tok")
    D.save_tokenizer_and_preprocessor(out)
    prompts = D.Prompts(AutoTokenizer.from_pretrained(str(out)))
    torch.manual_seed(0)
    hp = dict(D.DEFAULTS, vision_layers=1, text_layers=2)
    model = D.build_model(hp)
    T.reinit([model.model.multi_modal_projector, model.model.language_model, model.lm_head], 0.088)
    model.eval()
    return model, prompts


def test_labels_follow_the_patch_order():
    """scene_labels is row-major over the 12 x 12 grid, as CLIP's patch embedding flattens; one centre per object."""
    for i in range(40):
        s = sv.sample(2, i)
        lab = D.scene_labels(s)
        assert lab.shape == (6, D.N_PATCHES)
        assert int(lab[3].sum()) == len(s.objects)
        g = sv.IMAGE_SIZE // D.PATCH
        for o in s.objects:
            p = int(o.cy // D.PATCH) * g + int(o.cx // D.PATCH)
            assert lab[3, p] == 1 and lab[0, p] == list(sv.COLOURS).index(o.colour) + 1
            assert lab[4, p] == int(o.cy // D.PATCH) and lab[5, p] == int(o.cx // D.PATCH)
        j = D.joint_index(lab)
        assert j.min() >= 0 and j.max() < D.N_JOINT


def test_patch_embedding_is_row_major(setup):
    model, _ = setup
    emb = next(m for n, m in model.model.vision_tower.named_modules() if n.endswith("embeddings"))
    img = np.full((1, 96, 96, 3), 28, np.uint8)
    img2 = img.copy()
    img2[0, 24:32, 56:64] = 255  # patch row 3, column 7
    with torch.no_grad():
        d = (emb(torch.from_numpy(D.normalize(img))) - emb(torch.from_numpy(D.normalize(img2)))).abs().sum(-1)
    assert int(d[0, 1:].argmax()) == 3 * 12 + 7


def test_packed_answers_match_the_model(setup):
    """The multi-turn packing's answer logits are the HF model's own at the token before each answer."""
    model, prompts = setup
    tr = T.Trainer(model, prompts, torch.device("cpu"))
    scenes = [sv.sample(0, i) for i in range(2)]
    groups = [sv.questions(scenes[0], 1, seed=1), sv.questions(scenes[1], 3, seed=2)]
    px = torch.from_numpy(D.normalize(np.stack([s.image for s in scenes])))
    with torch.no_grad():
        got = tr.packed_logits(tr.vision_features(px), groups)
        k = 0
        for b, g in enumerate(groups):
            ids, where = prompts.packed(g)
            assert [ids[w + 1] for w in where] == [prompts.answer_ids[q.answer] for q in g]
            ref = model(input_ids=torch.tensor([ids]), pixel_values=px[b:b + 1]).logits[0]
            for w in where:
                assert torch.allclose(got[k], ref[w], atol=1e-4)
                k += 1


def test_tree_packing_equals_single_questions(setup):
    model, prompts = setup
    tr = T.Trainer(model, prompts, torch.device("cpu"), tree=True, symbolic_joint=True)
    scenes = [sv.sample(0, i) for i in range(3)]
    groups = [sv.questions(scenes[0], 1, seed=1), sv.questions(scenes[1], 5, seed=2),
              sv.questions(scenes[2], 3, seed=3)]
    lab = torch.from_numpy(np.stack([D.scene_labels(s) for s in scenes]).astype(np.int64))
    with torch.no_grad():
        img = tr.symbolic(lab)
        got = tr.tree_logits_from_tokens(img, groups)
        ref = torch.cat([tr.packed_logits_from_tokens(img[b:b + 1], [[q]]) for b, g in enumerate(groups) for q in g])
    assert got.shape[0] == sum(len(g) for g in groups)
    assert torch.allclose(got, ref, atol=1e-4)


def test_distinct_questions():
    pool = D.Pool(0, 40, distinct=True)
    _, _, groups = pool.batch_groups(40, 10)
    for g in groups:
        assert len({q.text for q in g}) == len(g) >= 1
