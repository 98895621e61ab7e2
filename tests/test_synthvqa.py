"""The synthetic visual-QA generator (pyvtrim.synthvqa): deterministic per seed, answers that follow from its
own object list, and answers that are single pieces of the real Llama-2 vocabulary."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pyvtrim import synthvqa as sv


def test_deterministic_per_seed():
    for i in range(5):
        a, b = sv.sample(3, i), sv.sample(3, i)
        assert np.array_equal(a.image, b.image)
        assert a.objects == b.objects
        assert sv.questions(a, 4) == sv.questions(b, 4)
    # another seed or index gives another scene
    assert not np.array_equal(sv.sample(3, 0).image, sv.sample(4, 0).image)
    assert not np.array_equal(sv.sample(3, 0).image, sv.sample(3, 1).image)


def test_scenes_well_formed():
    for i in range(60):
        s = sv.sample(11, i)
        assert s.image.shape == (sv.IMAGE_SIZE, sv.IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= sv.MAX_OBJECTS
        for k, o in enumerate(s.objects):
            px = s.object_map == k
            assert px.sum() > 10, o  # every object is drawn, none is hidden by another
            assert np.allclose(s.image[px].mean(0), sv.COLOURS[o.colour], atol=40)
    assert len({len(sv.sample(11, i).objects) for i in range(60)}) == sv.MAX_OBJECTS


def test_answers_follow_from_objects():
    kinds = Counter()
    for i in range(300):
        s = sv.sample(5, i)
        for q in sv.questions(s, 3):
            kinds[q.kind] += 1
            assert q.answer in sv.ANSWER_WORDS
            assert sv.answer(s, q) == q.answer, (q, s.objects)
    assert set(kinds) == set(sv.KINDS), kinds  # every kind is drawn


def test_answer_distribution_not_degenerate():
    ans = Counter(q.answer for i in range(400) for q in sv.questions(sv.sample(9, i), 2))
    top = ans.most_common(1)[0][1] / sum(ans.values())
    assert top < 0.25, ans


def test_patch_labels():
    s = sv.sample(2, 0, n_objects=4)
    lab = sv.patch_labels(s, patch=8)
    assert lab.colour.shape == (144,)
    assert lab.centre.sum() == 4  # one centre patch per object
    assert (lab.colour > 0).sum() >= 4 and (lab.colour > 0).sum() == (lab.shape > 0).sum()


def test_answers_are_single_llama2_tokens():
    spm = pytest.importorskip("sentencepiece")
    import fixtures

    try:
        model = fixtures.spm_tokenizer_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    base = sp.encode(sv.prompt("What colour is the circle?"))
    for w in sv.ANSWER_WORDS:
        ids = sp.encode(sv.prompt("What colour is the circle?") + " " + w)
        assert ids[:len(base)] == base and len(ids) == len(base) + 1, (w, sp.id_to_piece(ids[len(base):]))
        assert sp.id_to_piece(ids[-1]) == "\u2581" + w
